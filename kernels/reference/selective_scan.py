"""Mamba-1 selective scan in PyTorch: chunked, with its own backward pass.

The recurrence ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` has a decay that differs per channel and
per state (``A`` is ``(d, n)``), so unlike SSD it does not factor into matrix products. The fastest exact
form on a CPU is the recurrence itself, one fused multiply-add over the whole ``(b, d, n)`` state per
position, with everything around it (the decays, the inputs, the read-out and every gradient) done in bulk,
one chunk of ``T`` positions at a time:

- forward: per chunk, ``exp(delta A)`` and ``delta B u`` as ``(T, b, d, n)`` blocks, the ``T`` state updates,
  and ``y = C h`` as one batched matmul; only the state at each chunk boundary is kept.
- backward: chunks in reverse; each chunk's states are recomputed from its boundary state, the adjoint
  ``g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1}`` runs backwards through it, and the gradients of ``delta``,
  ``A``, ``B``, ``C`` and ``u`` follow in bulk from ``g`` and the states.

Memory is a few ``(T, b, d, n)`` blocks instead of the ``(b, d, l, n)`` states an autograd graph would keep.
Packed documents (``seq_idx``) zero the decay where a document starts, so no state crosses the boundary.
An initial state starts the first chunk; its gradient is the adjoint carried out of the first position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 20


def _chunk_length(batch: int, dim: int, state: int) -> int:
    """Positions per chunk: enough to amortise the bulk work, few enough that the blocks stay in cache."""
    per_position = batch * dim * state
    length = 8
    while length < 256 and 2 * length * per_position <= CHUNK_ELEMENTS:
        length *= 2
    return length


def _document_starts(seq_idx: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``(l, b, 1, 1)``: 0 where ``seq_idx (b, l)`` changes (the state restarts there), else 1."""
    if seq_idx is None:
        return None
    keep = torch.ones(seq_idx.shape[::-1], dtype=dtype, device=seq_idx.device)
    keep[1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).T.to(dtype)
    return keep[:, :, None, None]


class _Scan:
    """Shared state of one scan: inputs in time-major layout and the per-chunk work of both passes."""

    def __init__(self, dt, du, A, B, C, modality, keep, chunk):
        self.dt, self.du, self.B, self.C = dt, du, B, C  # (l, b, d), (l, b, d), (l, b, g, n), (l, b, g, n)
        self.A, self.modality, self.chunk = A, modality, chunk
        self.keep = keep  # (l, b, 1, 1): 0 where a packed document starts, else 1; or None
        length, batch, dim = dt.shape
        self.groups, self.state = B.shape[2], B.shape[3]
        self.gdim = dim // self.groups
        block = (min(chunk, length), batch, dim, self.state)
        self.decay = dt.new_empty(block)
        self.inp = dt.new_empty(block)
        self.hs = dt.new_empty(block)

    def grouped(self, x):
        """``(t, b, d, n)`` viewed as ``(t, b, g, d / g, n)``."""
        return x.view(x.shape[0], x.shape[1], self.groups, self.gdim, x.shape[-1])

    def A_block(self, s, e):
        """``A`` for positions ``s:e``: ``(d, n)``, or ``(t, b, d, n)`` when routed by modality."""
        if self.modality is None:
            return self.A
        return self.A[self.modality[:, s:e]].transpose(0, 1)

    def states(self, h0, s, e):
        """Decays and states of positions ``s:e`` from the state ``h0`` before them; returns both blocks."""
        n = e - s
        decay, inp, hs = self.decay[:n], self.inp[:n], self.hs[:n]
        torch.mul(self.dt[s:e, :, :, None], self.A_block(s, e), out=decay)
        decay.exp_()
        if self.keep is not None:
            decay.mul_(self.keep[s:e])
        torch.mul(self.grouped(self.du[s:e, :, :, None]), self.B[s:e, :, :, None, :], out=self.grouped(inp))
        h = h0
        for t in range(n):
            h = torch.addcmul(inp[t], decay[t], h, out=hs[t])
        return decay, hs


def _forward(scan: _Scan, h_init):
    length, batch, dim = scan.dt.shape
    starts = scan.dt.new_empty((length + scan.chunk - 1) // scan.chunk + 1, batch, dim, scan.state)
    starts[0] = h_init
    y = scan.dt.new_empty(length, batch, dim)
    for c, s in enumerate(range(0, length, scan.chunk)):
        e = min(s + scan.chunk, length)
        _, hs = scan.states(starts[c], s, e)
        torch.matmul(scan.grouped(hs), scan.C[s:e, :, :, :, None], out=scan.grouped(y[s:e, :, :, None]))
        starts[c + 1] = hs[e - s - 1]
    return y, starts


def _backward(scan: _Scan, starts, dy, dlast):
    """Gradients with respect to ``dt``, ``du``, ``A``, ``B`` and ``C`` (time-major) given ``dy (l, b, d)``."""
    length = scan.dt.shape[0]
    d_dt = torch.empty_like(scan.dt)
    d_du = torch.empty_like(scan.du)
    dB = torch.empty_like(scan.B)
    dC = torch.empty_like(scan.C)
    dA = torch.zeros_like(scan.A)
    adj = torch.empty_like(scan.hs)
    carry = dlast
    for c in reversed(range(len(starts) - 1)):
        s = c * scan.chunk
        e = min(s + scan.chunk, length)
        n = e - s
        decay, hs = scan.states(starts[c], s, e)
        dy_c = scan.grouped(dy[s:e, :, :, None])
        torch.matmul(dy_c.transpose(-1, -2), scan.grouped(hs), out=dC[s:e, :, :, None, :])
        g = adj[:n]
        torch.mul(dy_c, scan.C[s:e, :, :, None, :], out=scan.grouped(g))
        if carry is not None:
            g[n - 1] += carry
        for t in range(n - 2, -1, -1):
            torch.addcmul(g[t], decay[t + 1], g[t + 1], out=g[t])
        carry = decay[0] * g[0]
        torch.matmul(scan.grouped(g), scan.B[s:e, :, :, :, None], out=scan.grouped(d_du[s:e, :, :, None]))
        torch.matmul(scan.grouped(scan.du[s:e, :, :, None]).transpose(-1, -2), scan.grouped(g),
                     out=dB[s:e, :, :, None, :])
        # d(decay_t) = g_t h_{t-1}; times decay_t it is the gradient of the exponent delta_t A.
        x = scan.inp[:n]
        torch.mul(g, decay, out=x)
        x[1:].mul_(hs[:-1])
        x[0].mul_(starts[c])
        A_c = scan.A_block(s, e)
        if scan.modality is None:
            dA += torch.einsum("tbdn,tbd->dn", x, scan.dt[s:e])
        else:
            contrib = (x * scan.dt[s:e, :, :, None]).flatten(0, 1)
            dA.index_add_(0, scan.modality[:, s:e].transpose(0, 1).flatten(), contrib)
        torch.sum(x.mul_(A_c), dim=-1, out=d_dt[s:e])
    return d_dt, d_du, dA, dB, dC, carry


class SelectiveScanFn(torch.autograd.Function):
    """Autograd node of the chunked selective scan; see the module docstring."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus, chunk_length,
                initial_state):
        ct = torch.promote_types(u.dtype, torch.float32)
        batch, dim, length = u.shape
        raw = delta.to(ct)
        if delta_bias is not None:
            raw = raw + delta_bias.to(ct)[:, None]
        dt = F.softplus(raw) if delta_softplus else raw
        uc = u.to(ct)
        grouped_in = B.dim() == 4
        Bg = B if grouped_in else B[:, None]
        Cg = C if grouped_in else C[:, None]
        scan = _Scan(dt.permute(2, 0, 1).contiguous(), (dt * uc).permute(2, 0, 1).contiguous(), A.to(ct),
                     Bg.to(ct).permute(3, 0, 1, 2).contiguous(), Cg.to(ct).permute(3, 0, 1, 2).contiguous(),
                     modality, _document_starts(seq_idx, ct),
                     chunk_length or _chunk_length(batch, dim, A.shape[-1]))
        y, starts = _forward(scan, uc.new_zeros(batch, dim, A.shape[-1]) if initial_state is None else
                             initial_state.to(ct))
        y = y.permute(1, 2, 0)
        if D is not None:
            y = y + D.to(ct)[:, None] * uc
        out = y if z is None else y * F.silu(z.to(ct))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, modality, raw, y, starts)
        ctx.delta_softplus = delta_softplus
        ctx.initial_dtype = None if initial_state is None else initial_state.dtype
        ctx.scan = scan
        ctx.set_materialize_grads(False)
        return out.to(u.dtype), starts[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, modality, raw, y, starts = ctx.saved_tensors
        scan = ctx.scan
        ct = y.dtype
        uc = u.to(ct)
        dout = torch.zeros_like(y) if dout is None else dout.to(ct)
        dz = None
        if z is not None:
            zc = z.to(ct)
            sig = torch.sigmoid(zc)
            dz = (dout * y * sig * (1 + zc * (1 - sig))).to(z.dtype)
            dout = dout * zc * sig
        dD = None if D is None else (dout * uc).sum((0, 2)).to(D.dtype)
        d_dt, d_du, dA, dB, dC, d_initial = _backward(scan, starts, dout.permute(2, 0, 1).contiguous(),
                                                      None if dlast is None else dlast.to(ct))
        d_dt = (d_dt + d_du * uc.permute(2, 0, 1)).permute(1, 2, 0)
        du = (d_du * scan.dt).permute(1, 2, 0)
        if D is not None:
            du = du + dout * D.to(ct)[:, None]
        if ctx.delta_softplus:
            d_dt = d_dt * torch.sigmoid(raw)
        d_bias = None if delta_bias is None else d_dt.sum((0, 2)).to(delta_bias.dtype)
        dB = dB.permute(1, 2, 3, 0)
        dC = dC.permute(1, 2, 3, 0)
        if B.dim() == 3:
            dB, dC = dB[:, 0], dC[:, 0]
        d_initial = None if ctx.initial_dtype is None else d_initial.to(ctx.initial_dtype)
        return (du.to(u.dtype), d_dt.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz,
                d_bias, None, None, None, None, d_initial)


def selective_scan(*, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, modality,
                   seq_idx=None, initial_state=None, chunk_length=None):
    """The reference backend's :func:`momkit.ops.selective_scan` (arguments already checked).

    ``chunk_length`` overrides the positions per chunk; the result does not depend on it.
    """
    out, last = SelectiveScanFn.apply(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus,
                                      chunk_length, initial_state)
    return (out, last) if return_last_state else out
