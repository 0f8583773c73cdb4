"""Mamba-1 selective scan in Triton: a forward and a backward kernel, wired by one autograd function.

Shapes: ``u, delta, z, out: (b, d, l)``; ``A: (d, n)``, or ``(M, d, n)`` indexed by ``modality: (b, l)``;
``B, C: (b, n, l)`` or ``(b, g, n, l)``; ``D, delta_bias: (d,)``; ``seq_idx: (b, l)``; last state ``(b, d, n)``.
Inputs may be float32, bfloat16 or float16; every kernel computes in float32.

One program owns ``BLOCK_D`` channels of one batch row (all inside one group of ``B``, ``C``) and walks the
sequence in chunks of ``CHUNK`` positions. In a chunk it loads ``(BLOCK_D, CHUNK)`` tiles of ``u``,
``delta`` and ``z`` once and does the per-channel work on them (softplus, ``delta u``, the gate); then, state
by state, the recurrence ``h_t = a_t h_{t-1} + b_t`` with ``a_t = exp(delta_t A_j)`` and
``b_t = delta_t u_t B_{j,t}`` is a ``tl.associative_scan`` along the chunk of the affine maps ``(a_t, b_t)``,
started from the state the previous chunk left, and ``y += C_j h`` accumulates the read-out. ``UNROLL``
states are processed side by side (independent chains of work for the scheduler to interleave). The state
``(b, d, n)`` passed from chunk to chunk goes through memory, in a slot per chunk boundary; so it makes the
``(b, d, l / CHUNK + 1, n)`` chunk-boundary states that the backward needs, the only per-position memory kept
(without gradients, two slots used in turn); the first slot holds the initial state (zero, or the one given).
A barrier at every chunk start makes one chunk's writes visible to the whole program before the next reads
them.

Backward, per program, chunks in reverse. Each chunk's states are recomputed from the saved state at its start
with the same scan, and the adjoint ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` runs as a reversed scan of the maps
``(a_{t+1}, C_t dy_t)``, started from ``g`` at the first position of the chunk after (passed in memory like the
forward's state); the initial state's gradient is ``a_0 g_0``. From ``g`` and the states:

- ``d(delta u)_t = sum_j g_t B_{j,t}``, ``dB_{j,t} = sum_d g_t delta_t u_t``, ``dC_{j,t} = sum_d dy_t h_t``;
- ``dA_j = sum_t delta_t x_t`` and ``d(delta_t) += sum_j A_j x_t`` with ``x_t = g_t a_t h_{t-1} =
  g_t (h_t - b_t)``, which needs no shifted state.

Sums that cross programs (``dB``, ``dC`` over channels; ``dA``, ``dD``, ``d delta_bias`` over the batch) are
first reduced inside the program, then added into float32 buffers with atomic adds: their order, and so their
last bits, vary from run to run. ``seq_idx`` sets ``a_t = 0`` where a packed document starts; ``modality``
gathers ``A`` per position and accumulates ``dA`` per modality.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from momkit.errors import SpecError
from momkit.kernels.triton.tiling import cdiv, pow2, refuse_float64

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@dataclass(frozen=True)
class Tiling:
    """Tile sizes of both kernels.

    Attributes:
        chunk: positions per chunk in both passes; the forward saves the state at every chunk start.
        block_d: channels per program in the forward.
        block_d_bwd: channels per program in the backward.
        warps: warps per program in the forward.
        warps_bwd: warps per program in the backward.
        unroll: states processed side by side in the forward.
        unroll_bwd: states processed side by side in the backward.
    """

    chunk: int
    block_d: int
    block_d_bwd: int
    warps: int = 4
    warps_bwd: int = 4
    unroll: int = 2
    unroll_bwd: int = 2

    def __post_init__(self):
        for name in ("chunk", "block_d", "block_d_bwd", "warps", "warps_bwd", "unroll", "unroll_bwd"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise SpecError(f"Tiling.{name} must be a power of two, got {value}")


def default_tiling(dim: int, length: int, groups: int = 1) -> Tiling:
    """The tiling measured fastest at the Mamba-1 shapes of ``benchmarks/gpu_scan.py`` on an H200.

    Chunks of up to 128 positions; four channels a program; the forward in two warps, four states side by
    side; the backward, which holds more tiles live, in one warp, two states side by side.
    """
    chunk = min(128, max(16, pow2(length)))
    block = min(4, pow2(dim // groups))
    return Tiling(chunk=chunk, block_d=block, block_d_bwd=block, warps=2, warps_bwd=1, unroll=4, unroll_bwd=2)


@triton.jit
def _affine(a_first, b_first, a_then, b_then):
    """The map ``h -> a_then (a_first h + b_first) + b_then``: one step after another."""
    return a_first * a_then, b_first * a_then + b_then


@triton.jit
def _step_sizes(delta_ptr, offs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """``(raw, dt)`` of a ``(BLOCK_D, CHUNK)`` tile: ``raw = delta + bias`` and ``dt`` its softplus (or
    itself), 0 where ``mask`` is off so that masked positions leave the state unchanged."""
    raw = tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += bias[:, None]
    if SOFTPLUS:
        dt = tl.where(raw <= 20.0, LN2 * tl.log2(1.0 + tl.exp2(raw * LOG2E)), raw)
    else:
        dt = raw
    return raw, tl.where(mask, dt, 0.0)


@triton.jit
def _keep(seq_ptr, t, length):
    """``(CHUNK,)`` 1.0 where position ``t`` continues the document of ``t - 1`` (or lies outside the
    sequence), 0.0 where a new document starts."""
    inside = (t > 0) & (t < length)
    now = tl.load(seq_ptr + t, mask=inside, other=0)
    before = tl.load(seq_ptr + t - 1, mask=inside, other=0)
    return tl.where(inside & (now != before), 0.0, 1.0)


@triton.jit
def _fwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mod_ptr, seq_ptr,
                out_ptr, states_ptr,
                dim, length, state, group_dim, n_chunks, n_slots,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_MOD: tl.constexpr, HAS_SEQ: tl.constexpr,
                BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    blocks = tl.cdiv(group_dim, BLOCK_D)
    group = pid // blocks
    local = (pid % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = local < group_dim
    ch = group * group_dim + local
    rows = (batch * dim + ch) * length
    slots = (batch * dim + ch) * n_slots * state
    bc = (batch * (dim // group_dim) + group) * state * length
    pos = tl.arange(0, CHUNK)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    for k in range(n_chunks):
        tl.debug_barrier()
        t = k * CHUNK + pos
        tmask = t < length
        mask = dmask[:, None] & tmask[None, :]
        offs = rows[:, None] + t[None, :]
        t_tile = tl.broadcast_to(t[None, :], (BLOCK_D, CHUNK))
        _, dt = _step_sizes(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        dtl = dt * LOG2E
        du = dt * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SEQ:
            keep = _keep(seq_ptr + batch * length, t, length)
        if HAS_MOD:
            m = tl.load(mod_ptr + batch * length + t, mask=tmask, other=0)
            a_offs = (m[None, :] * dim + ch[:, None]) * state
        else:
            a_offs = ch * state
        read = slots + (k % n_slots) * state
        write = slots + ((k + 1) % n_slots) * state
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        for first in range(0, state, UNROLL):
            for i in tl.static_range(UNROLL):
                j = first + i
                jmask = dmask & (local * 0 + j < state)
                bc_mask = mask & jmask[:, None]
                if HAS_MOD:
                    a = tl.exp2(dtl * tl.load(A_ptr + a_offs + j, mask=bc_mask, other=0.0))
                else:
                    a = tl.exp2(dtl * tl.load(A_ptr + a_offs + j, mask=jmask, other=0.0)[:, None])
                if HAS_SEQ:
                    a = a * keep[None, :]
                Bj = tl.load(B_ptr + bc + j * length + t_tile, mask=bc_mask, other=0.0).to(tl.float32)
                Cj = tl.load(C_ptr + bc + j * length + t_tile, mask=bc_mask, other=0.0).to(tl.float32)
                h0 = tl.load(states_ptr + read + j, mask=jmask, other=0.0)
                P, h = tl.associative_scan((a, du * Bj), 1, _affine)
                h += P * h0[:, None]
                y += h * Cj
                h_last = tl.sum(tl.where(pos[None, :] == CHUNK - 1, h, 0.0), axis=1)
                tl.store(states_ptr + write + j, h_last, mask=jmask)
        if HAS_D:
            y += skip[:, None] * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y *= gate * tl.sigmoid(gate)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mod_ptr, seq_ptr,
                states_ptr, carry_ptr, dout_ptr,
                du_ptr, ddelta_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
                dim, length, state, group_dim, n_chunks, n_mod,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_MOD: tl.constexpr, HAS_SEQ: tl.constexpr,
                BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    blocks = tl.cdiv(group_dim, BLOCK_D)
    group = pid // blocks
    local = (pid % blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = local < group_dim
    ch = group * group_dim + local
    rows = (batch * dim + ch) * length
    saved = (batch * dim + ch) * (n_chunks + 1) * state
    carries = (batch * dim + ch) * 2 * state
    bc = (batch * (dim // group_dim) + group) * state * length
    pos = tl.arange(0, CHUNK)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), tl.float32)
    if HAS_D:
        skip = tl.load(D_ptr + ch, mask=dmask, other=0.0).to(tl.float32)
    dD = tl.zeros((BLOCK_D,), tl.float32)
    dbias = tl.zeros((BLOCK_D,), tl.float32)
    for kk in range(n_chunks):
        tl.debug_barrier()
        k = n_chunks - 1 - kk
        t = k * CHUNK + pos
        tmask = t < length
        nmask = (t + 1) < length
        mask = dmask[:, None] & tmask[None, :]
        offs = rows[:, None] + t[None, :]
        t_tile = tl.broadcast_to(t[None, :], (BLOCK_D, CHUNK))
        _, dt = _step_sizes(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        _, dt_next = _step_sizes(delta_ptr, offs + 1, dmask[:, None] & nmask[None, :], bias, HAS_BIAS, SOFTPLUS)
        dtl = dt * LOG2E
        dtl_next = dt_next * LOG2E
        du = dt * tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy *= gate * tl.sigmoid(gate)
        if HAS_SEQ:
            keep = _keep(seq_ptr + batch * length, t, length)
            keep_next = _keep(seq_ptr + batch * length, t + 1, length)
        if HAS_MOD:
            m = tl.load(mod_ptr + batch * length + t, mask=tmask, other=0)
            m_next = tl.load(mod_ptr + batch * length + t + 1, mask=nmask, other=0)
            a_offs = (m[None, :] * dim + ch[:, None]) * state
            a_offs_next = (m_next[None, :] * dim + ch[:, None]) * state
        else:
            a_offs = ch * state
        h_read = saved + k * state
        g_read = carries + (kk % 2) * state
        g_write = carries + ((kk + 1) % 2) * state
        y = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        d_du = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        d_dt = tl.zeros((BLOCK_D, CHUNK), tl.float32)
        for first in range(0, state, UNROLL):
            for i in tl.static_range(UNROLL):
                j = first + i
                jmask = dmask & (local * 0 + j < state)
                bc_mask = mask & jmask[:, None]
                tjmask = tmask & (pos * 0 + j < state)
                if HAS_MOD:
                    Aj = tl.load(A_ptr + a_offs + j, mask=bc_mask, other=0.0)
                    a = tl.exp2(dtl * Aj)
                    alpha = tl.exp2(dtl_next * tl.load(A_ptr + a_offs_next + j, mask=bc_mask, other=0.0))
                else:
                    Aj = tl.load(A_ptr + a_offs + j, mask=jmask, other=0.0)[:, None]
                    a = tl.exp2(dtl * Aj)
                    alpha = tl.exp2(dtl_next * Aj)
                if HAS_SEQ:
                    a = a * keep[None, :]
                    alpha = alpha * keep_next[None, :]
                Bj = tl.load(B_ptr + bc + j * length + t_tile, mask=bc_mask, other=0.0).to(tl.float32)
                Cj = tl.load(C_ptr + bc + j * length + t_tile, mask=bc_mask, other=0.0).to(tl.float32)
                b = du * Bj
                P, h = tl.associative_scan((a, b), 1, _affine)
                h += P * tl.load(states_ptr + h_read + j, mask=jmask, other=0.0)[:, None]
                if HAS_Z:
                    y += h * Cj
                tl.atomic_add(dC_ptr + bc + j * length + t, tl.sum(dy * h, axis=0), mask=tjmask,
                              sem="relaxed")
                Q, g = tl.associative_scan((alpha, dy * Cj), 1, _affine, reverse=True)
                g += Q * tl.load(carry_ptr + g_read + j, mask=jmask, other=0.0)[:, None]
                tl.store(carry_ptr + g_write + j, tl.sum(tl.where(pos[None, :] == 0, g, 0.0), axis=1), mask=jmask)
                d_du += g * Bj
                tl.atomic_add(dB_ptr + bc + j * length + t, tl.sum(g * du, axis=0), mask=tjmask,
                              sem="relaxed")
                x = g * (h - b)
                d_dt += x * Aj
                xd = x * dtl
                if HAS_MOD:
                    for mm in range(n_mod):
                        part = tl.sum(tl.where(m[None, :] == mm, xd, 0.0), axis=1)
                        tl.atomic_add(dA_ptr + (mm * dim + ch) * state + j, part * LN2, mask=jmask, sem="relaxed")
                else:
                    tl.atomic_add(dA_ptr + ch * state + j, tl.sum(xd, axis=1) * LN2, mask=jmask, sem="relaxed")
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        raw, dt = _step_sizes(delta_ptr, offs, mask, bias, HAS_BIAS, SOFTPLUS)
        if HAS_D:
            d_u = d_du * dt + dy * skip[:, None]
        else:
            d_u = d_du * dt
        if HAS_Z:
            if HAS_D:
                y += skip[:, None] * u
            dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            dz = dout * y * sig * (1.0 + gate * (1.0 - sig))
            tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        dD += tl.sum(dy * u, axis=1)
        d_dt += d_du * u
        if SOFTPLUS:
            d_dt = d_dt * tl.sigmoid(raw)
        d_dt = tl.where(mask, d_dt, 0.0)
        dbias += tl.sum(d_dt, axis=1)
        tl.store(du_ptr + offs, d_u.to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(ddelta_ptr + offs, d_dt.to(ddelta_ptr.dtype.element_ty), mask=mask)
    tl.atomic_add(dD_ptr + ch, dD, mask=dmask, sem="relaxed")
    tl.atomic_add(dbias_ptr + ch, dbias, mask=dmask, sem="relaxed")


def _flags(D, z, delta_bias, delta_softplus, modality, seq_idx) -> dict:
    return dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=bool(delta_softplus), HAS_MOD=modality is not None, HAS_SEQ=seq_idx is not None)


class SelectiveScanFn(torch.autograd.Function):
    """Autograd node of the Triton selective scan; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus, tiling, initial_state):
        batch, dim, length = u.shape
        state = A.shape[-1]
        u, delta = u.contiguous(), delta.contiguous()
        Bg = (B if B.dim() == 4 else B[:, None]).contiguous()
        Cg = (C if C.dim() == 4 else C[:, None]).contiguous()
        groups = Bg.shape[1]
        z = None if z is None else z.contiguous()
        modality = None if modality is None else modality.contiguous()
        seq_idx = None if seq_idx is None else seq_idx.contiguous()
        tiling = tiling or default_tiling(dim, length, groups)
        n_chunks = cdiv(length, tiling.chunk)
        save = any(ctx.needs_input_grad[:8]) or ctx.needs_input_grad[12]
        n_slots = n_chunks + 1 if save else 2
        out = torch.empty_like(u)
        states = u.new_empty((batch, dim, n_slots, state), dtype=torch.float32)
        states[:, :, 0] = 0 if initial_state is None else initial_state
        grid = (groups * cdiv(dim // groups, tiling.block_d), batch)
        _fwd_kernel[grid](u, delta, A.float().contiguous(), Bg, Cg, D, z, delta_bias, modality, seq_idx, out,
                          states, dim, length, state, dim // groups, n_chunks, n_slots,
                          **_flags(D, z, delta_bias, delta_softplus, modality, seq_idx),
                          BLOCK_D=tiling.block_d, CHUNK=tiling.chunk, UNROLL=min(tiling.unroll, pow2(state)),
                          num_warps=tiling.warps)
        if save:
            ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, modality, seq_idx, states)
            ctx.b_dim, ctx.n_chunks = B.dim(), n_chunks
            ctx.delta_softplus, ctx.tiling = delta_softplus, tiling
            ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.set_materialize_grads(False)
        return out, states[:, :, n_chunks % n_slots].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, Bg, Cg, D, z, delta_bias, modality, seq_idx, states = ctx.saved_tensors
        tiling = ctx.tiling
        batch, dim, length = u.shape
        groups, state = Bg.shape[1], Bg.shape[2]
        f32 = dict(device=u.device, dtype=torch.float32)
        dout = torch.zeros_like(u) if dout is None else dout.contiguous()
        carry = torch.zeros(batch, dim, 2, state, **f32)
        if dlast is not None:
            carry[:, :, 0] = dlast
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dz = None if z is None else torch.empty_like(z)
        dB = torch.zeros(batch, groups, state, length, **f32)
        dC = torch.zeros(batch, groups, state, length, **f32)
        dA = torch.zeros(A.shape, **f32)
        dD = torch.zeros(dim, **f32)
        d_bias = torch.zeros(dim, **f32)
        grid = (groups * cdiv(dim // groups, tiling.block_d_bwd), batch)
        _bwd_kernel[grid](u, delta, A.float().contiguous(), Bg, Cg, D, z, delta_bias, modality, seq_idx, states,
                          carry, dout, du, ddelta, dz, dB, dC, dA, dD, d_bias,
                          dim, length, state, dim // groups, ctx.n_chunks, 1 if modality is None else A.shape[0],
                          **_flags(D, z, delta_bias, ctx.delta_softplus, modality, seq_idx),
                          BLOCK_D=tiling.block_d_bwd, CHUNK=tiling.chunk,
                          UNROLL=min(tiling.unroll_bwd, pow2(state)), num_warps=tiling.warps_bwd)
        if ctx.b_dim == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        d_initial = None
        if ctx.initial_dtype is not None:
            raw = delta[:, :, 0].float() + (0 if delta_bias is None else delta_bias.float())
            dt = torch.nn.functional.softplus(raw) if ctx.delta_softplus else raw
            first_A = A.float() if modality is None else A.float()[modality[:, 0]]
            d_initial = (torch.exp(dt[..., None] * first_A) * carry[:, :, ctx.n_chunks % 2]).to(ctx.initial_dtype)
        return (du, ddelta, dA.to(A.dtype), dB.to(Bg.dtype), dC.to(Cg.dtype),
                None if D is None else dD.to(D.dtype), dz, None if delta_bias is None else d_bias.to(delta_bias.dtype),
                None, None, None, None, d_initial)


def selective_scan(*, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, modality,
                   seq_idx=None, initial_state=None, tiling: Tiling | None = None):
    """The Triton backend's :func:`momkit.ops.selective_scan` (arguments already checked).

    ``tiling`` overrides the tile sizes (:func:`default_tiling`); the result does not depend on it.

    Raises:
        SpecError: a float64 input; this backend computes in float32 (use ``backend="reference"``).
    """
    refuse_float64("scan backend", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                   initial_state=initial_state)
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus,
                                      tiling, initial_state)
    return (out, last) if return_last_state else out
