"""Single-position state updates of decoding, in PyTorch: the definitions the fused kernels are tested against.

Both work in any layout their front doors accept, in the state's dtype (float32, or float64 for ground
truth), and update the state in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pick(param: torch.Tensor | None, modality: torch.Tensor | None, dims: int) -> torch.Tensor | None:
    """``param`` of ``dims`` dimensions as is, or one per modality (a leading ``M``) gathered to ``(b, ...)``,
    broadcast against a ``(b, ...)`` tensor either way."""
    if param is None or param.dim() == dims:
        return param
    return param[modality]


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           modality=None):
    """:func:`momkit.ops.selective_state_update` in PyTorch."""
    channels = state.dim() - 2
    wide = state.dtype
    if dt_bias is not None:
        dt = dt + _pick(dt_bias, modality, channels)
    dt = dt.to(wide)
    if dt_softplus:
        dt = F.softplus(dt)
    if channels == 2:
        heads_per_group = state.shape[1] // B.shape[1]
        B = B.repeat_interleave(heads_per_group, dim=1)[:, :, None]
        C = C.repeat_interleave(heads_per_group, dim=1)[:, :, None]
    else:
        B, C = B[:, None], C[:, None]
    decay = torch.exp(dt[..., None] * _pick(A, modality, channels + 1).to(wide))
    state.mul_(decay).add_((dt * x.to(wide))[..., None] * B.to(wide))
    y = (state * C.to(wide)).sum(-1)
    if D is not None:
        y = y + x.to(wide) * _pick(D, modality, channels).to(wide)
    if z is not None:
        y = y * F.silu(z.to(wide))
    return y.to(x.dtype)


def conv_state_update(x, conv_state, weight, bias=None, activation=None, modality=None):
    """:func:`momkit.ops.conv_state_update` in PyTorch."""
    conv_state.copy_(torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1))
    y = (conv_state * _pick(weight, modality, 2)).sum(-1)
    if bias is not None:
        y = y + _pick(bias, modality, 1)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
