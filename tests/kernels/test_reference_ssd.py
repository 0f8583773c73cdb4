"""The chunked SSD scan against the per-token float64 recurrence, forward and backward."""

import pytest
import torch

from momkit.kernels.reference.naive import naive_ssd_scan
from momkit.kernels.reference.ssd import ssd_scan
from tests.kernels.conftest import SSD_GRADS, documents, ssd_inputs

def run(fn, inputs, weights_seed, **extra):
    """Output, final state and gradients of every tensor input for a random linear loss of both."""
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in SSD_GRADS if inputs[k] is not None}
    out, final = fn(**{**inputs, **leaves}, return_final_states=True, **extra)
    gen = torch.Generator().manual_seed(weights_seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    return out, final, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def assert_exact(actual, expected, name):
    """Equal up to float64 rounding: a few hundred ulps of the largest entry."""
    scale = 1.0 + expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-12 * scale * max(1, expected.numel()) ** 0.5, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def check_against_reference(gen, inputs, chunk_size):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out, final, g = run(ssd_scan, inputs, seed, chunk_size=chunk_size)
    ref_out, ref_final, ref_g = run(naive_ssd_scan, inputs, seed)
    assert out.dtype == final.dtype == torch.float64
    assert out.shape == ref_out.shape and final.shape == ref_final.shape
    assert_exact(out, ref_out, "out")
    assert_exact(final, ref_final, "final state")
    assert set(g) == set(ref_g)
    for name in g:
        assert_exact(g[name], ref_g[name], f"d{name}")


CASES = {
    "odd-length-ragged": dict(batch=2, length=37, heads=4, headdim=3, groups=2, state=5),
    "below-chunk": dict(batch=2, length=5, heads=2, headdim=4, groups=1, state=3),
    "one-position": dict(batch=1, length=1, heads=2, headdim=3, groups=2, state=4),
    "one-group": dict(batch=1, length=64, heads=4, headdim=8, groups=1, state=8),
    "group-per-head": dict(batch=2, length=29, heads=4, headdim=2, groups=4, state=3),
    "routed-A": dict(batch=2, length=41, heads=4, headdim=3, groups=2, state=4, modalities=3),
    "routed-A-one-group": dict(batch=1, length=33, heads=3, headdim=4, groups=1, state=2, modalities=2),
    "sizes-of-one": dict(batch=2, length=19, heads=2, headdim=1, groups=2, state=1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_matches_per_token_reference(gen, case, chunk_size):
    check_against_reference(gen, ssd_inputs(gen, **case), chunk_size)


@pytest.mark.parametrize("length,chunk_size", [(16, 16), (17, 16), (48, 16), (70, 16), (15, 4), (9, 100)])
def test_lengths_around_the_chunk_size(gen, length, chunk_size):
    check_against_reference(gen, ssd_inputs(gen, 2, length, 4, 3, 2, 4), chunk_size)


@pytest.mark.parametrize("D", [None, "h", "hp"])
@pytest.mark.parametrize("z,bias,softplus,initial", [(False, False, False, False), (True, True, True, False),
                                                     (False, False, True, True), (True, False, False, True)])
def test_optional_arguments(gen, D, z, bias, softplus, initial):
    inputs = ssd_inputs(gen, 2, 23, 4, 3, 2, 4, D=D, z=z, bias=bias, softplus=softplus, initial=initial)
    check_against_reference(gen, inputs, 8)


PACKINGS = {
    # chunk 8: boundaries at the chunk edges 8 and 16, inside chunks, and documents of length 1
    "edges-and-singles": [8, 1, 7, 1, 1, 12, 7],
    "single-position-documents": [1] * 5 + [20] + [1] * 12,
    "inside-chunks": [3, 10, 13, 11],
    "one-document": [37],
}


@pytest.mark.parametrize("lengths", PACKINGS.values(), ids=PACKINGS.keys())
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
@pytest.mark.parametrize("routed", [False, True])
def test_packed_documents(gen, lengths, chunk_size, routed):
    seq_idx = documents(2, lengths)
    inputs = ssd_inputs(gen, 2, seq_idx.shape[1], 4, 3, 2, 4, seq_idx=seq_idx, modalities=2 if routed else None)
    check_against_reference(gen, inputs, chunk_size)


def test_seq_idx_that_returns_to_an_earlier_id(gen):
    """The state restarts at every change of ``seq_idx``, even back to an id seen before."""
    seq_idx = torch.tensor([[0] * 5 + [1] * 4 + [0] * 6 + [2] + [0] * 3])
    check_against_reference(gen, ssd_inputs(gen, 1, 19, 2, 3, 1, 4, seq_idx=seq_idx), 4)


def test_output_alone_without_final_state(gen):
    inputs = ssd_inputs(gen, 2, 21, 4, 3, 2, 4, seq_idx=documents(2, [6, 9, 6]))
    x = inputs["x"].clone().requires_grad_(True)
    out = ssd_scan(**{**inputs, "x": x}, chunk_size=8, return_final_states=False)
    ref = naive_ssd_scan(**{**inputs, "x": x})
    assert torch.is_tensor(out)
    assert_exact(out, ref, "out")
    w = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    (g,), (ref_g,) = torch.autograd.grad((out * w).sum(), [x]), torch.autograd.grad((ref * w).sum(), [x])
    assert_exact(g, ref_g, "dx")


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_inference_without_gradients(gen, chunk_size):
    """Under ``torch.no_grad`` the scan keeps two chunk states only; the result is the same."""
    inputs = ssd_inputs(gen, 2, 37, 4, 3, 2, 4, modalities=2, seq_idx=documents(2, [8, 1, 20, 8]))
    ref_out, ref_final = naive_ssd_scan(**inputs, return_final_states=True)
    with torch.no_grad():
        out, final = ssd_scan(**inputs, chunk_size=chunk_size, return_final_states=True)
    assert_exact(out, ref_out, "out")
    assert_exact(final, ref_final, "final state")


def test_result_does_not_depend_on_chunk_size(gen):
    inputs = ssd_inputs(gen, 2, 67, 4, 8, 2, 8, seq_idx=documents(2, [20, 1, 30, 16]))
    outs = [ssd_scan(**inputs, chunk_size=k, return_final_states=True) for k in (1, 5, 16, 32, 67, 1000)]
    for out, final in outs[1:]:
        assert_exact(out, outs[0][0], "out")
        assert_exact(final, outs[0][1], "final state")


def test_empty_sequence(gen):
    inputs = ssd_inputs(gen, 2, 0, 4, 3, 2, 4)
    out, final = ssd_scan(**inputs, chunk_size=8, return_final_states=True)
    assert out.shape == (2, 0, 4, 3)
    torch.testing.assert_close(final, inputs["initial_states"], rtol=0, atol=0)


def test_gradcheck(gen):
    inputs = ssd_inputs(gen, 2, 9, 2, 2, 1, 3, modalities=2, seq_idx=documents(2, [3, 1, 5]))
    leaves = [k for k in SSD_GRADS if inputs[k] is not None]
    assert len(leaves) == len(SSD_GRADS)

    def fn(*tensors):
        return ssd_scan(**{**inputs, **dict(zip(leaves, tensors))}, chunk_size=4, return_final_states=True)

    assert torch.autograd.gradcheck(fn, [inputs[k].clone().requires_grad_(True) for k in leaves])


def test_float32_against_float64(gen):
    inputs = ssd_inputs(gen, 2, 70, 4, 8, 2, 8, seq_idx=documents(2, [30, 1, 39]))
    ref_out, ref_final = naive_ssd_scan(**inputs, return_final_states=True)
    low = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    out, final = ssd_scan(**low, chunk_size=16, return_final_states=True)
    assert out.dtype == final.dtype == torch.float32
    assert (out.double() - ref_out).norm() / ref_out.norm() < 1e-5
    assert (final.double() - ref_final).norm() / ref_final.norm() < 1e-5


def test_bfloat16_smoke(gen):
    inputs = ssd_inputs(gen, 2, 40, 4, 8, 2, 8)
    ref = naive_ssd_scan(**inputs)
    low = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    low["x"].requires_grad_(True)
    out, final = ssd_scan(**low, chunk_size=16, return_final_states=True)
    assert out.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(final).all()
    assert (out.double() - ref).norm() / ref.norm() < 5e-2
    (dx,) = torch.autograd.grad(out.float().sum(), [low["x"]])
    assert dx.dtype == torch.bfloat16 and torch.isfinite(dx).all()
