"""The causal convolution of :func:`momkit.ops.causal_conv1d` in PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_position(param: torch.Tensor, modality: torch.Tensor | None, dims: int) -> torch.Tensor:
    """``param`` (``(c, ...)``) broadcast against ``(b, c, l)``, or, one per modality (a leading ``M``), gathered
    to each position's ``(b, c, l)``."""
    if param.dim() == dims:
        return param[:, None]
    return param[modality].movedim(-1, 1)


def causal_conv1d(*, x, weight, bias, seq_idx, modality):
    """:func:`momkit.ops.causal_conv1d` in PyTorch: the depthwise convolution kernel for shared weights over
    whole rows; a sum over the taps, in the weights' precision, otherwise."""
    k, length = weight.shape[-1], x.shape[-1]
    if weight.dim() == 2 and seq_idx is None:
        y = F.conv1d(x, weight[:, None].to(x.dtype), None if bias is None else bias.to(x.dtype), padding=k - 1,
                     groups=x.shape[1])
        return y[..., :length]
    padded = F.pad(x, (k - 1, 0))
    if seq_idx is not None:
        padded_idx = F.pad(seq_idx, (k - 1, 0))
    y = 0 if bias is None else _per_position(bias, modality, 1)
    for j in range(k):
        term = padded[..., j:j + length] * _per_position(weight[..., j], modality, 1)
        if seq_idx is not None and j < k - 1:
            term = term * (padded_idx[:, j:j + length] == seq_idx)[:, None]
        y = y + term
    return y.to(x.dtype)
