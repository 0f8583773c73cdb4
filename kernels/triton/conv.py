"""The causal convolution of :func:`momkit.ops.causal_conv1d` in Triton: masking by ``seq_idx`` in the kernel.

Forward: one program per batch row, block of channels and block of positions sums the ``k`` taps in float32,
each tap's input zero before the row's start and, with ``seq_idx``, where its document differs from the output
position's; with routed weights each position reads its own modality's taps. Backward: one program per the same
tile computes the input gradient (the taps transposed: position ``s`` collects ``dy`` from ``s .. s + k - 1``,
under the same masks) and the tile's partial sums of the weight and bias gradients (per modality when routed),
which a sum over tiles completes. Outputs and input gradients are laid out ``(b, l, c)`` in memory (the layout
the blocks' activations have), seen as ``(b, c, l)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momkit.kernels.triton.tiling import cdiv

BLOCK_C, BLOCK_L = 64, 32


@triton.jit
def _tap(x, seq, pb, cs, src, s_out, ok, cm, sxb, sxc, sxl, ssb, ssl, HAS_SEQ: tl.constexpr):
    """``(BLOCK_C, BLOCK_L)`` float32 inputs at positions ``src``, zero where masked (or of another document)."""
    if HAS_SEQ:
        ok = ok & (tl.load(seq + pb * ssb + src * ssl, mask=ok, other=-1) == s_out)
    return tl.load(x + pb * sxb + cs[:, None] * sxc + src[None, :] * sxl, mask=cm[:, None] & ok[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _weight(w, m, cs, j, cm, ok, swm, swc, swk, ROUTED: tl.constexpr):
    """Tap ``j``'s weights: ``(BLOCK_C, 1)`` shared, or ``(BLOCK_C, BLOCK_L)`` of each position's modality ``m``."""
    if ROUTED:
        taps = tl.load(w + m[None, :] * swm + cs[:, None] * swc + j * swk, mask=cm[:, None] & ok[None, :], other=0.0)
    else:
        taps = tl.load(w + cs * swc + j * swk, mask=cm, other=0.0)[:, None]
    return taps.to(tl.float32)


@triton.jit
def _tile(seq, mod, C, L, ssb, ssl, smb, sml, HAS_SEQ: tl.constexpr, ROUTED: tl.constexpr,
          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """This program's batch row, channels and positions with their masks, and the positions' modalities and
    documents (the positions themselves where there are none)."""
    pb, pc, pl = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cs = pc * BLOCK_C + tl.arange(0, BLOCK_C)
    ts = pl * BLOCK_L + tl.arange(0, BLOCK_L)
    cm, tm = cs < C, ts < L
    m = tl.load(mod + pb * smb + ts * sml, mask=tm, other=0) if ROUTED else ts
    s = tl.load(seq + pb * ssb + ts * ssl, mask=tm, other=0) if HAS_SEQ else ts
    return pb, pl, cs, ts, cm, tm, m, s


@triton.jit
def _forward_kernel(x, w, bias, seq, mod, y, C, L,
                    sxb, sxc, sxl, swm, swc, swk, sbm, sbc, ssb, ssl, smb, sml, syb, syc, syl,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, ROUTED: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    pb, _, cs, ts, cm, tm, m, s_out = _tile(seq, mod, C, L, ssb, ssl, smb, sml, HAS_SEQ, ROUTED, BLOCK_C, BLOCK_L)
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        if ROUTED:
            acc += tl.load(bias + m[None, :] * sbm + cs[:, None] * sbc, mask=cm[:, None] & tm[None, :],
                           other=0.0).to(tl.float32)
        else:
            acc += tl.load(bias + cs * sbc, mask=cm, other=0.0).to(tl.float32)[:, None]
    for j in tl.static_range(K):
        src = ts - (K - 1) + j
        ok = tm & (src >= 0)
        acc += _weight(w, m, cs, j, cm, tm, swm, swc, swk, ROUTED) * \
            _tap(x, seq, pb, cs, src, s_out, ok, cm, sxb, sxc, sxl, ssb, ssl, HAS_SEQ)
    tl.store(y + pb * syb + cs[:, None] * syc + ts[None, :] * syl, acc.to(y.dtype.element_ty),
             mask=cm[:, None] & tm[None, :])


@triton.jit
def _backward_kernel(x, w, seq, mod, dy, dx, dw_part, db_part, C, L, M, n_tiles,
                     sxb, sxc, sxl, swm, swc, swk, ssb, ssl, smb, sml, sdb, sdc, sdl, sgb, sgc, sgl,
                     K: tl.constexpr, HAS_SEQ: tl.constexpr, ROUTED: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    pb, pl, cs, ts, cm, tm, m_here, s_here = _tile(seq, mod, C, L, ssb, ssl, smb, sml, HAS_SEQ, ROUTED, BLOCK_C,
                                                   BLOCK_L)
    # the input gradient at positions ts: output t = s + k - 1 - j took input s through tap j
    acc = tl.zeros((BLOCK_C, BLOCK_L), dtype=tl.float32)
    for j in tl.static_range(K):
        t = ts + (K - 1) - j
        ok = tm & (t < L)
        if HAS_SEQ:
            ok = ok & (tl.load(seq + pb * ssb + t * ssl, mask=ok, other=-1) == s_here)
        m = tl.load(mod + pb * smb + t * sml, mask=ok, other=0) if ROUTED else t
        grad = tl.load(dy + pb * sdb + cs[:, None] * sdc + t[None, :] * sdl, mask=cm[:, None] & ok[None, :],
                       other=0.0).to(tl.float32)
        acc += _weight(w, m, cs, j, cm, ok, swm, swc, swk, ROUTED) * grad
    tl.store(dx + pb * sgb + cs[:, None] * sgc + ts[None, :] * sgl, acc.to(dx.dtype.element_ty),
             mask=cm[:, None] & tm[None, :])
    # this tile's share of the weight and bias gradients, per modality when routed
    grad = tl.load(dy + pb * sdb + cs[:, None] * sdc + ts[None, :] * sdl, mask=cm[:, None] & tm[None, :],
                   other=0.0).to(tl.float32)
    tile = pb * n_tiles + pl
    for j in tl.static_range(K):
        src = ts - (K - 1) + j
        product = grad * _tap(x, seq, pb, cs, src, s_here, tm & (src >= 0), cm, sxb, sxc, sxl, ssb, ssl, HAS_SEQ)
        if ROUTED:
            for k in range(M):
                part = tl.sum(tl.where(m_here[None, :] == k, product, 0.0), axis=1)
                tl.store(dw_part + ((tile * M + k) * C + cs) * K + j, part, mask=cm)
        else:
            tl.store(dw_part + (tile * C + cs) * K + j, tl.sum(product, axis=1), mask=cm)
    if ROUTED:
        for k in range(M):
            tl.store(db_part + (tile * M + k) * C + cs, tl.sum(tl.where(m_here[None, :] == k, grad, 0.0), axis=1),
                     mask=cm)
    else:
        tl.store(db_part + tile * C + cs, tl.sum(grad, axis=1), mask=cm)


def _channels_last(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty ``(b, c, l)`` tensor of ``dtype`` laid out ``(b, l, c)`` in memory."""
    b, c, length = x.shape
    return torch.empty(b, length, c, dtype=dtype, device=x.device).transpose(1, 2)


def _grid(x: torch.Tensor) -> tuple[int, int, int]:
    b, c, length = x.shape
    return b, cdiv(c, BLOCK_C), cdiv(length, BLOCK_L)


def _per_modality(weight: torch.Tensor, bias: torch.Tensor | None):
    """The number of weight sets (1 when shared) and the strides ``(modality, channel[, tap])`` of ``weight``
    and ``bias``, a shared one of the two read through a zero modality stride when the other is routed."""
    routed = weight.dim() == 3 or (bias is not None and bias.dim() == 2)
    groups = weight.shape[0] if weight.dim() == 3 else bias.shape[0] if routed else 1
    w_strides = weight.stride() if weight.dim() == 3 else (0, *weight.stride())
    b_strides = (0, 0) if bias is None else bias.stride() if bias.dim() == 2 else (0, *bias.stride())
    return routed, groups, w_strides, b_strides


class CausalConv1dFn(torch.autograd.Function):
    """The forward and backward kernels, as an autograd function over ``x, weight, bias``."""

    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, modality):
        b, c, length = x.shape
        routed, _, w_strides, b_strides = _per_modality(weight, bias)
        y = _channels_last(x, x.dtype)
        # an absent tensor's pointer is never read (its flag is off); any tensor stands in for it
        _forward_kernel[_grid(x)](
            x, weight, weight if bias is None else bias, x if seq_idx is None else seq_idx,
            x if modality is None else modality, y, c, length, *x.stride(), *w_strides, *b_strides,
            *(seq_idx.stride() if seq_idx is not None else (0, 0)),
            *(modality.stride() if modality is not None else (0, 0)), *y.stride(),
            K=weight.shape[-1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, ROUTED=routed,
            BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L)
        ctx.save_for_backward(x, weight, bias, seq_idx, modality)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, seq_idx, modality = ctx.saved_tensors
        b, c, length = x.shape
        routed, groups, w_strides, _ = _per_modality(weight, bias)
        k = weight.shape[-1]
        grid = _grid(x)
        dx = _channels_last(x, x.dtype)
        dw_part = torch.empty(b * grid[2], groups, c, k, dtype=torch.float32, device=x.device)
        db_part = torch.empty(b * grid[2], groups, c, dtype=torch.float32, device=x.device)
        _backward_kernel[grid](
            x, weight, x if seq_idx is None else seq_idx, x if modality is None else modality, dy, dx, dw_part,
            db_part, c, length, groups, grid[2], *x.stride(), *w_strides,
            *(seq_idx.stride() if seq_idx is not None else (0, 0)),
            *(modality.stride() if modality is not None else (0, 0)), *dy.stride(), *dx.stride(),
            K=k, HAS_SEQ=seq_idx is not None, ROUTED=routed, BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L)
        dw, db = dw_part.sum(0), db_part.sum(0)
        dw = (dw if weight.dim() == 3 else dw.sum(0)).to(weight.dtype)
        db = None if bias is None else (db if bias.dim() == 2 else db.sum(0)).to(bias.dtype)
        return dx, dw, db, None, None


def causal_conv1d(*, x, weight, bias, seq_idx, modality):
    """:func:`momkit.ops.causal_conv1d` through the kernels above."""
    return CausalConv1dFn.apply(x, weight, bias, seq_idx, modality)
