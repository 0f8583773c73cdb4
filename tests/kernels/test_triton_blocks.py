"""Mixture-of-Mamba blocks on the Triton backend, as a spec builds them, against the same blocks in float64.

A block built with ``scan_backend: triton`` runs every routed projection, its scan and its decoding step
through the Triton kernels; a float64 copy of it runs them all on the reference backend (``auto`` passes
over Triton for float64). Forward output, every parameter's gradient and the step-by-step decoding output
must agree to 1e-4, and so must a prefill of the first positions (the scans from and to the decoding state)
followed by steps; a block with the image modality bidirectional (its backward scan over the reversed spans)
is compared forward and backward. Under ``TRITON_INTERPRET=1`` on the CPU, or on a CUDA GPU.
"""

import pytest
import torch

from momkit import build_block
from tests.kernels.conftest import DEVICE, assert_close

KERNELS = "momkit.kernels.triton"

BACKBONES = {
    "mamba": {"kind": "mamba", "d_model": 16, "d_state": 4},
    "mamba2": {"kind": "mamba2", "d_model": 16, "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8},
    "s4d": {"kind": "s4d", "d_model": 16, "d_state": 4},
    "s4d-lin": {"kind": "s4d", "d_model": 16, "d_state": 4, "a_init": "s4d_lin"},
}


def forward_backward(layer, x, modality, weight):
    """The layer's output and every parameter's gradient for the linear loss ``sum(out * weight)``."""
    out = layer(x, modality)
    grads = torch.autograd.grad((out * weight.to(out.dtype)).sum(), list(layer.parameters()))
    return {"out": out, **{f"d{name}": g for (name, _), g in zip(layer.named_parameters(), grads)}}


@pytest.mark.parametrize("bidirectional", [[], ["image"]], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("routing", [{"specific": "mom"}, {"specific": "all"}], ids=["mom", "all"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_block_matches_float64_reference(kernels, gen, backbone, routing, bidirectional):
    spec = {"modalities": ["text", "image"], "backbone": BACKBONES[backbone], "routing": routing,
            "scan_backend": "triton", "bidirectional": bidirectional}
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    block = build_block(spec).to(DEVICE)
    wide = build_block({**spec, "scan_backend": "reference"}).to(DEVICE).double()
    wide.load_state_dict(block.state_dict())
    x = torch.randn(2, 13, 16, generator=gen, dtype=torch.float64)
    modality = (torch.arange(13) // 4 % 2).repeat(2, 1)
    modality[1] = 1 - modality[1]
    x, modality = x.to(DEVICE), modality.to(DEVICE)
    weight = torch.randn(2, 13, 16, generator=gen, dtype=torch.float64).to(DEVICE)

    ref = forward_backward(wide, x, modality, weight)
    assert_close(forward_backward(block, x.float(), modality, weight), ref, torch.float32,
                 f"{backbone} forward and backward")
    if bidirectional:
        return
    state = block.allocate_state(2)
    with torch.no_grad():
        steps = torch.stack([block.step(x[:, t].float(), modality[:, t], state) for t in range(13)], 1)
    assert_close({"steps": steps}, {"steps": ref["out"].detach()}, torch.float32, f"{backbone} decoding")
    state = block.allocate_state(2)
    with torch.no_grad():
        first = block(x[:, :6].float(), modality[:, :6], state=state)
        rest = torch.stack([block.step(x[:, t].float(), modality[:, t], state) for t in range(6, 13)], 1)
    assert_close({"prefill": torch.cat([first, rest], 1)}, {"prefill": ref["out"].detach()}, torch.float32,
                 f"{backbone} prefill, then decoding")


def on_both_backends(spec, gen):
    """A block of ``spec`` in float32, its copy on the reference backend, and random ``x (2, 40, 16)``, runs of
    both modalities and loss weights."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    block = build_block(spec).to(DEVICE)
    reference = build_block({**spec, "scan_backend": "reference"}).to(DEVICE)
    reference.load_state_dict(block.state_dict())
    x = torch.randn(2, 40, 16, generator=gen).to(DEVICE)
    modality = (torch.arange(40) // 7 % 2).repeat(2, 1).to(DEVICE)
    return block, reference, x, modality, torch.randn(2, 40, 16, generator=gen).to(DEVICE)


@pytest.mark.parametrize("backbone,routing,builds", [
    ({"kind": "ffn", "d_model": 16}, {"specific": "dense", "experts": {
        "sublayers": ["w1", "w2", "w3"], "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}}, 2),
    (BACKBONES["mamba"], {"specific": "mom"}, 1),
], ids=["experts", "mom"])
def test_routed_layers_of_a_block_share_their_tile_lists(kernels, gen, monkeypatch, backbone, routing, builds):
    """The routed projections of a block get the same ids (and with experts the same order, per slot), so one
    forward and backward builds the ``dweight`` tile lists once per slot; the block still equals its copy on the
    reference backend (float32, so that both routers choose the same experts), forward and backward."""
    routed_linear = kernels._kernels("routed_linear")
    made = []
    real = routed_linear._tile_lists
    monkeypatch.setattr(routed_linear, "_tile_lists", lambda *args: made.append(args[1:]) or real(*args))
    spec = {"modalities": ["text", "image"], "backbone": backbone, "routing": routing, "scan_backend": "triton"}
    block, reference, x, modality, weight = on_both_backends(spec, gen)
    got = forward_backward(block, x, modality, weight)
    assert len(made) == builds, f"tile lists built {len(made)} times in one pass: {made}"
    assert_close(got, forward_backward(reference, x, modality, weight), torch.float32, "triton against reference")


@pytest.mark.parametrize("backbone,routing", [
    ({"kind": "ffn", "d_model": 16}, {"specific": "dense", "experts": {
        "sublayers": ["w1", "w2", "w3"], "n_experts": 4, "top_k": 1, "capacity_factor": 1.25}}),
    ({"kind": "ffn", "d_model": 16}, {"specific": "all"}),
], ids=["experts", "routed"])
def test_blocks_under_autocast_take_float32_weights(kernels, gen, backbone, routing):
    """Under bfloat16 autocast the routed projections on the Triton backend take the float32 weights as they are
    (cast once per call, their gradients stored in float32): output and every gradient match the block on the
    reference backend, which is given the weights cast, and every gradient is float32. (Feed-forward blocks, whose
    routed projections are all that the two backends compute differently: two scans in bfloat16 differ by more than
    bfloat16's tolerance on their own.)"""
    spec = {"modalities": ["text", "image"], "backbone": backbone, "routing": routing, "scan_backend": "triton"}
    block, reference, x, modality, weight = on_both_backends(spec, gen)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        got, ref = forward_backward(block, x, modality, weight), forward_backward(reference, x, modality, weight)
    assert all(g.dtype == torch.float32 for name, g in got.items() if name != "out")
    assert_close(got, {k: v.double() for k, v in ref.items()}, torch.bfloat16, "triton against reference")
