"""Mamba-2 state-space duality (SSD) scan in PyTorch: the chunked algorithm, with its own backward pass.

Each head's recurrence ``s_t = exp(a_t) s_{t-1} + dt_t x_t B_t^T`` (``a_t = dt_t A``) has one scalar decay per
position, so it factors into matrix products (Dao & Gu 2024, "Transformers are SSMs"). The sequence is cut
into ``c`` chunks of ``T`` positions and, with ``cs`` the cumulative sum of ``a`` inside each chunk:

- intra-chunk: ``y_diag = (L * C B^T) @ (dt x)`` per chunk and head, ``L_ij = exp(cs_i - cs_j)``, ``j <= i``;
- chunk states: ``states[k + 1] = exp(cs_T) states[k] + B^T @ (w x)`` with ``w_j = exp(cs_T - cs_j) dt_j``,
  a loop over the chunks on ``(b, h, p, n)`` states, which exist only at chunk boundaries;
- off-diagonal output: ``y_off_i = exp(cs_i) C_i states[k]``;
- then ``out = (y_diag + y_off + D x) silu(z)``.

Every exponent is a difference of cumulative sums inside one chunk: ``L`` takes the exponential of the
lower triangle only (the upper one is zeroed first and masked by ``C B^T``), so for a negative ``A`` no
exponent is positive, and nothing is divided by a decay product. Packed documents (``seq_idx``) are masks:
a position sees only positions and carried states of its own document. The chunks are balanced to at most
``chunk_size`` positions each and the last one is padded with zero positions (``dt = 0``: no input, no
decay), so the result does not depend on the chunk size.

Layouts. ``B`` and ``C`` are shared by the ``hg = h / g`` heads of a group, so every product with a state
runs once per chunk and group over all its heads, a ``(T, n) x (n, hg p)`` or ``(n, T) x (T, hg p)``
matmul in the *grouped* layout ``(c, b, g, T, hg, p)``, which for one group and ``b = 1`` is the input's
own memory; only the ``T x T`` products of ``y_diag`` run per head, in the *head* layout
``(c, b, g, hg, T, p)``. The chunk loops work one chunk at a time so that its state stays in cache.

Backward. ``y`` depends on ``cs_i`` through ``exp(cs_i)`` factors only, which gives the row terms of the
gradient of ``cs`` as ``dy_i . y_i``; the loop runs the chunks in reverse with the adjoint state; the
gradients of ``B`` and ``C`` through ``C B^T`` come from one ``T x T`` matrix per group. Kept for it: the
``T x T`` matrices ``L`` and ``L * C B^T``, ``dt x`` in the head layout, the chunk states and ``y``.
Without gradients (inference) none of this is kept and only two chunk states exist at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _Geometry(NamedTuple):
    """Sizes of one scan: chunks, batch, groups, heads per group, chunk length, head dim, state, length."""

    c: int
    b: int
    g: int
    hg: int
    T: int
    p: int
    n: int
    l: int

    @property
    def pad(self) -> int:
        return self.c * self.T - self.l


def _geometry(x: torch.Tensor, B: torch.Tensor, chunk_size: int) -> _Geometry:
    """Chunks of at most ``chunk_size`` positions, balanced so that the last one is padded the least."""
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    c = -(-l // chunk_size)
    return _Geometry(c, b, g, h // g, -(-l // c), p, n, l)


def _pad(t: torch.Tensor, pad: int) -> torch.Tensor:
    """``t (b, l, ...)`` with ``pad`` zero positions appended along ``l``."""
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) if pad else t


def _to_grouped(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``(b, l, h, p)`` as a grouped-layout view ``(c, b, g, T, hg, p)``, padded along ``l``."""
    c, b, g, hg, T, p, _, _ = geo
    return _pad(t, geo.pad).view(b, c, T, g, hg, p).permute(1, 0, 3, 2, 4, 5)


def _from_grouped(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """Grouped layout ``(c, b, g, T, hg, p)`` back to ``(b, l, h, p)``."""
    c, b, g, hg, T, p, _, l = geo
    return t.permute(1, 0, 3, 2, 4, 5).reshape(b, c * T, g * hg, p)[:, :l]


def _scalars_to_chunks(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``(b, l, h)`` as ``(c, b, g, hg, T)``."""
    c, b, g, hg, T, _, _, _ = geo
    return _pad(t, geo.pad).view(b, c, T, g, hg).permute(1, 0, 3, 4, 2).contiguous()


def _scalars_from_chunks(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``(c, b, g, hg, T)`` back to ``(b, l, h)``."""
    c, b, g, hg, T, _, _, l = geo
    return t.permute(1, 0, 4, 2, 3).reshape(b, c * T, g * hg)[:, :l]


def _groups_to_chunks(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``(b, l, g, n)`` as ``(c, b, g, T, n)``."""
    c, b, g, _, T, _, n, _ = geo
    return _pad(t, geo.pad).view(b, c, T, g, n).permute(1, 0, 3, 2, 4).contiguous()


def _groups_from_chunks(t: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``(c, b, g, T, n)`` back to ``(b, l, g, n)``."""
    c, b, g, _, T, _, n, l = geo
    return t.permute(1, 0, 3, 2, 4).reshape(b, c * T, g, n)[:, :l]


def _state_to_chunk(s: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """A state ``(b, h, p, n)`` in the layout of the chunk states, ``(b, g, n, hg, p)``."""
    _, b, g, hg, _, p, n, _ = geo
    return s.view(b, g, hg, p, n).permute(0, 1, 4, 2, 3)


def _state_from_chunk(s: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """A chunk state ``(b, g, n, hg, p)`` back to ``(b, h, p, n)``, as a new tensor."""
    _, b, g, hg, _, p, n, _ = geo
    return s.permute(0, 1, 3, 4, 2).reshape(b, g * hg, p, n).clone()


class _Masks(NamedTuple):
    """Which positions and carried states of a chunk belong to one document, as broadcastable masks.

    ``causal (c, b, 1, T, T)`` bool: position ``i`` sees position ``j``; ``to_state (c, b, 1, 1, T)``:
    position ``j`` reaches the state at its chunk's end; ``from_state (c, b, 1, 1, T)``: position ``i`` sees
    the state carried into its chunk; ``carry (c, b, 1, 1)``: the carried state crosses the chunk.
    All are ``None`` for a single document.
    """

    causal: torch.Tensor | None = None
    to_state: torch.Tensor | None = None
    from_state: torch.Tensor | None = None
    carry: torch.Tensor | None = None


def _masks(doc: torch.Tensor | None, geo: _Geometry, dtype: torch.dtype) -> _Masks:
    """The masks of non-decreasing document ids ``doc (b, l)``; the padding continues the last document."""
    if doc is None:
        return _Masks()
    c, b, _, _, T, _, _, _ = geo
    doc = torch.cat([doc, doc[:, -1:].expand(b, geo.pad)], dim=1).view(b, c, T).transpose(0, 1)
    causal = (doc[..., :, None] == doc[..., None, :]).tril_()
    end = doc[..., -1]
    start = torch.cat([doc[:1, :, 0], end[:-1]])
    return _Masks(causal[:, :, None], (doc == end[..., None]).to(dtype)[:, :, None, None],
                  (doc == start[..., None]).to(dtype)[:, :, None, None], (end == start).to(dtype)[..., None, None])


def _masked_CB(Bc: torch.Tensor, Cc: torch.Tensor, masks: _Masks) -> torch.Tensor:
    """``C_i . B_j`` per chunk and group, ``(c, b, g, T, T)``, zero where ``i`` does not see ``j``."""
    CB = torch.matmul(Cc, Bc.transpose(-1, -2))
    return CB.tril_() if masks.causal is None else CB.masked_fill_(~masks.causal, 0)


def _decay_matrix(cs: torch.Tensor) -> torch.Tensor:
    """``L (c, b, g, hg, T, T)`` from ``cs (c, b, g, hg, T)``: ``L_ij = exp(cs_i - cs_j)`` for ``j <= i`` and
    1 above the diagonal, where the masked ``C B^T`` it multiplies is zero."""
    return (cs[..., :, None] - cs[..., None, :]).tril_().exp_()


def _boundary_decays(cs: torch.Tensor, masks: _Masks):
    """Decays between positions and chunk boundaries, from ``cs (c, b, g, hg, T)``.

    Returns ``to_state (c, b, g, hg, T)``, from each position to its chunk's end, ``from_state`` of the same
    shape, from the chunk's start to each position, and ``carry (c, b, g, hg)``, across each chunk.
    """
    to_state = (cs[..., -1:] - cs).exp_()
    from_state = cs.exp()
    carry = cs[..., -1].exp()
    if masks.carry is not None:
        to_state.mul_(masks.to_state)
        from_state.mul_(masks.from_state)
        carry.mul_(masks.carry)
    return to_state, from_state, carry


def _D_grouped(D: torch.Tensor, geo: _Geometry) -> torch.Tensor:
    """``D (h,)`` or ``(h, p)`` broadcastable against the grouped layout ``(c, b, g, T, hg, p)``."""
    return D.view(geo.g, 1, geo.hg, -1)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched matmul over all leading dimensions: ``(..., i, k) @ (..., k, j)``."""
    out = torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out.view(*a.shape[:-2], *out.shape[-2:])


class SSDScanFn(torch.autograd.Function):
    """Chunked SSD of ``x (b, l, h, p)``, ``dt, a (b, l, h)`` (``a = dt A``), ``B, C (b, l, g, n)``, optional
    ``D (h,)`` or ``(h, p)``, ``z (b, l, h, p)`` and initial state ``s0 (b, h, p, n)``, with documents given
    by non-decreasing ids ``doc (b, l)`` or ``None``. ``training``: a backward pass may follow.

    Returns ``out = (y + D x) silu(z)`` ``(b, l, h, p)``, ``y`` the scan's output, and the final state
    ``(b, h, p, n)``.
    """

    @staticmethod
    def forward(ctx, x, dt, a, B, C, D, z, s0, doc, chunk_size, training):
        geo = _geometry(x, B, chunk_size)
        c, b, g, hg, T, p, n, _ = geo
        masks = _masks(doc, geo, x.dtype)
        dth = _scalars_to_chunks(dt, geo)
        cs = _scalars_to_chunks(a, geo).cumsum(-1)
        Bc, Cc = _groups_to_chunks(B, geo), _groups_to_chunks(C, geo)
        xg = _to_grouped(x, geo)
        to_state, from_state, carry = _boundary_decays(cs, masks)
        # Without a backward pass L becomes M in place and only the current and next chunk states are kept.

        dtx = torch.mul(xg.transpose(3, 4), dth[..., None], out=x.new_empty(c, b, g, hg, T, p))
        L = _decay_matrix(cs)
        CB = _masked_CB(Bc, Cc, masks)[:, :, :, None]
        M = L * CB if training else L.mul_(CB)

        # One x-sized buffer holds w * x for the chunk states, then y_diag.
        work = x.new_empty(c, b, g, T, hg, p)
        wx = torch.mul(xg, (to_state * dth).transpose(-1, -2).contiguous()[..., None], out=work)
        wx = wx.view(c, b * g, T, hg * p)
        Bt, Cf = Bc.view(c, b * g, T, n).transpose(-1, -2), Cc.view(c, b * g, T, n)
        slots = c + 1 if training else 2
        states = x.new_empty(slots, b, g, n, hg, p)
        states[0] = 0 if s0 is None else _state_to_chunk(s0, geo)
        flat_states = states.view(slots, b * g, n, hg * p)
        y = x.new_empty(c, b * g, T, hg * p)
        for k in range(c):
            now, nxt = k % slots, (k + 1) % slots
            torch.bmm(Cf[k], flat_states[now], out=y[k])
            torch.mul(states[now], carry[k, :, :, None, :, None], out=states[nxt])
            flat_states[nxt].baddbmm_(Bt[k], wx[k])
        y_diag = torch.bmm(M.view(-1, T, T), dtx.view(-1, T, p), out=work.view(-1, T, p))
        y = y.view(c, b, g, T, hg, p).mul_(from_state.transpose(-1, -2).contiguous()[..., None])
        y.add_(y_diag.view(c, b, g, hg, T, p).transpose(3, 4))
        del work, wx, y_diag

        if D is not None:
            y.addcmul_(xg, _D_grouped(D, geo))
        if z is not None:
            zg = _to_grouped(z, geo)
            out = torch.sigmoid(zg).mul_(zg).mul_(y)
        else:
            out = y
        ctx.save_for_backward(x, D, z, dtx, dth, cs, Bc, Cc, states, L, M, y, doc)
        ctx.geo = geo
        ctx.has_s0 = s0 is not None
        return _from_grouped(out, geo), _state_from_chunk(states[c % slots], geo)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dfinal):
        x, D, z, dtx, dth, cs, Bc, Cc, states, L, M, y, doc = ctx.saved_tensors
        geo = ctx.geo
        c, b, g, hg, T, p, n, _ = geo
        masks = _masks(doc, geo, x.dtype)
        xg = _to_grouped(x, geo)
        dy = _to_grouped(dout, geo)

        # Two x-sized work buffers, each holding several intermediates in turn.
        work_a, work_b = x.new_empty(c, b, g, T, hg, p), x.new_empty(c, b, g, T, hg, p)

        # The gate and the skip: out = y silu(z), y = y_ssd + D x (the saved y includes D x).
        dz = dD = None
        if z is not None:
            zg = _to_grouped(z, geo)
            d_silu = torch.sigmoid(zg, out=work_b)
            dz = torch.mul(dy, y)
            silu = torch.mul(d_silu, zg)
            d_silu.addcmul_(silu, d_silu, value=-1).add_(silu)  # silu'(z) = sigmoid(z) + silu(z) (1 - sigmoid(z))
            dz.mul_(d_silu)
            del d_silu
            dy = silu.mul_(dy)
        # y_ssd_i depends on cs_i through exp(cs_i) factors only: d y_ssd_i / d cs_i = y_ssd_i.
        dcs = torch.linalg.vecdot(dy, y)
        if D is not None:
            if D.dim() == 1:
                dy_x = torch.linalg.vecdot(dy, xg)
                dcs.sub_(dy_x * D.view(g, 1, hg))
            else:
                dy_x = torch.mul(dy, xg, out=work_a)
                dcs.sub_(torch.linalg.vecdot(dy_x, _D_grouped(D, geo)))
            dD = dy_x.sum((0, 1, 3)).view(D.shape)
            del dy_x
        dcs = dcs.transpose(-1, -2)
        to_state, from_state, carry = _boundary_decays(cs, masks)

        # The chunks in reverse, through y_off = from_state * (C @ states[k]) and the recurrence
        # states[k + 1] = carry * states[k] + B^T @ (w * x) with w = to_state * dt; d_state holds the
        # gradient of states[k + 1], the state after chunk k. The work buffers hold from_state * dy and w * x.
        edy = torch.mul(dy, from_state.transpose(-1, -2).contiguous()[..., None], out=work_a)
        edy = edy.view(c, b * g, T, hg * p)
        w = to_state * dth
        w_t = w.transpose(-1, -2).contiguous()[..., None]
        wx = torch.mul(xg, w_t, out=work_b).view(c, b * g, T, hg * p)
        flat_states = states.view(c + 1, b * g, n, hg * p)
        Bf, Cf = Bc.view(c, b * g, T, n), Cc.view(c, b * g, T, n)
        dB, dC = torch.empty_like(Bf), torch.empty_like(Cf)
        dx = torch.empty_like(wx)
        d_carry = carry.new_empty(c, b, g, hg)
        d_state = _state_to_chunk(dfinal, geo).clone(memory_format=torch.contiguous_format)
        spare = torch.empty_like(d_state)
        for k in range(c - 1, -1, -1):
            flat_d = d_state.view(b * g, n, hg * p)
            torch.sum(torch.linalg.vecdot(d_state, states[k]), 2, out=d_carry[k])
            torch.bmm(wx[k], flat_d.transpose(-1, -2), out=dB[k])
            torch.bmm(Bf[k], flat_d, out=dx[k])
            torch.bmm(edy[k], flat_states[k].transpose(-1, -2), out=dC[k])
            if k or ctx.has_s0:
                torch.mul(d_state, carry[k, :, :, None, :, None], out=spare)
                spare.view(b * g, n, hg * p).baddbmm_(Cf[k].transpose(-1, -2), edy[k])
                d_state, spare = spare, d_state
        del edy, wx, spare
        ds0 = _state_from_chunk(d_state, geo) if ctx.has_s0 else None
        dx = dx.view(c, b, g, T, hg, p)
        dw = torch.linalg.vecdot(dx, xg).transpose(-1, -2)
        dx.mul_(w_t)
        ddt = dw * to_state
        dw.mul_(w)
        dcs.sub_(dw)
        dcs[..., -1] += dw.sum(-1) + d_carry.mul_(carry)

        # Intra-chunk y_diag = M @ (dt * x), M = L * C B^T; the work buffers hold dy in the head layout and
        # the gradient of dt * x.
        dyh = work_a.view(c, b, g, hg, T, p).copy_(dy.transpose(3, 4))
        d_dtx = torch.bmm(M.view(-1, T, T).transpose(-1, -2), dyh.view(-1, T, p), out=work_b.view(-1, T, p))
        d_dtx = d_dtx.view(c, b, g, hg, T, p)
        dCB = _bmm(dyh, dtx.transpose(-1, -2)).mul_(L).sum(3)
        del dyh, work_a
        dCB = dCB.tril_() if masks.causal is None else dCB.masked_fill_(~masks.causal, 0)
        dC = dC.view(c, b, g, T, n) + _bmm(dCB, Bc)
        dB = dB.view(c, b, g, T, n) + _bmm(dCB.transpose(-1, -2), Cc)
        v = torch.linalg.vecdot(d_dtx, xg.transpose(3, 4))
        ddt += v
        dcs.sub_(v.mul_(dth))
        dx.add_(d_dtx.mul_(dth[..., None]).transpose(3, 4))
        del d_dtx, work_b
        if D is not None:
            dx.addcmul_(dy, _D_grouped(D, geo))

        da = dcs.flip(-1).cumsum(-1).flip(-1)
        return (_from_grouped(dx, geo), _scalars_from_chunks(ddt, geo), _scalars_from_chunks(da, geo),
                _groups_from_chunks(dB, geo), _groups_from_chunks(dC, geo), dD,
                None if dz is None else _from_grouped(dz, geo), ds0, None, None, None)


def _documents(seq_idx: torch.Tensor) -> torch.Tensor:
    """Non-decreasing document ids ``(b, l)``: 0 at the start, +1 wherever ``seq_idx`` changes."""
    changed = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()
    return F.pad(changed.cumsum(1), (1, 0))


def ssd_scan(*, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
             return_final_states, modality):
    """The reference backend's :func:`momkit.ops.ssd_scan` (arguments already checked).

    ``x, z: (b, l, h, p)``; ``dt: (b, l, h)``; ``A: (h,)``, or ``(M, h)`` with ``modality: (b, l)``;
    ``B, C: (b, l, g, n)``; ``D: (h,)`` or ``(h, p)``; ``dt_bias: (h,)``; ``initial_states: (b, h, p, n)``;
    ``seq_idx: (b, l)``. Computes in float32, or in float64 when x, dt, A, B or C is; returns ``out`` in
    ``x``'s dtype and, when ``return_final_states``, the final state ``(b, h, p, n)`` in the compute dtype.
    """
    ct = torch.float64 if torch.float64 in (x.dtype, dt.dtype, A.dtype, B.dtype, C.dtype) else torch.float32
    b, l, h, p = x.shape
    xc = x.to(ct)
    dtc = dt.to(ct)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(ct)
    if dt_softplus:
        dtc = F.softplus(dtc)
    if l == 0:
        out = x.new_zeros(x.shape)
        final = xc.new_zeros(b, h, p, B.shape[3]) if initial_states is None else initial_states.to(ct)
    else:
        a = dtc * (A.to(ct) if modality is None else A.to(ct)[modality])
        inputs = (xc, dtc, a, B.to(ct), C.to(ct), None if D is None else D.to(ct), None if z is None else z.to(ct),
                  None if initial_states is None else initial_states.to(ct))
        training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        out, final = SSDScanFn.apply(*inputs, None if seq_idx is None else _documents(seq_idx), chunk_size,
                                     training)
        out = out.to(x.dtype)
    return (out, final) if return_final_states else out
