"""The chunked selective scan against the per-token float64 recurrence, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from momkit.kernels.reference.naive import naive_selective_scan
from momkit.kernels.reference.selective_scan import selective_scan
from tests.kernels.conftest import SELECTIVE_SCAN_GRADS, selective_inputs

def grads(fn, inputs, gen, chunk_length=None):
    """Output, last state and gradients of every tensor input for a random linear loss of both."""
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in SELECTIVE_SCAN_GRADS if inputs[k] is not None}
    kwargs = {**inputs, **leaves}
    extra = {} if chunk_length is None else {"chunk_length": chunk_length}
    out, last = fn(return_last_state=True, **kwargs, **extra)
    w_out = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    w_last = torch.randn(last.shape, generator=gen, dtype=last.dtype)
    g = torch.autograd.grad((out * w_out).sum() + (last * w_last).sum(), list(leaves.values()))
    return out, last, dict(zip(leaves, g))


CASES = [
    dict(batch=2, dim=6, state=4, length=37),
    dict(batch=1, dim=8, state=3, length=64, groups=2),
    dict(batch=2, dim=6, state=5, length=1),
    dict(batch=2, dim=4, state=4, length=29, groups=4),
    dict(batch=2, dim=6, state=4, length=41, groups=3, n_modalities=3),
    dict(batch=1, dim=5, state=2, length=33, n_modalities=2),
    dict(batch=2, dim=6, state=3, length=45, packed=True),
    dict(batch=2, dim=4, state=3, length=31, groups=2, n_modalities=2, packed=True),
    dict(batch=2, dim=6, state=4, length=37, initial=True),
    dict(batch=2, dim=4, state=3, length=31, groups=2, n_modalities=2, packed=True, initial=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("chunk_length", [1, 8, 16, None])
def test_matches_per_token_reference(gen, case, chunk_length):
    inputs = selective_inputs(gen, **case)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out, last, g = grads(selective_scan, inputs, torch.Generator().manual_seed(seed), chunk_length)
    ref_out, ref_last, ref_g = grads(naive_selective_scan, inputs, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, ref_last, rtol=1e-12, atol=1e-12)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("D,z,bias,softplus", [(False, False, False, False), (True, False, True, True),
                                               (False, True, False, True)])
def test_optional_arguments(gen, D, z, bias, softplus):
    inputs = selective_inputs(gen, 2, 4, 3, 19, D=D, z=z, bias=bias)
    inputs["delta_softplus"] = softplus
    if not softplus:
        inputs["delta"] = F.softplus(inputs["delta"])
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    out, last, g = grads(selective_scan, inputs, torch.Generator().manual_seed(seed), 4)
    ref_out, ref_last, ref_g = grads(naive_selective_scan, inputs, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for name in g:
        torch.testing.assert_close(g[name], ref_g[name], rtol=1e-10, atol=1e-10)


def test_gradcheck(gen):
    inputs = selective_inputs(gen, 1, 3, 2, 7, groups=1, n_modalities=2, packed=True)
    leaves = [k for k in SELECTIVE_SCAN_GRADS if inputs[k] is not None]

    def fn(*tensors):
        kwargs = {**inputs, **dict(zip(leaves, tensors))}
        return selective_scan(return_last_state=True, chunk_length=3, **kwargs)

    assert torch.autograd.gradcheck(fn, [inputs[k].requires_grad_(True) for k in leaves])


def test_float32_and_bfloat16_against_float64(gen):
    inputs = selective_inputs(gen, 2, 16, 8, 300)
    ref = naive_selective_scan(**inputs)
    out32 = selective_scan(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                              for k, v in inputs.items()}, return_last_state=False)
    assert out32.dtype == torch.float32
    assert (out32.double() - ref).norm() / ref.norm() < 1e-5
    low = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() and k != "A" else v
           for k, v in inputs.items()}
    out16 = selective_scan(**low, return_last_state=False)
    assert out16.dtype == torch.bfloat16
    assert (out16.double() - ref).norm() / ref.norm() < 2e-2


def test_long_sequence_stays_finite(gen):
    inputs = selective_inputs(gen, 1, 4, 4, 20000)
    out = selective_scan(**{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                            for k, v in inputs.items()}, return_last_state=False)
    assert torch.isfinite(out).all()
