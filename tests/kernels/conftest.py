"""What the kernel tests share: the Triton tiers, the comparison with a float64 reference, and the random
inputs of both scans.

Small shapes run under Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set, otherwise on a
CUDA GPU; larger shapes, at several tilings, only on a GPU, where the compiled kernels are tested (compilers
have been seen to miscompile some block sizes only). Without Triton, or with neither a GPU nor the
interpreter, both skip. A test module names the Triton module it tests in ``KERNELS`` and takes the fixture
``kernels`` (or ``cuda_kernels`` for the GPU-only tier).
"""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from momkit.kernels.reference.naive import naive_selective_scan

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETING
DEVICE = "cuda" if CUDA else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def pytest_collection_modifyitems(items):
    """Mark ``gpu`` the tests that need one: those of the compiled tier and of the ``cuda`` backend."""
    for item in items:
        if {"cuda_kernels", "cuda_backend"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="module")
def kernels(request):
    """The module named by the test module's ``KERNELS``, where Triton imports and can run (else the test
    skips)."""
    pytest.importorskip("triton")
    if not (CUDA or INTERPRETING):
        pytest.skip("needs a CUDA GPU, or TRITON_INTERPRET=1 for Triton's CPU interpreter")
    return importlib.import_module(request.module.KERNELS)


@pytest.fixture
def cuda_kernels(kernels):
    """:func:`kernels` on a CUDA GPU only: the large shapes and the compiled kernels."""
    if not CUDA:
        pytest.skip("large shapes and compiled kernels need a CUDA GPU")
    return kernels


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


SELECTIVE_SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
LOW_PRECISION = ("u", "delta", "z", "B", "C")
"""The selective scan's inputs given in the activations' dtype; ``A``, ``D`` and ``delta_bias`` stay float32."""


def random_documents(gen, batch, length):
    """``(b, l)`` int32 document index with random boundaries, including one-position documents."""
    starts = torch.rand(batch, length, generator=gen) < 0.15
    starts[:, 0] = False
    if length > 3:
        starts[0, length - 1] = starts[0, length - 2] = True
    return starts.cumsum(1).to(torch.int32)


def selective_inputs(gen, batch, dim, state, length, groups=None, n_modalities=None, dtype=torch.float64,
                          D=True, z=True, bias=True, packed=False, initial=False):
    """Random float64 (or ``dtype``) arguments of ``selective_scan`` on the CPU (with ``initial``, an initial
    state)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    bc = (batch, state, length) if groups is None else (batch, groups, state, length)
    a_shape = (dim, state) if n_modalities is None else (n_modalities, dim, state)
    return dict(
        u=randn(batch, dim, length),
        delta=0.5 * randn(batch, dim, length) - 1.0,
        A=-torch.exp(randn(*a_shape)),
        B=randn(*bc),
        C=randn(*bc),
        D=randn(dim) if D else None,
        z=randn(batch, dim, length) if z else None,
        delta_bias=0.3 * randn(dim) if bias else None,
        delta_softplus=True,
        modality=None if n_modalities is None else torch.randint(0, n_modalities, (batch, length), generator=gen),
        seq_idx=random_documents(gen, batch, length) if packed else None,
        initial_state=randn(batch, dim, state) if initial else None,
    )


def selective_device_inputs(gen, batch, dim, state, length, groups=None, n_modalities=None,
                                 dtype=torch.float32, D=True, z=True, bias=True, softplus=True, packed=False,
                                 initial=False):
    """The reference tests' random inputs on ``DEVICE``: ``u, delta, z, B, C`` in ``dtype``, ``A, D, delta_bias``
    in float32; without ``softplus``, ``delta`` comes already through softplus."""
    inputs = selective_inputs(gen, batch, dim, state, length, groups, n_modalities, D=D, z=z, bias=bias,
                                   packed=packed, initial=initial)
    if not softplus:
        inputs["delta"] = F.softplus(inputs["delta"])
    inputs["delta_softplus"] = softplus
    return {k: v if not torch.is_tensor(v) else v.to(DEVICE, dtype if k in LOW_PRECISION else torch.float32)
            if v.is_floating_point() else v.to(DEVICE) for k, v in inputs.items()}


def selective_grads(fn, inputs, gen, **extra):
    """Output, last state and input gradients of ``fn`` for a random linear loss (:func:`linear_loss_grads`)."""
    return linear_loss_grads(fn, inputs, SELECTIVE_SCAN_GRADS, gen, "last", **extra)


def selective_reference(inputs, seed):
    """:func:`selective_grads` of the per-token recurrence on ``inputs`` in float64."""
    return selective_grads(naive_selective_scan, as_float64(inputs), torch.Generator().manual_seed(seed))


def documents(batch, lengths):
    """``seq_idx (b, l)`` of documents of the given lengths, shifted per batch row so rows differ."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return torch.stack([ids.roll(3 * i) if i else ids for i in range(batch)])


def ssd_inputs(gen, batch, length, heads, headdim, groups, state, *, D="hp", z=True, bias=True, softplus=True,
               initial=True, modalities=None, seq_idx=None, dtype=torch.float64):
    """Random float64 (or ``dtype``) arguments of ``ssd_scan`` on the CPU."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    dt = 0.5 * randn(batch, length, heads) - 1.0
    inputs = dict(
        x=randn(batch, length, heads, headdim),
        dt=dt if softplus else F.softplus(dt),
        A=-torch.exp(randn(heads) if modalities is None else randn(modalities, heads)),
        B=randn(batch, length, groups, state),
        C=randn(batch, length, groups, state),
        D={None: None, "h": randn(heads), "hp": randn(heads, headdim)}[D],
        z=randn(batch, length, heads, headdim) if z else None,
        dt_bias=0.3 * randn(heads) if bias else None,
        initial_states=randn(batch, heads, headdim, state) if initial else None,
        seq_idx=seq_idx,
        dt_softplus=softplus,
        modality=(None if modalities is None
                  else torch.randint(0, modalities, (batch, length), generator=gen)),
    )
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
