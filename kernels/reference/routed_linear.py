"""The routed linear layer in PyTorch: the positions sorted by modality, one matmul per modality present.

Portable and exact, but it reads the modality counts on the host (a synchronisation on a GPU) and moves every
position twice (a gather before the matmuls and a scatter after); the Triton backend does neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  modality: torch.Tensor) -> torch.Tensor:
    """``x (..., in)``, ``weight (M, out, in)``, ``bias (M, out)`` or ``None``, ``modality (...)`` ->
    ``(..., out)``, each position multiplied by its own modality's matrix."""
    n_modalities, out_features, in_features = weight.shape

    def one(rows: torch.Tensor, m: int) -> torch.Tensor:
        return F.linear(rows, weight[m], None if bias is None else bias[m])

    flat_x = x.reshape(-1, in_features)
    flat_m = modality.reshape(-1)
    counts = torch.bincount(flat_m, minlength=n_modalities).tolist()
    present = [m for m, c in enumerate(counts) if c]
    if len(present) <= 1:
        return one(x, present[0] if present else 0)
    order = torch.argsort(flat_m, stable=True)
    groups = flat_x.index_select(0, order).split(counts)
    y_sorted = torch.cat([one(groups[m], m) for m in present])
    y = y_sorted.new_empty(y_sorted.shape).index_copy_(0, order, y_sorted)
    return y.view(*x.shape[:-1], out_features)
