"""Mamba-2 state-space duality (SSD) scan in Triton: nine kernels wired by one autograd function.

Shapes: ``x, z, out: (b, l, h, p)``; ``dt: (b, l, h)``; ``A: (h,)``, or ``(M, h)`` indexed by
``modality: (b, l)``; ``B, C: (b, l, g, n)``, each group shared by ``h / g`` heads; ``D: (h,)`` or ``(h, p)``;
``dt_bias: (h,)``; ``initial_states`` and the final state ``(b, h, p, n)``; ``seq_idx: (b, l)``. ``x, dt, B, C,
z`` may be float32, bfloat16 or float16; every kernel computes in float32. The operands of the matrix products
(``tl.dot``, float32 accumulation) are rounded to the inputs' dtype when ``x``, ``B`` and ``C`` share a 16-bit
one, and stay float32, multiplied with IEEE precision (no tf32), otherwise.

The algorithm is the chunked one of ``momkit.kernels.reference.ssd``. The sequence is cut into chunks of
``chunk_size`` positions (the last one shorter); with ``a_t = dt'_t A`` and ``cs`` its cumulative sum inside
each chunk, every decay is ``exp`` of a difference of ``cs`` inside one chunk, ``L_ij = exp(cs_i - cs_j)``
for ``j <= i``, ``e_i = exp(cs_i)`` from the chunk's start and ``w_j = exp(cs_end - cs_j)`` to its end.
Forward:

1. ``_dt_fwd_kernel``, per chunk and block of heads: ``dt' = softplus(dt + dt_bias)`` (or ``dt + dt_bias``),
   the per-position ``A`` (gathered through ``modality``), ``cs``, and, with ``seq_idx``, the document run of
   each position inside its chunk (the number of document starts from the chunk's first position to it).
   ``dt'`` and ``cs`` are written as ``(b, h, l)`` float32, the runs as ``(b, l)`` int32.
2. ``_state_fwd_kernel``, per batch row, head and ``(p, n)`` tile of the state, the chunks in order:
   ``s <- exp(cs_end) s + (w dt' x)^T @ B``, one ``tl.dot`` per block of positions into the tile of ``s`` held
   in registers. The state entering each chunk, and the final one, go to ``states (b, c + 1, h, p, n)``
   float32.
3. ``_cb_kernel``, per chunk, group and block of rows: ``C_i . B_j`` for ``j <= i`` in one document, zero
   elsewhere, as ``cb (b, c, g, T, T)`` float32, once for all the heads of the group.
4. ``_out_kernel``, per chunk, head and block of rows: ``y_i = e_i C_i @ s^T + sum_{j <= i} L_ij cb_ij dt'_j
   x_j + D x_i`` and ``out = y silu(z)``.

Packed documents (``seq_idx``: every change starts a document, even back to an earlier id) become masks of
the runs: ``j`` reaches ``i`` in the same run only, a position reaches the chunk's end from its last run only,
the carried state reaches the first run only and crosses the chunk only when it holds a single run. So the
initial state reaches the first document only.

Backward, with ``dy = dout silu(z)`` and ``G_k`` the gradient of the state after chunk ``k``; ``cb`` is
recomputed (kernel 3), and with ``z`` kernel 4 runs again to recompute ``y`` and write ``dz`` instead of ``out``:

5. ``_state_bwd_kernel``, the chunks in reverse: ``G_{k-1} = exp(cs_end) G_k + (e dy)^T @ C``, from the final
   state's gradient; ``G`` goes to ``(b, c, h, p, n)`` float32, its last value is the initial state's gradient,
   and ``exp(cs_end) <G_k, s_k>`` (the carried state's share of the gradient of ``a``) is summed into
   ``(b, h, c)``.
6. ``_dx_kernel``, per chunk, head and block of columns ``j``, over the rows ``i >= j``: ``d(dt' x)_j =
   sum_i L_ij cb_ij dy_i + w_j G B_j`` gives ``dx`` and ``x . d(dt' x)``; each pair's
   ``P_ij = L_ij cb_ij (dy_i . dt'_j x_j)`` is summed over ``i`` (per column, kept) and over ``j`` (per row,
   added into a buffer); and ``u_j = w_j dt'_j x_j . G B_j``.
7. ``_dcb_kernel``, per chunk, block of rows and run of heads of one group: ``dcb_ij = sum_h L_ij
   (dy_i . dt'_j x_j)`` within documents, the gradient of ``cb`` summed over the heads of the group.
8. ``_dbc_kernel``, launched once for ``dC`` and once for ``dB``, per chunk, block of positions and run of
   heads: ``dC_i = sum_j dcb_ij B_j + sum_h e_i s_h^T dy_i`` and ``dB_j = sum_i dcb_ij C_i + sum_h w_j
   G_h^T dt'_j x_j``, the per-head terms a loop over heads, as one product with the heads stacked along
   ``p``; it also writes ``C_i . e_i s^T dy_i`` per head, the output's share of the gradient of ``cs_i``
   through the carried state.
9. ``_dt_bwd_kernel``, per chunk and block of heads: ``da_t`` (the gradient of ``a_t``) is the reverse
   cumulative sum of the row terms (``C . e s^T dy`` and the row sums of ``P``) minus the column sums of
   ``P``, plus the carried state's share and the sum of ``u_j`` over ``j < t``. Each pair ``P_ij`` enters
   both sums with the same value, so their cancellation leaves float32 rounding only (computing the row and
   column terms from differently rounded bfloat16 products would not); then ``d dt' = x . d(dt' x) + A da``,
   ``dA = sum dt' da``, the softplus and ``d dt_bias``.

Saved for the backward: the inputs, ``dt'``, ``cs``, the runs and the chunk-boundary states; no tensor of
``(b, l, h, p)`` elements is kept, and every product inside a chunk is recomputed. Without gradients nothing is
saved. Sums across programs (``dB`` and ``dC`` over the runs of heads of a group, ``Tiling.dbc_heads`` per
program; ``dcb`` over runs of ``Tiling.dcb_heads`` heads; the row sums of ``P`` over column blocks; ``dD``,
``dA``, ``d dt_bias`` over positions; the carried state's share over state tiles) are first reduced inside
each program and then added into zeroed float32 buffers with atomic adds: their order, and so their last bits,
vary from run to run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from momkit.kernels.triton.tiling import cdiv, check_tiling, pow2, refuse_float64

_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@dataclass(frozen=True)
class Tiling:
    """Block sizes, warps and pipeline stages of the kernels (named as in the module docstring).

    Blocks of positions and of the state are powers of two of at least 16 (``tl.dot``'s smallest), each clamped
    to the problem (a chunk of 20 positions runs in blocks of at most 32). The chunk kernels hold whole rows of
    ``p`` and ``n``, padded to powers of two.

    Attributes:
        block_h: heads per program of the step-size kernels; a power of two.
        state_p: rows (head dim) of the state tile of a state-passing program.
        state_n: columns (state dim) of that tile.
        state_t: positions per ``tl.dot`` of the state-passing kernels; at least the chunk length makes one
            product per chunk and lets the loads of the next chunk overlap it.
        state_warps: warps per state-passing program.
        state_stages: software-pipeline stages of the state-passing kernels.
        cb_m: rows per program of the ``C B^T`` kernel.
        cb_k: columns per step of its loop.
        cb_warps: warps per ``C B^T`` program.
        out_m: rows per program of the output kernel (also the ``dz`` pass).
        out_k: columns per step of its loop.
        out_warps: warps per output program.
        out_stages: its pipeline stages.
        dx_m: columns ``j`` per program of the ``dx`` kernel.
        dx_k: rows ``i`` per step of its loop.
        dx_warps: warps per ``dx`` program.
        dx_stages: its pipeline stages.
        dcb_m: rows per program of the ``dcb`` kernel.
        dcb_k: columns per step of its loop.
        dcb_warps: warps per ``dcb`` program.
        dcb_heads: heads of one group that a ``dcb`` program sums, one after another; any positive number.
        dcb_stages: pipeline stages of the ``dcb`` kernel.
        dbc_m: positions per program of the ``dB, dC`` kernel.
        dbc_k: positions per step of its loop.
        dbc_warps: warps per ``dB, dC`` program.
        dbc_heads: heads of one group that a ``dB, dC`` program sums; any positive number.
        dbc_stages: pipeline stages of the ``dB, dC`` kernel.
    """

    block_h: int = 16
    state_p: int = 32
    state_n: int = 64
    state_t: int = 256
    state_warps: int = 4
    state_stages: int = 2
    cb_m: int = 64
    cb_k: int = 64
    cb_warps: int = 4
    out_m: int = 64
    out_k: int = 32
    out_warps: int = 4
    out_stages: int = 3
    dx_m: int = 64
    dx_k: int = 64
    dx_warps: int = 4
    dx_stages: int = 2
    dcb_m: int = 64
    dcb_k: int = 64
    dcb_warps: int = 4
    dcb_heads: int = 8
    dcb_stages: int = 2
    dbc_m: int = 64
    dbc_k: int = 32
    dbc_warps: int = 4
    dbc_heads: int = 32
    dbc_stages: int = 3

    def __post_init__(self):
        check_tiling(self, counts=("stages", "heads"), small=("block_h",))


def default_tiling(batch: int, heads: int) -> Tiling:
    """The tiling for a call: :class:`Tiling`'s defaults (each kernel's fastest of the tilings timed on an H200
    at the Mamba-2 shapes ``p = 64``, ``n = 128``, chunks of 256, bfloat16), except that with fewer than 128
    (batch row, head) pairs the state-passing programs take tiles of 16 rows in two warps, so that enough of
    them run to fill the GPU."""
    if batch * heads < 128:
        return Tiling(state_p=16, state_warps=2)
    return Tiling()


@triton.jit
def _round_bf16(v):
    """``v`` rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _narrow(v, DTYPE: tl.constexpr):
    """``v`` converted to ``DTYPE`` for a store, rounded to nearest (the interpreter alone would truncate to
    bfloat16)."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        v = _round_bf16(v)
    return v.to(DTYPE)


@triton.jit
def _dot(a, b, acc, DT: tl.constexpr, PREC: tl.constexpr):
    """``a @ b + acc`` (``acc`` may be None) with the operands rounded to ``DT``, accumulated in float32.

    Triton's interpreter multiplies bfloat16 operands wrongly and rounds to bfloat16 by truncation; there the
    operands are rounded to nearest and multiplied in float32, which gives the GPU's products.
    """
    if _INTERPRETED and DT == tl.bfloat16:
        a = _round_bf16(a)
        b = _round_bf16(b)
    else:
        a = a.to(DT)
        b = b.to(DT)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _softplus(raw):
    """``log(1 + exp(raw))``, exact also for very negative ``raw`` (``log1p`` by the ``u = 1 + e`` trick),
    and ``raw`` itself above 20 as in ``torch.nn.functional.softplus``."""
    e = tl.exp(-tl.abs(raw))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * e / (u - 1.0))
    return tl.where(raw > 20.0, raw, tl.maximum(raw, 0.0) + log1p)


@triton.jit
def _gated_grad(dout_ptr, z_ptr, offs, mask, HAS_Z: tl.constexpr):
    """``dy = dout silu(z)`` (or ``dout``) of a tile, in float32."""
    dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = dy * gate * tl.sigmoid(gate)
    return dy


@triton.jit
def _skip(D_ptr, head, dim, cols, col_mask, D_PER_P: tl.constexpr):
    """``D`` of one head as a ``(1, BLOCK_P)`` row."""
    if D_PER_P:
        d = tl.load(D_ptr + head * dim + cols, mask=col_mask, other=0.0)
    else:
        d = tl.load(D_ptr + head + cols * 0, mask=col_mask, other=0.0)
    return d[None, :]


@triton.jit
def _chunk_bounds(k, chunk, length, cs_row, runs_row, HAS_SEQ: tl.constexpr):
    """Chunk ``k``'s end (exclusive), ``cs`` at its last position, the decay across it (0 where the carried
    state does not cross it) and the run of its last position."""
    end = tl.minimum(k * chunk + chunk, length)
    cs_end = tl.load(cs_row + end - 1)
    decay = tl.exp(cs_end)
    run_end = 0
    if HAS_SEQ:
        run_end = tl.load(runs_row + end - 1)
        decay = tl.where(run_end == 0, decay, 0.0)
    return end, cs_end, decay, run_end


@triton.jit
def _head_block(pid, n_rows, heads, groups, HEADS: tl.constexpr):
    """Row block, chunk, group and head range ``[first, stop)`` of a program of the ``dcb`` and ``dB, dC`` kernels."""
    per_group = heads // groups
    splits = tl.cdiv(per_group, HEADS)
    rb = pid % n_rows
    hb = (pid // n_rows) % (groups * splits)
    k = pid // (n_rows * groups * splits)
    group = hb // splits
    first = group * per_group + (hb % splits) * HEADS
    stop = tl.minimum(first + HEADS, (group + 1) * per_group)
    return rb, k, group, first, stop


@triton.jit
def _dt_fwd_kernel(dt_ptr, bias_ptr, A_ptr, mod_ptr, seq_ptr, dtp_ptr, cs_ptr, runs_ptr,
                   length, heads, chunk,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MOD: tl.constexpr, HAS_SEQ: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    k = tl.program_id(0)
    hb = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    pos = tl.arange(0, BLOCK_T)
    t = k * chunk + pos
    tmask = (pos < chunk) & (t < length)
    hh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < heads
    mask = tmask[:, None] & hmask[None, :]
    raw = tl.load(dt_ptr + (batch * length + t[:, None]) * heads + hh[None, :], mask=mask, other=0.0)
    raw = raw.to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + hh, mask=hmask, other=0.0)[None, :]
    if SOFTPLUS:
        step = _softplus(raw)
    else:
        step = raw
    step = tl.where(mask, step, 0.0)
    if HAS_MOD:
        m = tl.load(mod_ptr + batch * length + t, mask=tmask, other=0)
        A = tl.load(A_ptr + m[:, None] * heads + hh[None, :], mask=mask, other=0.0)
    else:
        A = tl.load(A_ptr + hh, mask=hmask, other=0.0)[None, :]
    offs = (batch * heads + hh[None, :]) * length + t[:, None]
    tl.store(dtp_ptr + offs, step, mask=mask)
    tl.store(cs_ptr + offs, tl.cumsum(step * A, axis=0), mask=mask)
    if HAS_SEQ:
        if hb == 0:
            row = seq_ptr + batch * length
            now = tl.load(row + t, mask=tmask, other=0)
            before = tl.load(row + t - 1, mask=tmask & (t > 0), other=0)
            starts = (tmask & (t > 0) & (now != before)).to(tl.int32)
            tl.store(runs_ptr + batch * length + t, tl.cumsum(starts, axis=0), mask=tmask)


@triton.jit
def _state_fwd_step(x_base, B_base, cs_row, dtp_row, runs_row, t0, end, cs_end, run_end, s, pp, nn, pmask, nmask,
                    heads, dim, state, groups,
                    HAS_SEQ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_T: tl.constexpr):
    """``s + (w dt' x)^T @ B`` over the positions ``[t0, min(t0 + BLOCK_T, end))`` of one chunk."""
    t = t0 + tl.arange(0, BLOCK_T)
    tmask = t < end
    w = tl.exp(cs_end - tl.load(cs_row + t, mask=tmask, other=0.0))
    w = w * tl.load(dtp_row + t, mask=tmask, other=0.0)
    if HAS_SEQ:
        w = tl.where(tl.load(runs_row + t, mask=tmask, other=-1) == run_end, w, 0.0)
    xT = tl.load(x_base + t[None, :] * (heads * dim) + pp[:, None], mask=pmask[:, None] & tmask[None, :], other=0.0)
    Bt = tl.load(B_base + t[:, None] * (groups * state) + nn[None, :], mask=tmask[:, None] & nmask[None, :],
                 other=0.0)
    return _dot(xT.to(tl.float32) * w[None, :], Bt, s, DT, PREC)


@triton.jit
def _state_fwd_kernel(x_ptr, B_ptr, dtp_ptr, cs_ptr, runs_ptr, init_ptr, states_ptr,
                      length, heads, dim, state, groups, chunk, n_chunks,
                      HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      WHOLE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    p_blocks = tl.cdiv(dim, BLOCK_P)
    pp = (pid % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = (pid // p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = pp < dim
    nmask = nn < state
    tile = pp[:, None] * state + nn[None, :]
    tile_mask = pmask[:, None] & nmask[None, :]
    group = head // (heads // groups)
    slot = heads * dim * state
    base = states_ptr + (batch * (n_chunks + 1) * heads + head) * dim * state
    cs_row = cs_ptr + (batch * heads + head) * length
    dtp_row = dtp_ptr + (batch * heads + head) * length
    runs_row = runs_ptr
    if HAS_SEQ:
        runs_row += batch * length
    x_base = x_ptr + (batch * length * heads + head) * dim
    B_base = B_ptr + (batch * length * groups + group) * state
    if HAS_INIT:
        s = tl.load(init_ptr + (batch * heads + head) * dim * state + tile, mask=tile_mask, other=0.0)
    else:
        s = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for k in range(n_chunks):
        tl.store(base + k * slot + tile, s, mask=tile_mask)
        end, cs_end, decay, run_end = _chunk_bounds(k, chunk, length, cs_row, runs_row, HAS_SEQ)
        s = s * decay
        if WHOLE_CHUNK:
            s = _state_fwd_step(x_base, B_base, cs_row, dtp_row, runs_row, k * chunk, end, cs_end, run_end, s, pp,
                                nn, pmask, nmask, heads, dim, state, groups, HAS_SEQ, DT, PREC, BLOCK_T)
        else:
            for t0 in range(k * chunk, end, BLOCK_T):
                s = _state_fwd_step(x_base, B_base, cs_row, dtp_row, runs_row, t0, end, cs_end, run_end, s, pp,
                                    nn, pmask, nmask, heads, dim, state, groups, HAS_SEQ, DT, PREC, BLOCK_T)
    tl.store(base + n_chunks * slot + tile, s, mask=tile_mask)


@triton.jit
def _cb_kernel(B_ptr, C_ptr, runs_ptr, cb_ptr,
               length, state, groups, chunk, n_chunks, n_rows,
               HAS_SEQ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rb = pid % n_rows
    group = (pid // n_rows) % groups
    k = pid // (n_rows * groups)
    start = k * chunk
    rows_end = tl.minimum(tl.minimum(start + chunk, length), start + (rb + 1) * BLOCK_M)
    i = start + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < rows_end
    nn = tl.arange(0, BLOCK_N)
    nmask = nn < state
    BC_base = (batch * length * groups + group) * state
    cb_base = cb_ptr + ((batch * n_chunks + k) * groups + group) * chunk * chunk
    Ci = tl.load(C_ptr + BC_base + i[:, None] * (groups * state) + nn[None, :], mask=imask[:, None] & nmask[None, :],
                 other=0.0)
    if HAS_SEQ:
        run_i = tl.load(runs_ptr + batch * length + i, mask=imask, other=-1)
    for j0 in range(start, rows_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < rows_end
        BjT = tl.load(B_ptr + BC_base + j[None, :] * (groups * state) + nn[:, None],
                      mask=nmask[:, None] & jmask[None, :], other=0.0)
        keep = i[:, None] >= j[None, :]
        if HAS_SEQ:
            keep &= run_i[:, None] == tl.load(runs_ptr + batch * length + j, mask=jmask, other=-1)[None, :]
        CB = tl.where(keep, _dot(Ci, BjT, None, DT, PREC), 0.0)
        tl.store(cb_base + (i - start)[:, None] * chunk + (j - start)[None, :], _narrow(CB, cb_ptr.dtype.element_ty),
                 mask=imask[:, None] & jmask[None, :])


@triton.jit
def _out_kernel(x_ptr, C_ptr, cb_ptr, D_ptr, z_ptr, dout_ptr, dtp_ptr, cs_ptr, runs_ptr, states_ptr, out_ptr,
                length, heads, dim, state, groups, chunk, n_chunks, n_rows,
                HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
                DZ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rb = pid % n_rows
    head = (pid // n_rows) % heads
    k = pid // (n_rows * heads)
    group = head // (heads // groups)
    start = k * chunk
    rows_end = tl.minimum(tl.minimum(start + chunk, length), start + (rb + 1) * BLOCK_M)
    i = start + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < rows_end
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < dim
    nmask = nn < state
    cs_row = cs_ptr + (batch * heads + head) * length
    dtp_row = dtp_ptr + (batch * heads + head) * length
    x_base = x_ptr + (batch * length * heads + head) * dim
    cb_base = cb_ptr + ((batch * n_chunks + k) * groups + group) * chunk * chunk
    cs_i = tl.load(cs_row + i, mask=imask, other=0.0)
    Ci = tl.load(C_ptr + (batch * length * groups + group) * state + i[:, None] * (groups * state) + nn[None, :],
                 mask=imask[:, None] & nmask[None, :], other=0.0)
    sT = tl.load(states_ptr + ((batch * (n_chunks + 1) + k) * heads + head) * dim * state + nn[:, None]
                 + pp[None, :] * state, mask=nmask[:, None] & pmask[None, :], other=0.0)
    e = tl.exp(cs_i)
    if HAS_SEQ:
        e = tl.where(tl.load(runs_ptr + batch * length + i, mask=imask, other=-1) == 0, e, 0.0)
    acc = _dot(Ci, sT, None, DT, PREC) * e[:, None]
    for j0 in range(start, rows_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < rows_end
        keep = (i[:, None] >= j[None, :]) & imask[:, None] & jmask[None, :]
        CB = tl.load(cb_base + (i - start)[:, None] * chunk + (j - start)[None, :], mask=keep, other=0.0)
        cs_j = tl.load(cs_row + j, mask=jmask, other=0.0)
        dt_j = tl.load(dtp_row + j, mask=jmask, other=0.0)
        M = tl.where(keep, CB.to(tl.float32) * tl.exp(cs_i[:, None] - cs_j[None, :]), 0.0) * dt_j[None, :]
        xj = tl.load(x_base + j[:, None] * (heads * dim) + pp[None, :], mask=jmask[:, None] & pmask[None, :],
                     other=0.0)
        acc = _dot(M, xj, acc, DT, PREC)
    offs = (batch * length + i[:, None]) * (heads * dim) + head * dim + pp[None, :]
    mask = imask[:, None] & pmask[None, :]
    if HAS_D:
        xi = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += _skip(D_ptr, head, dim, pp, pmask, D_PER_P) * xi
    if DZ:
        dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        acc = dout * acc * sig * (1.0 + gate * (1.0 - sig))
    elif HAS_Z:
        gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc *= gate * tl.sigmoid(gate)
    tl.store(out_ptr + offs, _narrow(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _state_bwd_step(dout_ptr, z_ptr, dy_base, C_base, cs_row, runs_row, t0, end, g, pp, nn, pmask, nmask,
                    heads, dim, state, groups,
                    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """``g + (e dy)^T @ C`` over the positions ``[t0, min(t0 + BLOCK_T, end))`` of one chunk."""
    t = t0 + tl.arange(0, BLOCK_T)
    tmask = t < end
    e = tl.exp(tl.load(cs_row + t, mask=tmask, other=0.0))
    if HAS_SEQ:
        e = tl.where(tl.load(runs_row + t, mask=tmask, other=-1) == 0, e, 0.0)
    dyT = _gated_grad(dout_ptr, z_ptr, dy_base + t[None, :] * (heads * dim) + pp[:, None],
                      pmask[:, None] & tmask[None, :], HAS_Z)
    Ct = tl.load(C_base + t[:, None] * (groups * state) + nn[None, :], mask=tmask[:, None] & nmask[None, :],
                 other=0.0)
    return _dot(dyT * e[None, :], Ct, g, DT, PREC)


@triton.jit
def _state_bwd_kernel(dout_ptr, z_ptr, C_ptr, cs_ptr, runs_ptr, states_ptr, dfinal_ptr, dstates_ptr, dinit_ptr,
                      carry_ptr,
                      length, heads, dim, state, groups, chunk, n_chunks,
                      HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
                      DT: tl.constexpr, PREC: tl.constexpr,
                      BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                      WHOLE_CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    p_blocks = tl.cdiv(dim, BLOCK_P)
    pp = (pid % p_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    nn = (pid // p_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = pp < dim
    nmask = nn < state
    tile = pp[:, None] * state + nn[None, :]
    tile_mask = pmask[:, None] & nmask[None, :]
    group = head // (heads // groups)
    slot = heads * dim * state
    states_base = states_ptr + (batch * (n_chunks + 1) * heads + head) * dim * state
    dstates_base = dstates_ptr + (batch * n_chunks * heads + head) * dim * state
    cs_row = cs_ptr + (batch * heads + head) * length
    runs_row = runs_ptr
    if HAS_SEQ:
        runs_row += batch * length
    dy_base = (batch * length * heads + head) * dim
    C_base = C_ptr + (batch * length * groups + group) * state
    own = (batch * heads + head) * dim * state + tile
    if HAS_DFINAL:
        g = tl.load(dfinal_ptr + own, mask=tile_mask, other=0.0)
    else:
        g = tl.zeros((BLOCK_P, BLOCK_N), tl.float32)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        tl.store(dstates_base + k * slot + tile, g, mask=tile_mask)
        end, _, decay, _ = _chunk_bounds(k, chunk, length, cs_row, runs_row, HAS_SEQ)
        g = g * decay
        s = tl.load(states_base + k * slot + tile, mask=tile_mask, other=0.0)
        tl.atomic_add(carry_ptr + (batch * heads + head) * n_chunks + k, tl.sum(g * s), sem="relaxed")
        if WHOLE_CHUNK:
            g = _state_bwd_step(dout_ptr, z_ptr, dy_base, C_base, cs_row, runs_row, k * chunk, end, g, pp, nn, pmask,
                                nmask, heads, dim, state, groups, HAS_Z, HAS_SEQ, DT, PREC, BLOCK_T)
        else:
            for t0 in range(k * chunk, end, BLOCK_T):
                g = _state_bwd_step(dout_ptr, z_ptr, dy_base, C_base, cs_row, runs_row, t0, end, g, pp, nn, pmask,
                                    nmask, heads, dim, state, groups, HAS_Z, HAS_SEQ, DT, PREC, BLOCK_T)
    if HAS_INIT:
        tl.store(dinit_ptr + own, g, mask=tile_mask)


@triton.jit
def _dx_kernel(x_ptr, B_ptr, cb_ptr, D_ptr, z_ptr, dout_ptr, dtp_ptr, cs_ptr, runs_ptr, dstates_ptr,
               dx_ptr, dxx_ptr, into_ptr, rows_ptr, cols_ptr, dD_ptr,
               length, heads, dim, state, groups, chunk, n_chunks, n_rows,
               HAS_D: tl.constexpr, D_PER_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    rb = pid % n_rows
    head = (pid // n_rows) % heads
    k = pid // (n_rows * heads)
    group = head // (heads // groups)
    start = k * chunk
    end = tl.minimum(start + chunk, length)
    j_start = start + rb * BLOCK_M
    j = j_start + tl.arange(0, BLOCK_M)
    jmask = j < end
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < dim
    nmask = nn < state
    row = (batch * heads + head) * length
    head_base = batch * length * heads * dim + head * dim
    cb_base = cb_ptr + ((batch * n_chunks + k) * groups + group) * chunk * chunk
    cs_j = tl.load(cs_ptr + row + j, mask=jmask, other=0.0)
    dt_j = tl.load(dtp_ptr + row + j, mask=jmask, other=0.0)
    w = tl.where(jmask, tl.exp(tl.load(cs_ptr + row + end - 1) - cs_j), 0.0)
    if HAS_SEQ:
        run_j = tl.load(runs_ptr + batch * length + j, mask=jmask, other=-1)
        w = tl.where(run_j == tl.load(runs_ptr + batch * length + end - 1), w, 0.0)
    jp_mask = jmask[:, None] & pmask[None, :]
    offs_j = head_base + j[:, None] * (heads * dim) + pp[None, :]
    xd = _narrow(tl.load(x_ptr + offs_j, mask=jp_mask, other=0.0).to(tl.float32) * dt_j[:, None], DT)
    dxd = tl.zeros((BLOCK_M, BLOCK_P), tl.float32)
    col = tl.zeros((BLOCK_M,), tl.float32)
    for i0 in range(j_start, end, BLOCK_K):
        i = i0 + tl.arange(0, BLOCK_K)
        imask = i < end
        keep = (i[None, :] >= j[:, None]) & imask[None, :] & jmask[:, None]
        CBt = tl.load(cb_base + (i - start)[None, :] * chunk + (j - start)[:, None], mask=keep, other=0.0)
        cs_i = tl.load(cs_ptr + row + i, mask=imask, other=0.0)
        Mt = tl.where(keep, CBt * tl.exp(cs_i[None, :] - cs_j[:, None]), 0.0)
        dy = _narrow(_gated_grad(dout_ptr, z_ptr, head_base + i[:, None] * (heads * dim) + pp[None, :],
                                 imask[:, None] & pmask[None, :], HAS_Z), DT)
        dyT = _narrow(_gated_grad(dout_ptr, z_ptr, head_base + i[None, :] * (heads * dim) + pp[:, None],
                                  pmask[:, None] & imask[None, :], HAS_Z), DT)
        dxd = _dot(Mt, dy, dxd, DT, PREC)
        pair = Mt * _dot(xd, dyT, None, DT, PREC)
        col += tl.sum(pair, axis=1)
        tl.atomic_add(rows_ptr + row + i, tl.sum(pair, axis=0), mask=imask, sem="relaxed")
    Bj = tl.load(B_ptr + (batch * length * groups + group) * state + j[:, None] * (groups * state) + nn[None, :],
                 mask=jmask[:, None] & nmask[None, :], other=0.0)
    GT = tl.load(dstates_ptr + ((batch * n_chunks + k) * heads + head) * dim * state + nn[:, None]
                 + pp[None, :] * state, mask=nmask[:, None] & pmask[None, :], other=0.0)
    dxs = _dot(Bj.to(tl.float32) * w[:, None], GT, None, DT, PREC)
    xj = tl.load(x_ptr + offs_j, mask=jp_mask, other=0.0).to(tl.float32)
    tl.store(into_ptr + row + j, tl.sum(xj * dxs, axis=1) * dt_j, mask=jmask)
    dxd += dxs
    dx = dxd * dt_j[:, None]
    if HAS_D:
        dy_j = _gated_grad(dout_ptr, z_ptr, offs_j, jp_mask, HAS_Z)
        dx += _skip(D_ptr, head, dim, pp, pmask, D_PER_P) * dy_j
        tl.atomic_add(dD_ptr + head * dim + pp, tl.sum(dy_j * xj, axis=0), mask=pmask, sem="relaxed")
    tl.store(dx_ptr + offs_j, _narrow(dx, dx_ptr.dtype.element_ty), mask=jp_mask)
    tl.store(dxx_ptr + row + j, tl.sum(xj * dxd, axis=1), mask=jmask)
    tl.store(cols_ptr + row + j, col, mask=jmask)


@triton.jit
def _dcb_kernel(x_ptr, z_ptr, dout_ptr, dtp_ptr, cs_ptr, runs_ptr, dcb_ptr,
                length, heads, dim, groups, chunk, n_chunks, n_rows,
                HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, HEADS: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    rb, k, group, first, stop = _head_block(tl.program_id(0), n_rows, heads, groups, HEADS)
    start = k * chunk
    rows_end = tl.minimum(tl.minimum(start + chunk, length), start + (rb + 1) * BLOCK_M)
    i = start + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < rows_end
    pp = tl.arange(0, BLOCK_P)
    pmask = pp < dim
    dcb_base = dcb_ptr + ((batch * n_chunks + k) * groups + group) * chunk * chunk
    if HAS_SEQ:
        run_i = tl.load(runs_ptr + batch * length + i, mask=imask, other=-1)
    for j0 in range(start, rows_end, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < rows_end
        keep = (i[:, None] >= j[None, :]) & imask[:, None] & jmask[None, :]
        if HAS_SEQ:
            keep &= run_i[:, None] == tl.load(runs_ptr + batch * length + j, mask=jmask, other=-1)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
        for head in range(first, stop):
            row = (batch * heads + head) * length
            head_base = batch * length * heads * dim + head * dim
            cs_i = tl.load(cs_ptr + row + i, mask=imask, other=0.0)
            cs_j = tl.load(cs_ptr + row + j, mask=jmask, other=0.0)
            dt_j = tl.load(dtp_ptr + row + j, mask=jmask, other=0.0)
            dy = _narrow(_gated_grad(dout_ptr, z_ptr, head_base + i[:, None] * (heads * dim) + pp[None, :],
                                     imask[:, None] & pmask[None, :], HAS_Z), DT)
            xT = tl.load(x_ptr + head_base + j[None, :] * (heads * dim) + pp[:, None],
                         mask=pmask[:, None] & jmask[None, :], other=0.0)
            xdT = _narrow(xT.to(tl.float32) * dt_j[None, :], DT)
            acc += tl.where(keep, tl.exp(cs_i[:, None] - cs_j[None, :]), 0.0) * _dot(dy, xdT, None, DT, PREC)
        tl.atomic_add(dcb_base + (i - start)[:, None] * chunk + (j - start)[None, :], acc, mask=keep, sem="relaxed")


@triton.jit
def _dbc_kernel(x_ptr, B_ptr, C_ptr, z_ptr, dout_ptr, dtp_ptr, cs_ptr, runs_ptr, states_ptr, dstates_ptr, dcb_ptr,
                grad_ptr, outof_ptr,
                length, heads, dim, state, groups, chunk, n_chunks, n_rows,
                FOR_B: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DT: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                BLOCK_N: tl.constexpr, HEADS: tl.constexpr):
    batch = tl.program_id(1).to(tl.int64)
    rb, k, group, first, stop = _head_block(tl.program_id(0), n_rows, heads, groups, HEADS)
    start = k * chunk
    end = tl.minimum(start + chunk, length)
    q_start = start + rb * BLOCK_M
    q = q_start + tl.arange(0, BLOCK_M)
    qmask = q < end
    pp = tl.arange(0, BLOCK_P)
    nn = tl.arange(0, BLOCK_N)
    pmask = pp < dim
    nmask = nn < state
    qp_mask = qmask[:, None] & pmask[None, :]
    BC_base = (batch * length * groups + group) * state
    dcb_base = dcb_ptr + ((batch * n_chunks + k) * groups + group) * chunk * chunk
    tile = pp[:, None] * state + nn[None, :]
    tile_mask = pmask[:, None] & nmask[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    lead = first == group * (heads // groups)
    if FOR_B:
        for i0 in range(q_start, tl.where(lead, end, q_start), BLOCK_K):
            i = i0 + tl.arange(0, BLOCK_K)
            imask = i < end
            keep = (i[None, :] >= q[:, None]) & imask[None, :] & qmask[:, None]
            dcbT = tl.load(dcb_base + (i - start)[None, :] * chunk + (q - start)[:, None], mask=keep, other=0.0)
            Ci = tl.load(C_ptr + BC_base + i[:, None] * (groups * state) + nn[None, :],
                         mask=imask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(dcbT, Ci, acc, DT, PREC)
        if HAS_SEQ:
            reach = tl.load(runs_ptr + batch * length + q, mask=qmask, other=-1) == tl.load(
                runs_ptr + batch * length + end - 1)
        for head in range(first, stop):
            row = (batch * heads + head) * length
            cs_q = tl.load(cs_ptr + row + q, mask=qmask, other=0.0)
            w = tl.where(qmask, tl.exp(tl.load(cs_ptr + row + end - 1) - cs_q), 0.0)
            if HAS_SEQ:
                w = tl.where(reach, w, 0.0)
            w *= tl.load(dtp_ptr + row + q, mask=qmask, other=0.0)
            xq = tl.load(x_ptr + batch * length * heads * dim + head * dim + q[:, None] * (heads * dim) + pp[None, :],
                         mask=qp_mask, other=0.0)
            G = tl.load(dstates_ptr + ((batch * n_chunks + k) * heads + head) * dim * state + tile, mask=tile_mask,
                        other=0.0)
            acc = _dot(xq.to(tl.float32) * w[:, None], G, acc, DT, PREC)
    else:
        rows_end = tl.minimum(end, q_start + BLOCK_M)
        for j0 in range(start, tl.where(lead, rows_end, start), BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            jmask = j < rows_end
            keep = (q[:, None] >= j[None, :]) & qmask[:, None] & jmask[None, :]
            dcb = tl.load(dcb_base + (q - start)[:, None] * chunk + (j - start)[None, :], mask=keep, other=0.0)
            Bj = tl.load(B_ptr + BC_base + j[:, None] * (groups * state) + nn[None, :],
                         mask=jmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(dcb, Bj, acc, DT, PREC)
        Cq = tl.load(C_ptr + BC_base + q[:, None] * (groups * state) + nn[None, :],
                     mask=qmask[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        if HAS_SEQ:
            first_run = tl.load(runs_ptr + batch * length + q, mask=qmask, other=-1) == 0
        for head in range(first, stop):
            row = (batch * heads + head) * length
            e = tl.exp(tl.load(cs_ptr + row + q, mask=qmask, other=0.0))
            if HAS_SEQ:
                e = tl.where(first_run, e, 0.0)
            dy = _gated_grad(dout_ptr, z_ptr, batch * length * heads * dim + head * dim + q[:, None] * (heads * dim)
                             + pp[None, :], qp_mask, HAS_Z)
            s = tl.load(states_ptr + ((batch * (n_chunks + 1) + k) * heads + head) * dim * state + tile,
                        mask=tile_mask, other=0.0)
            off = _dot(dy * e[:, None], s, None, DT, PREC)
            tl.store(outof_ptr + row + q, tl.sum(Cq * off, axis=1), mask=qmask)
            acc += off
    tl.atomic_add(grad_ptr + BC_base + q[:, None] * (groups * state) + nn[None, :], acc,
                  mask=qmask[:, None] & nmask[None, :], sem="relaxed")


@triton.jit
def _dt_bwd_kernel(dt_ptr, bias_ptr, A_ptr, mod_ptr, dtp_ptr, dxx_ptr, outof_ptr, rows_ptr, cols_ptr, into_ptr,
                   carry_ptr, ddt_ptr, dA_ptr, dbias_ptr,
                   length, heads, chunk, n_chunks, n_mod,
                   HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_MOD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    k = tl.program_id(0)
    hb = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    pos = tl.arange(0, BLOCK_T)
    t = k * chunk + pos
    tmask = (pos < chunk) & (t < length)
    hh = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hmask = hh < heads
    mask = tmask[:, None] & hmask[None, :]
    offs = (batch * heads + hh[None, :]) * length + t[:, None]
    step = tl.load(dtp_ptr + offs, mask=mask, other=0.0)
    dxx = tl.load(dxx_ptr + offs, mask=mask, other=0.0)
    into = tl.load(into_ptr + offs, mask=mask, other=0.0)
    rows = tl.load(outof_ptr + offs, mask=mask, other=0.0) + tl.load(rows_ptr + offs, mask=mask, other=0.0)
    da = tl.cumsum(rows - tl.load(cols_ptr + offs, mask=mask, other=0.0), axis=0, reverse=True)
    da += tl.cumsum(into, axis=0) - into
    da += tl.load(carry_ptr + (batch * heads + hh) * n_chunks + k, mask=hmask, other=0.0)[None, :]
    da = tl.where(mask, da, 0.0)
    if HAS_MOD:
        m = tl.load(mod_ptr + batch * length + t, mask=tmask, other=0)
        A = tl.load(A_ptr + m[:, None] * heads + hh[None, :], mask=mask, other=0.0)
    else:
        A = tl.load(A_ptr + hh, mask=hmask, other=0.0)[None, :]
    d_step = dxx + A * da
    if SOFTPLUS:
        raw = tl.load(dt_ptr + (batch * length + t[:, None]) * heads + hh[None, :], mask=mask, other=0.0)
        raw = raw.to(tl.float32)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + hh, mask=hmask, other=0.0)[None, :]
        d_step *= tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
    d_step = tl.where(mask, d_step, 0.0)
    tl.store(ddt_ptr + (batch * length + t[:, None]) * heads + hh[None, :], _narrow(d_step, ddt_ptr.dtype.element_ty),
             mask=mask)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + hh, tl.sum(d_step, axis=0), mask=hmask, sem="relaxed")
    dA = step * da
    if HAS_MOD:
        for mm in range(n_mod):
            part = tl.sum(tl.where(m[:, None] == mm, dA, 0.0), axis=0)
            tl.atomic_add(dA_ptr + mm * heads + hh, part, mask=hmask, sem="relaxed")
    else:
        tl.atomic_add(dA_ptr + hh, tl.sum(dA, axis=0), mask=hmask, sem="relaxed")


def _block(size: int, extent: int) -> int:
    """A tiling block clamped to the power of two (at least 16) that covers ``extent``."""
    return min(size, max(16, pow2(extent)))


class _Plan:
    """Sizes, flags, clamped blocks and launch settings of one call, shared by its forward and backward."""

    def __init__(self, x, B, C, A, D, z, dt_bias, initial_states, modality, seq_idx, dt_softplus, chunk_size, tiling):
        self.batch, self.length, self.heads, self.dim = x.shape
        self.groups, self.state = B.shape[2:]
        self.chunk = min(chunk_size, self.length)
        self.n_chunks = cdiv(self.length, self.chunk)
        self.n_mod = 1 if modality is None else A.shape[0]
        self.tiling = tiling
        t = self.chunk
        self.block_t = pow2(t)
        self.block_h = max(1, min(tiling.block_h, pow2(self.heads), 8192 // self.block_t))
        self.state_p = _block(tiling.state_p, self.dim)
        self.state_n = _block(tiling.state_n, self.state)
        self.state_t = _block(tiling.state_t, t)
        self.block_p = max(16, pow2(self.dim))
        self.block_n = max(16, pow2(self.state))
        low = x.dtype if x.dtype == B.dtype == C.dtype and x.dtype != torch.float32 else torch.float32
        dot = dict(DT={torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(low, tl.float32),
                   PREC="ieee" if low == torch.float32 else "tf32")
        self.flags = dict(HAS_D=D is not None, D_PER_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
                          HAS_SEQ=seq_idx is not None)
        self.dt_flags = dict(HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), HAS_MOD=modality is not None)
        self.has_init = initial_states is not None
        per_group = self.heads // self.groups
        self.dcb_heads = min(tiling.dcb_heads, per_group)
        self.dbc_heads = min(tiling.dbc_heads, per_group)
        state = dict(**dot, BLOCK_P=self.state_p, BLOCK_N=self.state_n, BLOCK_T=self.state_t,
                     WHOLE_CHUNK=self.state_t >= t, num_warps=tiling.state_warps, num_stages=tiling.state_stages)
        chunk = dict(**dot, BLOCK_P=self.block_p, BLOCK_N=self.block_n)
        self.launch = dict(
            state=state,
            cb=dict(**dot, BLOCK_M=_block(tiling.cb_m, t), BLOCK_K=_block(tiling.cb_k, t), BLOCK_N=self.block_n,
                    num_warps=tiling.cb_warps),
            out=dict(**chunk, BLOCK_M=_block(tiling.out_m, t), BLOCK_K=_block(tiling.out_k, t),
                     num_warps=tiling.out_warps, num_stages=tiling.out_stages),
            dx=dict(**chunk, BLOCK_M=_block(tiling.dx_m, t), BLOCK_K=_block(tiling.dx_k, t),
                    num_warps=tiling.dx_warps, num_stages=tiling.dx_stages),
            dcb=dict(**dot, BLOCK_M=_block(tiling.dcb_m, t), BLOCK_K=_block(tiling.dcb_k, t), BLOCK_P=self.block_p,
                     HEADS=self.dcb_heads, num_warps=tiling.dcb_warps, num_stages=tiling.dcb_stages),
            dbc=dict(**chunk, BLOCK_M=_block(tiling.dbc_m, t), BLOCK_K=_block(tiling.dbc_k, t), HEADS=self.dbc_heads,
                     num_warps=tiling.dbc_warps, num_stages=tiling.dbc_stages),
        )

    @property
    def sizes(self):
        return self.length, self.heads, self.dim, self.state, self.groups, self.chunk, self.n_chunks

    def rows(self, kernel: str) -> int:
        return cdiv(self.chunk, self.launch[kernel]["BLOCK_M"])

    def state_grid(self):
        tiles = cdiv(self.dim, self.state_p) * cdiv(self.state, self.state_n)
        return tiles, self.heads, self.batch

    def step_grid(self):
        return self.n_chunks, cdiv(self.heads, self.block_h), self.batch

    def chunk_grid(self, kernel: str, per_group: int = 1):
        """Programs of a chunk kernel: ``per_group`` per group, chunk and block of rows."""
        return self.n_chunks * self.groups * per_group * self.rows(kernel), self.batch

    def split_grid(self, kernel: str, heads: int):
        """Programs of a chunk kernel whose programs cover ``heads`` heads of a group each."""
        return self.chunk_grid(kernel, cdiv(self.heads // self.groups, heads))

    def cb(self, B, C, runs):
        """``C_i . B_j`` of each chunk and group, causal and within documents, ``(b, c, g, T, T)``."""
        cb = B.new_empty(self.batch, self.n_chunks, self.groups, self.chunk, self.chunk, dtype=torch.float32)
        _cb_kernel[self.chunk_grid("cb")](B, C, runs, cb, self.length, self.state, self.groups, self.chunk,
                                          self.n_chunks, self.rows("cb"), HAS_SEQ=runs is not None,
                                          **self.launch["cb"])
        return cb


class SSDScanFn(torch.autograd.Function):
    """Autograd node of the Triton SSD scan; see the module docstring."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, modality, seq_idx, dt_softplus, chunk_size,
                tiling):
        x, dt, B, C = x.contiguous(), dt.contiguous(), B.contiguous(), C.contiguous()
        A = A.float().contiguous()
        D = None if D is None else D.contiguous()
        z = None if z is None else z.contiguous()
        dt_bias = None if dt_bias is None else dt_bias.contiguous()
        init = None if initial_states is None else initial_states.float().contiguous()
        modality = None if modality is None else modality.contiguous()
        seq_idx = None if seq_idx is None else seq_idx.contiguous()
        plan = _Plan(x, B, C, A, D, z, dt_bias, init, modality, seq_idx, dt_softplus, chunk_size, tiling)
        b, l, h = plan.batch, plan.length, plan.heads
        f32 = dict(device=x.device, dtype=torch.float32)
        dtp, cs = torch.empty(b, h, l, **f32), torch.empty(b, h, l, **f32)
        runs = None if seq_idx is None else torch.empty(b, l, device=x.device, dtype=torch.int32)
        _dt_fwd_kernel[plan.step_grid()](
            dt, dt_bias, A, modality, seq_idx, dtp, cs, runs, l, h, plan.chunk,
            **plan.dt_flags, HAS_SEQ=seq_idx is not None, BLOCK_T=plan.block_t, BLOCK_H=plan.block_h)
        states = torch.empty(b, plan.n_chunks + 1, h, plan.dim, plan.state, **f32)
        _state_fwd_kernel[plan.state_grid()](x, B, dtp, cs, runs, init, states, *plan.sizes,
                                             HAS_INIT=init is not None, HAS_SEQ=seq_idx is not None,
                                             **plan.launch["state"])
        cb = plan.cb(B, C, runs)
        out = torch.empty_like(x)
        _out_kernel[plan.chunk_grid("out", h // plan.groups)](
            x, C, cb, D, z, None, dtp, cs, runs, states, out, *plan.sizes, plan.rows("out"), **plan.flags, DZ=False,
            **plan.launch["out"])
        if any(ctx.needs_input_grad[:9]):
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, modality, runs, dtp, cs, states)
            ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, states[:, plan.n_chunks].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        x, dt, A, B, C, D, z, dt_bias, modality, runs, dtp, cs, states = ctx.saved_tensors
        plan = ctx.plan
        b, l, h, p = x.shape
        c = plan.n_chunks
        f32 = dict(device=x.device, dtype=torch.float32)
        dout = torch.zeros_like(x) if dout is None else dout.contiguous()
        dfinal = None if dfinal is None else dfinal.float().contiguous()
        dstates = torch.empty(b, c, h, p, plan.state, **f32)
        dinit = torch.empty(b, h, p, plan.state, **f32) if plan.has_init else None
        carry = torch.zeros(b, h, c, **f32)
        _state_bwd_kernel[plan.state_grid()](dout, z, C, cs, runs, states, dfinal, dstates, dinit, carry,
                                             *plan.sizes, HAS_Z=z is not None, HAS_DFINAL=dfinal is not None,
                                             HAS_INIT=plan.has_init, HAS_SEQ=runs is not None,
                                             **plan.launch["state"])
        cb = plan.cb(B, C, runs)
        dz = None
        if z is not None:
            dz = torch.empty_like(z)
            _out_kernel[plan.chunk_grid("out", h // plan.groups)](
                x, C, cb, D, z, dout, dtp, cs, runs, states, dz, *plan.sizes, plan.rows("out"), **plan.flags,
                DZ=True, **plan.launch["out"])
        dx = torch.empty_like(x)
        dxx, into, cols = (torch.empty(b, h, l, **f32) for _ in range(3))
        rows = torch.zeros(b, h, l, **f32)
        dD = torch.zeros(h, p, **f32)
        _dx_kernel[plan.chunk_grid("dx", h // plan.groups)](
            x, B, cb, D, z, dout, dtp, cs, runs, dstates, dx, dxx, into, rows, cols, dD, *plan.sizes,
            plan.rows("dx"), **plan.flags, **plan.launch["dx"])
        dcb = torch.zeros(b, c, plan.groups, plan.chunk, plan.chunk, **f32)
        _dcb_kernel[plan.split_grid("dcb", plan.dcb_heads)](
            x, z, dout, dtp, cs, runs, dcb, l, h, p, plan.groups, plan.chunk, c, plan.rows("dcb"),
            HAS_Z=z is not None, HAS_SEQ=runs is not None, **plan.launch["dcb"])
        dB, dC = torch.zeros(B.shape, **f32), torch.zeros(C.shape, **f32)
        outof = torch.empty(b, h, l, **f32)
        for grad, for_B in ((dB, True), (dC, False)):
            _dbc_kernel[plan.split_grid("dbc", plan.dbc_heads)](
                x, B, C, z, dout, dtp, cs, runs, states, dstates, dcb, grad, outof, *plan.sizes, plan.rows("dbc"),
                FOR_B=for_B, HAS_Z=z is not None, HAS_SEQ=runs is not None, **plan.launch["dbc"])
        ddt = torch.empty_like(dt)
        dA = torch.zeros(A.shape, **f32)
        d_bias = torch.zeros(h, **f32)
        _dt_bwd_kernel[plan.step_grid()](
            dt, dt_bias, A, modality, dtp, dxx, outof, rows, cols, into, carry, ddt, dA, d_bias, l, h, plan.chunk, c,
            plan.n_mod, **plan.dt_flags, BLOCK_T=plan.block_t, BLOCK_H=plan.block_h)
        if D is not None:
            dD = (dD if D.dim() == 2 else dD.sum(1)).to(D.dtype)
        return (dx, ddt, dA, dB.to(B.dtype), dC.to(C.dtype), None if D is None else dD, dz,
                None if dt_bias is None else d_bias.to(dt_bias.dtype), dinit, None, None, None, None, None)


def ssd_scan(*, x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, return_final_states=False, modality=None, tiling: Tiling | None = None):
    """The Triton backend's :func:`momkit.ops.ssd_scan` (arguments already checked).

    ``x, z: (b, l, h, p)``; ``dt: (b, l, h)``; ``A: (h,)``, or ``(M, h)`` with ``modality: (b, l)``;
    ``B, C: (b, l, g, n)``; ``D: (h,)`` or ``(h, p)``; ``dt_bias: (h,)``; ``initial_states: (b, h, p, n)``;
    ``seq_idx: (b, l)``. Returns ``out (b, l, h, p)`` in ``x``'s dtype and, when ``return_final_states``, the
    final state ``(b, h, p, n)`` in float32. ``tiling`` overrides the block sizes (:func:`default_tiling`); the
    result depends neither on it nor, beyond rounding, on ``chunk_size``.

    Raises:
        SpecError: a float64 input; this backend computes in float32 (use ``backend="reference"``).
    """
    refuse_float64("scan backend", x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                   initial_states=initial_states)
    b, l, h, p = x.shape
    if b == 0 or l == 0:
        out = x.new_zeros(x.shape)
        final = (x.new_zeros(b, h, p, B.shape[3], dtype=torch.float32) if initial_states is None
                 else initial_states.float())
        return (out, final) if return_final_states else out
    out, final = SSDScanFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, modality, seq_idx, dt_softplus,
                                 chunk_size, tiling or default_tiling(b, h))
    return (out, final) if return_final_states else out
