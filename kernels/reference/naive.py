"""Per-token recurrences: the definitions the fast kernels are tested against.

Both functions step through the sequence one position at a time, in the dtype of their inputs (call them
with float64 tensors to get the ground truth), and are differentiable by plain autograd. They are slow by
construction and meant for tests and benchmarks only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_position_A(A: torch.Tensor, modality: torch.Tensor | None) -> torch.Tensor:
    """``A`` as ``(d, n)`` or, routed, ``(b, l, d, n)`` gathered by ``modality``."""
    return A if modality is None else A[modality]


def _keep(seq_idx: torch.Tensor | None, t: int, like: torch.Tensor) -> torch.Tensor | None:
    """``(b,)`` 1 where position ``t`` continues the document of ``t - 1``, 0 where a new one starts."""
    if seq_idx is None or t == 0:
        return None
    return (seq_idx[:, t] == seq_idx[:, t - 1]).to(like.dtype)


def naive_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False, modality=None, seq_idx=None, initial_state=None):
    """Mamba-1 selective scan, one position at a time.

    ``u, delta, z: (b, d, l)``; ``A: (d, n)``, or ``(M, d, n)`` with ``modality: (b, l)``;
    ``B, C: (b, n, l)`` or ``(b, g, n, l)``; ``D, delta_bias: (d,)``; ``seq_idx: (b, l)``, the state
    restarting from zero where it changes; ``initial_state: (b, d, n)``, the state before the first position.

    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t``, ``y_t = C_t h_t + D u_t``, ``out = y silu(z)``.
    """
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    groups = B.shape[1]
    B = B.repeat_interleave(dim // groups, dim=1)
    C = C.repeat_interleave(dim // groups, dim=1)
    A_all = _per_position_A(A, modality)
    h = u.new_zeros(batch, dim, A.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        keep = _keep(seq_idx, t, u)
        if keep is not None:
            h = h * keep[:, None, None]
        A_t = A_all if modality is None else A_all[:, t]
        h = torch.exp(delta[:, :, t, None] * A_t) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, :, :, t]
        ys.append((h * C[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


def naive_ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   dt_softplus=False, return_final_states=False, modality=None):
    """Mamba-2 SSD recurrence, one position at a time.

    ``x, z: (b, l, h, p)``; ``dt: (b, l, h)``; ``A: (h,)``, or ``(M, h)`` with ``modality: (b, l)``;
    ``B, C: (b, l, g, n)``; ``D: (h,)`` or ``(h, p)``; ``dt_bias: (h,)``; ``initial_states: (b, h, p, n)``;
    ``seq_idx: (b, l)``, the state restarting from zero where it changes.

    ``s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T``, ``y_t = s_t C_t + D x_t``, ``out = y silu(z)``.
    """
    batch, length, heads, headdim = x.shape
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    groups = B.shape[2]
    B = B.repeat_interleave(heads // groups, dim=2)
    C = C.repeat_interleave(heads // groups, dim=2)
    A_all = _per_position_A(A, modality)
    if initial_states is None:
        s = x.new_zeros(batch, heads, headdim, B.shape[-1])
    else:
        s = initial_states.to(x.dtype)
    ys = []
    for t in range(length):
        keep = _keep(seq_idx, t, x)
        if keep is not None:
            s = s * keep[:, None, None, None]
        A_t = A_all if modality is None else A_all[:, t]
        decay = torch.exp(dt[:, t] * A_t)
        s = decay[:, :, None, None] * s + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((s * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z)
    return (y, s) if return_final_states else y
