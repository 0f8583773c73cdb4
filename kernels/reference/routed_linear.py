"""The routed linear layer in PyTorch: the positions sorted by modality, one matmul per modality present.

Portable and exact, but it reads the modality counts on the host (a synchronisation on a GPU) and, unless the
positions come sorted by modality (``groups``), moves every position twice (a gather before the matmuls and a
scatter after); the Triton backend does neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  modality: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``x (..., in)``, ``weight (M, out, in)``, ``bias (M, out)`` or ``None``, ``modality (...)`` ->
    ``(..., out)``, each position multiplied by its own modality's matrix. With ``groups`` (the ends of the
    groups of positions already sorted by id), the positions are taken where they lie: no sort, gather or
    scatter."""
    n_modalities, out_features, in_features = weight.shape

    def one(rows: torch.Tensor, m: int) -> torch.Tensor:
        return F.linear(rows, weight[m], None if bias is None else bias[m])

    flat_x = x.reshape(-1, in_features)
    flat_m = modality.reshape(-1)
    if groups is None:
        counts = torch.bincount(flat_m, minlength=n_modalities).tolist()
    else:
        ends = groups.tolist()
        counts = [end - start for start, end in zip([0, *ends[:-1]], ends)]
    present = [m for m, c in enumerate(counts) if c]
    if len(present) <= 1:
        return one(x, present[0] if present else 0)
    if groups is None:
        order = torch.argsort(flat_m, stable=True)
        flat_x = flat_x.index_select(0, order)
    parts = flat_x.split(counts)
    y = torch.cat([one(parts[m], m) for m in present])
    if groups is None:
        y = y.new_empty(y.shape).index_copy_(0, order, y)
    return y.view(*x.shape[:-1], out_features)
