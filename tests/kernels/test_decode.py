"""The decoding state updates of every backend that has them, stepped along a sequence, against the scans.

Stepping ``selective_state_update`` position by position must give the per-token float64 recurrence's output
and final state, in both layouts (Mamba-1's channels, Mamba-2's heads with groups) and with parameters given
per modality; ``conv_state_update`` must give the routed convolution's output. The reference backend runs
in float64 (exact to rounding, 1e-10); the Triton kernels in float32 (1e-4) and with bfloat16 inputs (1e-2),
under ``TRITON_INTERPRET=1`` on the CPU or on a CUDA GPU. Each position's inputs are views into the whole
sequence's tensors, so they start at addresses that are multiples of 16 bytes at some positions and not at others,
as the kernels' reused launches must tell apart (:mod:`momkit.kernels.triton.launch`).
"""

import os

import pytest
import torch
import torch.nn.functional as F

from momkit import ops
from momkit.kernels.reference.naive import naive_selective_scan, naive_ssd_scan

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETING


def _triton_ready() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return CUDA or INTERPRETING


BACKENDS = [
    pytest.param("reference", torch.float64, 1e-10, id="reference"),
    pytest.param("triton", torch.float32, 1e-4, id="triton-float32",
                 marks=pytest.mark.skipif(not _triton_ready(), reason="needs Triton and a GPU or TRITON_INTERPRET=1")),
    pytest.param("triton", torch.bfloat16, 1e-2, id="triton-bfloat16",
                 marks=pytest.mark.skipif(not _triton_ready(), reason="needs Triton and a GPU or TRITON_INTERPRET=1")),
]
DEVICE = "cuda" if CUDA else "cpu"


def rel_err(got, ref):
    assert torch.isfinite(got).all()
    return ((got.double() - ref).norm() / ref.norm()).item()


def per_modality(gen, n_modalities, *shape):
    """``(M, *shape)`` when ``n_modalities``, else ``shape``, float64 random."""
    lead = (n_modalities,) if n_modalities else ()
    return torch.randn(*lead, *shape, generator=gen, dtype=torch.float64)


def pick(param, modality):
    """``param`` per position ``(b, l, ...)`` if given per modality, else as is."""
    return param if modality is None else param[modality]


CHANNEL_CASES = [
    dict(batch=2, dim=7, state=5, length=9, n_modalities=None),
    dict(batch=3, dim=12, state=16, length=6, n_modalities=3),
    dict(batch=1, dim=33, state=3, length=5, n_modalities=2, z=False, bias=False),
]


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
@pytest.mark.parametrize("case", CHANNEL_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_selective_state_update_channels(gen, backend, dtype, tol, case):
    b, d, n, length, M = case["batch"], case["dim"], case["state"], case["length"], case["n_modalities"]
    u = torch.randn(b, d, length, generator=gen, dtype=torch.float64)
    delta = 0.5 * torch.randn(b, d, length, generator=gen, dtype=torch.float64) - 1
    B, C = (torch.randn(b, n, length, generator=gen, dtype=torch.float64) for _ in range(2))
    z = torch.randn(b, d, length, generator=gen, dtype=torch.float64) if case.get("z", True) else None
    A = -torch.exp(per_modality(gen, M, d, n))
    D = per_modality(gen, M, d)
    bias = 0.3 * per_modality(gen, M, d) if case.get("bias", True) else None
    modality = torch.randint(0, M, (b, length), generator=gen) if M else None
    low = {k: None if v is None else v.to(dtype).double() for k, v in dict(u=u, delta=delta, B=B, C=C, z=z).items()}

    shifted = low["delta"] + (0 if bias is None else pick(bias, modality).mT if M else bias[:, None])
    y = naive_selective_scan(low["u"], shifted, A, low["B"], low["C"], delta_softplus=True, return_last_state=True,
                             modality=modality)
    out = y[0] + low["u"] * (pick(D, modality).mT if M else D[:, None])
    if z is not None:
        out = out * F.silu(low["z"])

    state = torch.zeros(b, d, n, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=DEVICE)
    params = {k: None if v is None else v.to(DEVICE, state.dtype) for k, v in dict(A=A, D=D, dt_bias=bias).items()}
    steps = []
    inputs = {k: None if v is None else v.to(DEVICE, dtype) for k, v in dict(u=u, delta=delta, B=B, C=C, z=z).items()}
    for t in range(length):
        at = {k: None if v is None else v[..., t] for k, v in inputs.items()}
        steps.append(ops.selective_state_update(state, at["u"], at["delta"], params["A"], at["B"], at["C"],
                                                D=params["D"], z=at["z"], dt_bias=params["dt_bias"], dt_softplus=True,
                                                modality=None if M is None else modality[:, t].to(DEVICE),
                                                backend=backend))
    assert steps[0].dtype == dtype
    assert rel_err(torch.stack(steps, -1).cpu(), out) <= tol
    assert rel_err(state.cpu(), y[1]) <= tol


HEAD_CASES = [
    dict(batch=2, heads=4, headdim=3, groups=2, state=5, length=7, n_modalities=None, D_per_channel=True),
    dict(batch=2, heads=3, headdim=8, groups=1, state=16, length=5, n_modalities=2, D_per_channel=False),
    dict(batch=1, heads=6, headdim=5, groups=3, state=7, length=4, n_modalities=3, D_per_channel=True),
]


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_selective_state_update_heads(gen, backend, dtype, tol, case):
    b, h, p, g, n, length, M = (case[k] for k in ("batch", "heads", "headdim", "groups", "state", "length",
                                                    "n_modalities"))
    x = torch.randn(b, length, h, p, generator=gen, dtype=torch.float64)
    dt = 0.5 * torch.randn(b, length, h, generator=gen, dtype=torch.float64) - 1
    B, C = (torch.randn(b, length, g, n, generator=gen, dtype=torch.float64) for _ in range(2))
    A = -torch.exp(per_modality(gen, M, h))
    D = per_modality(gen, M, h, p) if case["D_per_channel"] else per_modality(gen, M, h)
    bias = 0.3 * per_modality(gen, M, h)
    modality = torch.randint(0, M, (b, length), generator=gen) if M else None
    low = {k: v.to(dtype).double() for k, v in dict(x=x, dt=dt, B=B, C=C).items()}

    y, last = naive_ssd_scan(low["x"], low["dt"] + pick(bias, modality), A, low["B"], low["C"], dt_softplus=True,
                             return_final_states=True, modality=modality)
    D_pos = pick(D, modality)
    out = y + low["x"] * (D_pos if case["D_per_channel"] else D_pos[..., None])

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    state = torch.zeros(b, h, p, n, dtype=wide, device=DEVICE)
    A_exp = A.to(DEVICE, wide)[..., None, None].expand(*A.shape, p, n)
    D_exp = D.to(DEVICE, wide) if case["D_per_channel"] else D.to(DEVICE, wide)[..., None].expand(*D.shape, p)
    bias_exp = bias.to(DEVICE, wide)[..., None].expand(*bias.shape, p)
    steps = []
    for t in range(length):
        dt_t = dt[:, t].to(DEVICE, dtype)[..., None].expand(b, h, p)
        steps.append(ops.selective_state_update(state, x[:, t].to(DEVICE, dtype), dt_t, A_exp,
                                                B[:, t].to(DEVICE, dtype), C[:, t].to(DEVICE, dtype), D=D_exp,
                                                dt_bias=bias_exp, dt_softplus=True,
                                                modality=None if M is None else modality[:, t].to(DEVICE),
                                                backend=backend))
    assert rel_err(torch.stack(steps, 1).cpu(), out) <= tol
    assert rel_err(state.cpu(), last) <= tol


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
@pytest.mark.parametrize("n_modalities, bias", [(None, True), (3, True), (2, False)])
def test_conv_state_update(gen, backend, dtype, tol, n_modalities, bias):
    b, c, k, length = 3, 37, 4, 7
    x = torch.randn(b, length, c, generator=gen, dtype=torch.float64).to(dtype).double()
    weight = per_modality(gen, n_modalities, c, k)
    b_param = per_modality(gen, n_modalities, c) if bias else None
    modality = torch.randint(0, n_modalities, (b, length), generator=gen) if n_modalities else None
    padded = F.pad(x, (0, 0, k - 1, 0))
    ref = sum(padded[:, j:j + length] * pick(weight[..., j], modality) for j in range(k))
    if bias:
        ref = ref + pick(b_param, modality)
    ref = F.silu(ref)

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    conv_state = torch.zeros(b, c, k, dtype=dtype, device=DEVICE)
    w, bb = weight.to(DEVICE, wide), None if b_param is None else b_param.to(DEVICE, wide)
    x_in = x.to(DEVICE, dtype)
    steps = [ops.conv_state_update(x_in[:, t], conv_state, w, bb, "silu",
                                   modality=None if modality is None else modality[:, t].to(DEVICE), backend=backend)
             for t in range(length)]
    assert rel_err(torch.stack(steps, 1).cpu(), ref) <= tol
    torch.testing.assert_close(conv_state[..., -1].cpu().double(), x[:, -1], rtol=0, atol=0)
