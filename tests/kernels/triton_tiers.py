"""What the Triton kernels' tests share: the two tiers, and the comparison with a float64 reference.

Small shapes run under Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set, otherwise on a
CUDA GPU; larger shapes, at several tilings, only on a GPU, where the compiled kernels are tested (compilers
have been seen to miscompile some block sizes only). Without Triton, or with neither a GPU nor the
interpreter, both skip.
"""

import importlib
import os

import pytest
import torch

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETING
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def tiers(module: str):
    """The fixtures ``kernels`` (``module``, where Triton imports and can run) and ``cuda_kernels`` (the same,
    on a CUDA GPU only), to be bound to those names in a test module."""

    @pytest.fixture(scope="module")
    def kernels():
        pytest.importorskip("triton")
        if not (CUDA or INTERPRETING):
            pytest.skip("needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's CPU interpreter")
        return importlib.import_module(module)

    @pytest.fixture
    def cuda_kernels(kernels):
        if not CUDA:
            pytest.skip("large shapes and compiled kernels need a CUDA GPU")
        return kernels

    return kernels, cuda_kernels


def as_float64(inputs: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def assert_close(got: dict, ref: dict, dtype: torch.dtype, label: str) -> None:
    """Every tensor of ``got`` finite and within ``TOLERANCE[dtype]`` of ``ref``'s by ``|x - ref| / |ref|``
    (Frobenius norms; ``|x|`` where ``ref`` is zero)."""
    tol = TOLERANCE[dtype]
    assert got.keys() == ref.keys()
    for name, x in got.items():
        assert torch.isfinite(x).all(), f"{label}: {name} is not finite"
        scale = ref[name].norm().item()
        err = (x.double() - ref[name]).norm().item() / (scale or 1.0)
        kind = "relative" if scale else "absolute (the reference is zero)"
        assert err <= tol, f"{label}: {name} {kind} error {err:.2e} > {tol:.0e}"


def linear_loss_grads(fn, inputs: dict, grad_inputs: tuple, gen: torch.Generator, state: str, **extra) -> dict:
    """Output, state and gradients of every tensor input named in ``grad_inputs`` for a random linear loss of
    the output and the state; ``state`` is ``"last"`` (``return_last_state``) or ``"final"``
    (``return_final_states``).

    The loss weights are drawn in float64 and rounded to the output's dtype, so that a low-precision run and
    its float64 reference differentiate the same loss.
    """
    flag = {"last": "return_last_state", "final": "return_final_states"}[state]
    leaves = {k: inputs[k].clone().requires_grad_(True) for k in grad_inputs if inputs[k] is not None}
    out, end = fn(**{**inputs, **leaves}, **{flag: True}, **extra)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    w_end = torch.randn(end.shape, generator=gen, dtype=torch.float64).to(end.device, end.dtype)
    grads = torch.autograd.grad((out * w_out).sum() + (end * w_end).sum(), list(leaves.values()))
    return {"out": out, state: end, **{f"d{k}": g for k, g in zip(leaves, grads)}}
