"""The Mamba-1 block: MoM and dense from one spec, causal, modality-exact, and a step path equal to the full."""

from pathlib import Path

import pytest
import torch
import yaml

import momkit
from momkit.spec import ModelSpec

EXAMPLE = Path(__file__).parents[2] / "examples" / "mamba_mom.yaml"
ALL = ["norm", "in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj"]


def block_spec(specific, modalities=("text", "image"), d_model=16):
    return {"modalities": list(modalities), "routing": {"specific": specific}, "scan_backend": "reference",
            "backbone": {"kind": "mamba", "d_model": d_model, "d_state": 4, "expand": 2, "dt_rank": 3}}


def build(specific, gen, **kwargs):
    """A float64 block whose every parameter is random (so that no two modality copies coincide)."""
    block = momkit.build_block(block_spec(specific, **kwargs)).double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (0.3 if "A_log" not in name else 1.0))
    return block


def inputs(gen, batch=2, length=23, d_model=16, n_modalities=2):
    x = torch.randn(batch, length, d_model, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, n_modalities, (batch, length), generator=gen)


def count(module):
    return sum(p.numel() for p in module.parameters())


def test_mom_and_dense_from_one_yaml_differ_by_one_copy_of_the_projections():
    text = EXAMPLE.read_text()
    assert "specific: mom" in text
    mom = momkit.build_block(ModelSpec.model_validate(yaml.safe_load(text)))
    dense = momkit.build_block(ModelSpec.model_validate(yaml.safe_load(text.replace("specific: mom",
                                                                                     "specific: dense"))))
    projections = sum(count(getattr(dense, name)) for name in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    assert count(mom) == count(dense) + projections
    assert mom.in_proj.weight.shape == (2, *dense.in_proj.weight.shape)
    assert mom.conv1d.weight.shape == dense.conv1d.weight.shape
    assert mom.A_log.shape == dense.A_log.shape


def test_mamba_initialisation():
    block = momkit.build_block(block_spec("mom"))
    cfg = block.config
    torch.testing.assert_close(block.A_log[0], torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)))
    dt = torch.nn.functional.softplus(block.dt_proj.bias)
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert torch.equal(block.D, torch.ones_like(block.D))


@pytest.mark.parametrize("specific", ["dense", "mom", ALL, ["A_log"], ["D"], ["conv1d", "norm"]],
                         ids=lambda s: s if isinstance(s, str) else "+".join(s))
def test_step_equals_full_sequence(gen, specific):
    block = build(specific, gen)
    x, modality = inputs(gen)
    full = block(x, modality)
    state = block.allocate_state(x.shape[0])
    steps = torch.stack([block.step(x[:, t], modality[:, t], state) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("specific", ["mom", ALL])
def test_causal(gen, specific):
    block = build(specific, gen)
    x, modality = inputs(gen)
    y = block(x, modality)
    x2, m2 = x.clone(), modality.clone()
    x2[:, 11:] += torch.randn(x2[:, 11:].shape, generator=gen, dtype=x.dtype)
    m2[:, 11:] = 1 - m2[:, 11:]
    y2 = block(x2, m2)
    torch.testing.assert_close(y2[:, :11], y[:, :11], rtol=0, atol=0)
    assert (y2[:, 11:] - y[:, 11:]).abs().max() > 1e-3


def test_identical_modality_weights_make_labels_irrelevant(gen):
    block = build(ALL, gen)
    with torch.no_grad():
        for p in block.parameters():
            p[1].copy_(p[0])
    x, modality = inputs(gen)
    torch.testing.assert_close(block(x, modality), block(x, torch.zeros_like(modality)), rtol=1e-13, atol=1e-13)


def test_swapping_weights_equals_swapping_labels(gen):
    block = build(ALL, gen, modalities=("text", "image", "speech"))
    x, modality = inputs(gen, n_modalities=3)
    y = block(x, modality)
    with torch.no_grad():
        for p in block.parameters():
            p[[0, 2]] = p[[2, 0]]
    swapped = modality.clone()
    swapped[modality == 0], swapped[modality == 2] = 2, 0
    torch.testing.assert_close(block(x, swapped), y, rtol=1e-13, atol=1e-13)


def test_absent_modality_gets_exactly_zero_gradient(gen):
    block = build(ALL, gen, modalities=("text", "image", "speech"))
    x, modality = inputs(gen, n_modalities=2)
    (block(x, modality) * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum().backward()
    for name, p in block.named_parameters():
        assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2])), name
        assert p.grad[:2].abs().sum() > 0, name


def test_float32_block_trains(gen):
    block = momkit.build_block(block_spec("mom"))
    x, modality = inputs(gen)
    y = block(x.float(), modality)
    y.square().mean().backward()
    assert y.shape == x.shape and all(torch.isfinite(p.grad).all() for p in block.parameters())


@pytest.mark.parametrize("bad,message", [
    (lambda x, m: (x[..., :-1], m), r"x must be \(b, l, d_model\) with d_model = 16"),
    (lambda x, m: (x, m[:, :-1]), r"modality must be \(b, l\)"),
    (lambda x, m: (x, m.int()), "modality must be int64"),
    (lambda x, m: (x, m + 5), r"valid ids: 0 = text, 1 = image"),
    (lambda x, m: (x.long(), m), "floating-point"),
    (lambda x, m: (x, m, m.float()), r"seq_idx must be an int32 or int64 tensor of shape \(2, 23\)"),
    (lambda x, m: (x, m, m[:, 1:]), r"seq_idx must be .* like modality; got \(2, 22\)"),
])
def test_block_rejects_bad_inputs(gen, bad, message):
    block = build("mom", gen)
    with pytest.raises(ValueError, match=message):
        block(*bad(*inputs(gen)))


@pytest.mark.parametrize("specific", ["mom", ALL])
def test_packed_documents_equal_separate_sequences(gen, specific):
    block = build(specific, gen)
    x, modality = inputs(gen, length=30)
    seq_idx = torch.zeros(x.shape[:2], dtype=torch.int64)
    seq_idx[0, 12:], seq_idx[1, 5:] = 1, 1
    seq_idx[1, 6:] = 2
    packed = block(x, modality, seq_idx)
    for row, bounds in ((0, (0, 12, 30)), (1, (0, 5, 6, 30))):
        for start, end in zip(bounds, bounds[1:]):
            alone = block(x[row:row + 1, start:end], modality[row:row + 1, start:end])
            torch.testing.assert_close(packed[row:row + 1, start:end], alone, rtol=1e-12, atol=1e-12)
