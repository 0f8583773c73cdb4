"""The block contract every backbone keeps, checked for each of them from one table: causal, modality-exact
(identical weights make labels irrelevant, swapped weights are swapped labels, an absent modality learns
nothing), a step path equal to the full sequence, packed documents equal to separate sequences, a float32
block that trains, and clear errors for bad inputs."""

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

import momkit

MAMBA_ALL = ["norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"]
MAMBA2_ALL = ["norm", "in_proj", "conv1d", "dt_bias", "A_log", "D", "gate_norm", "out_proj"]


def mamba2_allocated(block, state, x):
    assert state.conv.shape == (2, block.config.conv_dim, 4) and state.ssm.shape == (2, 4, 8, 4)


def transformer_stepped(block, state, x):
    assert state.length == x.shape[1] and state.keys.shape == (2, block.config.kv_heads, 23, 8)


@dataclass(frozen=True)
class Backbone:
    """How one backbone is exercised by the contract tests."""

    options: dict[str, Any]  # the backbone spec: small sizes
    spec: dict[str, Any]  # other fields of the block spec
    unit_scale: str  # parameters whose name holds this are drawn at scale 1, all others at 0.3
    routings: dict[str, tuple[Any, dict[str, Any]]]  # id -> (routing.specific, extra backbone options)
    step: tuple[str, ...]  # the routings whose step path is checked against the full sequence
    causal: tuple[str, ...]  # the routings checked for causality and packed documents
    every: tuple[str, ...]  # routings that give every parameter one copy per modality
    default: tuple[str, ...]  # the routings of the float32 block and the bad-input checks
    step_max_length: bool = False  # whether the step test allocates the state for the whole sequence
    check_allocated: Callable | None = None  # the backbone's asserts on a fresh state of the step test
    check_stepped: Callable | None = None  # and on the state after the whole sequence


BACKBONES = {
    "mamba": Backbone(
        options={"d_model": 16, "d_state": 4, "expand": 2, "dt_rank": 3},
        spec={"scan_backend": "reference"},
        unit_scale="A_log",
        routings={"dense": ("dense", {}), "mom": ("mom", {}), "all": (MAMBA_ALL, {}), "A_log": (["A_log"], {}),
                  "D": (["D"], {}), "conv1d+norm": (["conv1d", "norm"], {})},
        step=("dense", "mom", "all", "A_log", "D", "conv1d+norm"),
        causal=("mom", "all"),
        every=("all",),
        default=("mom",),
    ),
    "mamba2": Backbone(
        options={"d_model": 16, "d_state": 4, "expand": 2, "headdim": 8, "chunk_size": 8},
        spec={"scan_backend": "reference"},
        unit_scale="A_log",
        routings={"dense": ("dense", {}), "mom": ("mom", {}), "all": (MAMBA2_ALL, {}),
                  "all-ngroups2": (MAMBA2_ALL, {"ngroups": 2}), "A_log": (["A_log"], {}), "D": (["D"], {}),
                  "dt_bias": (["dt_bias"], {}), "gate_norm-ngroups2": (["gate_norm"], {"ngroups": 2})},
        step=("dense", "mom", "all", "all-ngroups2", "A_log", "D", "dt_bias", "gate_norm-ngroups2"),
        causal=("mom", "all"),
        every=("all",),
        default=("mom",),
        check_allocated=mamba2_allocated,
    ),
    "transformer": Backbone(
        options={"d_model": 32, "n_heads": 4},
        spec={},
        unit_scale="norm",
        routings={"dense": ("dense", {}), "mot": ("mot", {}), "mot-gqa": ("mot", {"n_kv_heads": 2}),
                  "dense-gqa": ("dense", {"n_kv_heads": 2}), "dense-mqa": ("dense", {"n_kv_heads": 1}),
                  "q_proj+ffn-gqa": (["q_proj", "ffn"], {"n_kv_heads": 2})},
        step=("dense", "mot", "mot-gqa", "dense-mqa", "q_proj+ffn-gqa"),
        causal=("mot-gqa", "dense-gqa"),
        every=("mot", "mot-gqa"),
        default=("mot", "mot-gqa"),
        step_max_length=True,
        check_stepped=transformer_stepped,
    ),
}


def cases(field):
    """``(kind, routing, options)`` for each backbone and each of its routings named by ``field``."""
    return [pytest.param(kind, *backbone.routings[name], id=f"{kind}-{name}")
            for kind, backbone in BACKBONES.items() for name in getattr(backbone, field)]


def block_spec(kind, routing, modalities=("text", "image"), **options):
    backbone = BACKBONES[kind]
    return {"modalities": list(modalities), "routing": {"specific": routing}, **backbone.spec,
            "backbone": {"kind": kind, **backbone.options, **options}}


def build(kind, routing, gen, **options):
    """A float64 block whose every parameter is random (so that no two modality copies coincide)."""
    block = momkit.build_block(block_spec(kind, routing, **options)).double()
    unit = BACKBONES[kind].unit_scale
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (1.0 if unit in name else 0.3))
    return block


def inputs(kind, gen, batch=2, length=23, n_modalities=2):
    x = torch.randn(batch, length, BACKBONES[kind].options["d_model"], generator=gen, dtype=torch.float64)
    return x, torch.randint(0, n_modalities, (batch, length), generator=gen)


@pytest.mark.parametrize("kind,routing,options", cases("step"))
def test_step_equals_full_sequence(gen, kind, routing, options):
    block = build(kind, routing, gen, **options)
    x, modality = inputs(kind, gen)
    full = block(x, modality)
    backbone = BACKBONES[kind]
    state = block.allocate_state(x.shape[0], *([x.shape[1]] if backbone.step_max_length else []))
    if backbone.check_allocated is not None:
        backbone.check_allocated(block, state, x)
    steps = torch.stack([block.step(x[:, t], modality[:, t], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)
    if backbone.check_stepped is not None:
        backbone.check_stepped(block, state, x)


@pytest.mark.parametrize("kind,routing,options", cases("causal"))
def test_causal(gen, kind, routing, options):
    block = build(kind, routing, gen, **options)
    x, modality = inputs(kind, gen)
    y = block(x, modality)
    x2, m2 = x.clone(), modality.clone()
    x2[:, 11:] += torch.randn(x2[:, 11:].shape, generator=gen, dtype=x.dtype)
    m2[:, 11:] = 1 - m2[:, 11:]
    y2 = block(x2, m2)
    torch.testing.assert_close(y2[:, :11], y[:, :11], rtol=0, atol=0)
    assert (y2[:, 11:] - y[:, 11:]).abs().max() > 1e-3


@pytest.mark.parametrize("kind,routing,options", cases("every"))
def test_identical_modality_weights_make_labels_irrelevant(gen, kind, routing, options):
    block = build(kind, routing, gen, **options)
    with torch.no_grad():
        for p in block.parameters():
            p[1].copy_(p[0])
    x, modality = inputs(kind, gen)
    torch.testing.assert_close(block(x, modality), block(x, torch.zeros_like(modality)), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind,routing,options", cases("every"))
def test_labels_matter_with_distinct_weights(gen, kind, routing, options):
    block = build(kind, routing, gen, **options)
    x, modality = inputs(kind, gen)
    assert (block(x, modality) - block(x, 1 - modality)).abs().max() > 1e-3


@pytest.mark.parametrize("kind,routing,options", cases("every"))
def test_swapping_weights_equals_swapping_labels(gen, kind, routing, options):
    block = build(kind, routing, gen, modalities=("text", "image", "speech"), **options)
    x, modality = inputs(kind, gen, n_modalities=3)
    y = block(x, modality)
    with torch.no_grad():
        for p in block.parameters():
            p[[0, 2]] = p[[2, 0]]
    swapped = modality.clone()
    swapped[modality == 0], swapped[modality == 2] = 2, 0
    torch.testing.assert_close(block(x, swapped), y, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("kind,routing,options", cases("every"))
def test_absent_modality_gets_exactly_zero_gradient(gen, kind, routing, options):
    block = build(kind, routing, gen, modalities=("text", "image", "speech"), **options)
    x, modality = inputs(kind, gen, n_modalities=2)
    (block(x, modality) * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum().backward()
    for name, p in block.named_parameters():
        assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2])), name
        assert p.grad[:2].abs().sum() > 0, name


@pytest.mark.parametrize("kind,routing,options", cases("default"))
def test_float32_block_trains(gen, kind, routing, options):
    block = momkit.build_block(block_spec(kind, routing, **options))
    x, modality = inputs(kind, gen)
    y = block(x.float(), modality)
    y.square().mean().backward()
    assert y.shape == x.shape and all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("seq_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("kind,routing,options", cases("causal"))
def test_packed_documents_equal_separate_sequences(gen, kind, routing, options, seq_dtype):
    block = build(kind, routing, gen, **options)
    x, modality = inputs(kind, gen, length=30)
    seq_idx = torch.zeros(x.shape[:2], dtype=seq_dtype)
    seq_idx[0, 12:], seq_idx[1, 5:] = 1, 1
    seq_idx[1, 6:] = 2
    packed = block(x, modality, seq_idx)
    for row, bounds in ((0, (0, 12, 30)), (1, (0, 5, 6, 30))):
        for start, end in zip(bounds, bounds[1:]):
            alone = block(x[row:row + 1, start:end], modality[row:row + 1, start:end])
            torch.testing.assert_close(packed[row:row + 1, start:end], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad,message", [
    (lambda x, m: (x[..., :-1], m), r"x must be \(b, l, d_model\) with d_model = {d_model}"),
    (lambda x, m: (x, m[:, :-1]), r"modality must be \(b, l\)"),
    (lambda x, m: (x, m.int()), "modality must be int64"),
    (lambda x, m: (x, m + 5), r"valid ids: 0 = text, 1 = image"),
    (lambda x, m: (x.long(), m), "floating-point"),
    (lambda x, m: (x, m, m.float()), r"seq_idx must be an int32 or int64 tensor of shape \(2, 23\)"),
    (lambda x, m: (x, m, m[:, 1:]), r"seq_idx must be .* like modality; got \(2, 22\)"),
], ids=["d_model", "modality-shape", "modality-int32", "modality-ids", "x-long", "seq_idx-float",
        "seq_idx-shape"])
@pytest.mark.parametrize("kind,routing,options", cases("default"))
def test_block_rejects_bad_inputs(gen, kind, routing, options, bad, message):
    block = build(kind, routing, gen, **options)
    with pytest.raises(ValueError, match=message.format(d_model=BACKBONES[kind].options["d_model"])):
        block(*bad(*inputs(kind, gen)))


@pytest.mark.parametrize("kind,routing,options", cases("default"))
def test_step_rejects_bad_inputs(gen, kind, routing, options):
    block = build(kind, routing, gen, **options)
    state = block.allocate_state(2)
    d_model = BACKBONES[kind].options["d_model"]
    with pytest.raises(ValueError, match=r"modality must be \(b,\)"):
        block.step(torch.randn(2, d_model, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), state)
