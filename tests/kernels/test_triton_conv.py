"""The causal convolution (:func:`momkit.ops.causal_conv1d`) of every backend against a per-position float64 loop,
forward and backward: shared and routed weights and biases, packed documents (one of a single position), a
length and a channel count that the kernels' blocks do not divide, inputs laid out ``(b, c, l)`` or ``(b, l, c)``.
The reference backend runs in float64 (1e-10); the Triton kernels in float32 (1e-5) and on bfloat16 inputs
(1e-2), under ``TRITON_INTERPRET=1`` on the CPU or on a CUDA GPU.
"""

import pytest
import torch

from momkit import ops
from tests.kernels.test_decode import BACKENDS, DEVICE, per_modality, rel_err

CASES = [
    dict(k=4, n_modalities=None, packed=False, bias=True),
    dict(k=4, n_modalities=None, packed=True, bias=True),
    dict(k=4, n_modalities=3, packed=True, bias=True),
    dict(k=2, n_modalities=2, packed=False, bias=False),
    dict(k=3, n_modalities=2, packed=True, bias="shared"),
]


def naive_conv(x, weight, bias, seq_idx, modality):
    """``out[:, c, t] = bias + sum_j w[c, j] x[:, c, t - k + 1 + j]`` position by position, in float64."""
    b, c, length = x.shape
    k = weight.shape[-1]
    columns = []
    for t in range(length):
        out = torch.zeros(b, c, dtype=x.dtype)
        if bias is not None:
            out = out + (bias if bias.dim() == 1 else bias[modality[:, t]])
        for j in range(k):
            s = t - k + 1 + j
            if s < 0:
                continue
            w = weight[:, j] if weight.dim() == 2 else weight[modality[:, t], :, j]
            keep = torch.ones(b, 1, dtype=x.dtype) if seq_idx is None else (seq_idx[:, s] == seq_idx[:, t])[:, None]
            out = out + keep * w * x[:, :, s]
        columns.append(out)
    return torch.stack(columns, -1)


def documents(b, length, gen):
    """``(b, l)`` int32 document ids: runs of random lengths, a one-position document in every row."""
    ids = torch.zeros(b, length, dtype=torch.int32)
    for row in range(b):
        cuts = sorted(torch.randperm(length - 2, generator=gen)[:4].add(1).tolist() + [length // 2, length // 2 + 1])
        for cut in cuts:
            ids[row, cut:] += 1
    return ids


@pytest.mark.parametrize("backend, dtype, tol", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("layout", ["bcl", "blc"])
def test_causal_conv1d(gen, backend, dtype, tol, case, layout):
    b, c, length, k, m = 2, 70, 37, case["k"], case["n_modalities"]
    x = torch.randn(b, c, length, generator=gen, dtype=torch.float64).to(dtype).double()
    weight = per_modality(gen, m, c, k)
    bias = None if not case["bias"] else per_modality(gen, None if case["bias"] == "shared" else m, c)
    modality = torch.randint(0, m, (b, length), generator=gen) if m else None
    seq_idx = documents(b, length, gen) if case["packed"] else None
    dout = torch.randn(b, c, length, generator=gen, dtype=torch.float64)

    leaves = [t.clone().requires_grad_(True) for t in (x, weight) + ((bias,) if bias is not None else ())]
    ref = naive_conv(leaves[0], leaves[1], leaves[2] if bias is not None else None, seq_idx, modality)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    device_x = x.to(DEVICE, dtype)
    if layout == "blc":
        device_x = device_x.transpose(1, 2).contiguous().transpose(1, 2)
    got_leaves = [device_x.detach().requires_grad_(True), weight.to(DEVICE, wide).requires_grad_(True)]
    if bias is not None:
        got_leaves.append(bias.to(DEVICE, wide).requires_grad_(True))
    out = ops.causal_conv1d(got_leaves[0], got_leaves[1], got_leaves[2] if bias is not None else None,
                            None if seq_idx is None else seq_idx.to(DEVICE),
                            modality=None if modality is None else modality.to(DEVICE), backend=backend)
    assert out.dtype == dtype and out.shape == (b, c, length)
    assert rel_err(out.detach().cpu(), ref.detach()) <= tol
    grads = torch.autograd.grad(out, got_leaves, dout.to(DEVICE, dtype))
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        assert got.dtype == got_leaves[("x", "weight", "bias").index(name)].dtype, name
        assert rel_err(got.cpu(), want) <= tol, name


def test_causal_conv1d_checks(gen):
    x, weight = torch.randn(2, 5, 8, generator=gen), torch.randn(5, 4, generator=gen)
    with pytest.raises(ValueError, match=r"weight has shape \(3, 5, 4\); expected \(c, k\) = \(5, \*\)"):
        ops.causal_conv1d(x, weight.expand(3, 5, 4))
    with pytest.raises(ValueError, match=r"seq_idx has shape \(2, 7\); expected \(b, l\) = \(2, 8\)"):
        ops.causal_conv1d(x, weight, seq_idx=torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="seq_idx has dtype torch.float32; expected an integer dtype"):
        ops.causal_conv1d(x, weight, seq_idx=torch.zeros(2, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("blocks", [(32, 128), (128, 16)], ids=lambda b: f"c{b[0]}-l{b[1]}")
def test_causal_conv1d_at_other_block_sizes(gen, blocks, monkeypatch):
    """The compiled kernels, forward and backward, at block sizes other than the defaults."""
    from momkit.kernels.triton import conv

    monkeypatch.setattr(conv, "BLOCK_C", blocks[0])
    monkeypatch.setattr(conv, "BLOCK_L", blocks[1])
    for case in CASES:
        test_causal_conv1d(gen, "triton", torch.float32, 1e-5, case, "blc")
