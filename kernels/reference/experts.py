"""The learned experts' router logits, the places of their token slots and the mixes of their outputs in PyTorch
(:func:`momkit.ops.router_logits`, :func:`momkit.ops.expert_slots`, :func:`momkit.ops.gated_residual`,
:func:`momkit.ops.gated_mix`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from momkit.experts import sort_slots


def router_logits(*, x: torch.Tensor, weight: torch.Tensor, modality: torch.Tensor | None,
                  eps: float) -> torch.Tensor:
    """``rms(x) W^T`` in ``x``'s and ``weight``'s dtype, at least float32: ``weight (e, d)``, or ``(M, e, d)``
    with each position's row picked by ``modality`` (every set's logits are computed and the position's kept, so
    the host never waits for the device)."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    h = F.rms_norm(x.to(dtype), (x.shape[-1],), eps=eps)
    if weight.dim() == 2:
        return F.linear(h, weight.to(dtype))
    n_sets, e, d = weight.shape
    every = F.linear(h, weight.to(dtype).reshape(n_sets * e, d)).unflatten(-1, (n_sets, e))
    return torch.take_along_dim(every, modality[..., None, None], dim=-2).squeeze(-2)


def expert_slots(*, ids: torch.Tensor, modality: torch.Tensor, n_ids: int, n_modalities: int, n_experts: int,
                 capacity_factor: float | None) -> tuple[torch.Tensor, ...]:
    """:func:`momkit.experts.sort_slots`: a radix sort, a search for the ranks, and scatters."""
    return sort_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor)


def gated_residual(*, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate branch``: ``torch.addcmul``, in the dtype ``x + branch`` has."""
    return torch.addcmul(x, gate, branch)


def gated_mix(*, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate (y - x)``: ``torch.lerp`` with one weight per position."""
    return torch.lerp(x, y, gate)
