"""Routed layers: a linear layer, RMSNorms and a depthwise causal conv with one weight set per modality.

Each layer takes ``n_modalities``: ``None`` builds the shared layer (weights as in ``torch.nn``), an int
``M`` the routed one, whose every parameter gains a leading modality dimension (``weight`` of a routed
linear layer is ``(M, out, in)``). Both are called as ``layer(x, modality)`` with ``modality`` of ``x``'s
leading shape, so a block reads the same whichever of its sublayers are routed.

A routed layer applies to each token only the weights of that token's modality, never every modality's
weights to every token: the linear layer calls :func:`momkit.ops.routed_linear` (on a GPU, the Triton
backend's grouped matmul, which reads the tokens in place; on the CPU, one matmul per modality present); the
norm and the conv, which are elementwise in the channels, gather each token's own weights. A modality absent
from the batch gets exactly zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from momkit import ops


def _sharing(n_modalities: int | None) -> str:
    return "shared" if n_modalities is None else f"routed over {n_modalities} modalities"


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as one that training does not decay, and return it."""
    param._no_weight_decay = True
    return param


def decays(param: nn.Parameter) -> bool:
    """Whether training decays ``param``: a matrix (two or more dimensions) not marked by :func:`no_weight_decay`."""
    return param.dim() >= 2 and not getattr(param, "_no_weight_decay", False)


def _param(n_modalities: int | None, *shape: int) -> nn.Parameter:
    full = shape if n_modalities is None else (n_modalities, *shape)
    return nn.Parameter(torch.empty(full))


class Linear(nn.Module):
    """``y = x W^T + b``, with ``W`` ``(out, in)`` shared, or ``(M, out, in)`` routed by modality (or by expert:
    ``(n_ids, out, in)`` in an expert sublayer)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n_modalities: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features, self.n_modalities = in_features, out_features, n_modalities
        self.backend = backend
        self.weight = _param(n_modalities, out_features, in_features)
        self.bias = no_weight_decay(_param(n_modalities, out_features)) if bias else None
        self.choice = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``x (..., in)``, ``modality (...)`` -> ``(..., out)``. A layer of an expert sublayer applies the weights
        of the expert ids its block's router chose (``choice``, see :mod:`momkit.experts`) instead."""
        if self.n_modalities is None:
            return F.linear(x, self.weight, self.bias)
        if self.choice is None:
            return ops.routed_linear(x, self.weight, self.bias, modality, backend=self.backend)
        return ops.routed_linear(x, self.weight, self.bias, self.choice.ids, order=self.choice.order,
                                 groups=self.choice.groups, backend=self.backend)

    def extra_repr(self) -> str:
        sharing = _sharing(self.n_modalities) if self.choice is None else f"{self.n_modalities} expert weight sets"
        return f"{self.in_features} -> {self.out_features}, bias={self.bias is not None}, {sharing}"


class RMSNorm(nn.Module):
    """``y = x / rms(x) * w``, with ``w`` ``(d,)`` shared or ``(M, d)`` routed by modality; the mean square summed
    in float32 at least, returned in ``x``'s dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, n_modalities: int | None = None):
        super().__init__()
        self.dim, self.eps, self.n_modalities = dim, eps, n_modalities
        self.weight = no_weight_decay(_param(n_modalities, dim))
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``x (..., d)``, ``modality (...)`` -> ``(..., d)``, through ``F.rms_norm`` (one fused kernel on a GPU,
        which sums the squares in float32 for 16-bit inputs)."""
        if self.n_modalities is None and self.weight.dtype == x.dtype:
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        weight = self.weight if self.n_modalities is None else self.weight[modality]
        return (F.rms_norm(x, (self.dim,), eps=self.eps) * weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, {_sharing(self.n_modalities)}"


class GatedRMSNorm(nn.Module):
    """``y = rmsnorm(x * silu(z)) * w`` normalised per group of ``group_size`` channels, with ``w`` ``(d,)``
    shared or ``(M, d)`` routed by modality (mamba_ssm's ``RMSNormGated`` with ``norm_before_gate=False``);
    computed in float32 at least, returned in ``x``'s dtype."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, n_modalities: int | None = None):
        super().__init__()
        self.dim, self.group_size, self.eps, self.n_modalities = dim, group_size, eps, n_modalities
        self.weight = no_weight_decay(_param(n_modalities, dim))
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``x, z (..., d)``, ``modality (...)`` -> ``(..., d)``."""
        wide = torch.promote_types(x.dtype, torch.float32)
        h = (x.to(wide) * F.silu(z.to(wide))).unflatten(-1, (-1, self.group_size))
        h = F.rms_norm(h, (self.group_size,), eps=self.eps).flatten(-2)
        return (h * (self.weight if self.n_modalities is None else self.weight[modality])).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, group_size={self.group_size}, eps={self.eps}, {_sharing(self.n_modalities)}"


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time: ``y_t = sum_j w[:, j] x_{t-k+1+j} + b``.

    ``w`` is ``(d, k)`` shared or ``(M, d, k)`` routed, in which case each output position uses the weights of
    its own modality.
    """

    def __init__(self, dim: int, kernel_size: int, bias: bool = True, n_modalities: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.dim, self.kernel_size, self.n_modalities, self.backend = dim, kernel_size, n_modalities, backend
        self.weight = no_weight_decay(_param(n_modalities, dim, kernel_size))
        self.bias = no_weight_decay(_param(n_modalities, dim)) if bias else None
        bound = 1 / math.sqrt(kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, modality: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """``x (b, l, d)``, ``modality (b, l)`` -> ``(b, l, d)`` in ``x``'s dtype (:func:`momkit.ops.causal_conv1d`).

        With ``seq_idx (b, l)`` (packed documents), no output sees an input of another document.
        """
        return ops.causal_conv1d(x.mT, self.weight, self.bias, seq_idx,
                                 modality=None if self.n_modalities is None else modality, backend=self.backend).mT

    def prefill(self, x: torch.Tensor, conv_state: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` over ``x (b, l, d)`` after the inputs held in ``conv_state (b, d, k)`` (the last ``k``
        inputs, oldest first, as :meth:`step` keeps them), which then holds the last ``k`` inputs of ``x``'s."""
        k = self.kernel_size
        joined = torch.cat([conv_state[..., 1:].mT.to(x.dtype), x], dim=1)
        y = self.forward(joined, torch.cat([modality[:, :1].expand(-1, k - 1), modality], dim=1))[:, k - 1:]
        conv_state.copy_(joined[:, -k:].mT)
        return y

    def step(self, x: torch.Tensor, conv_state: torch.Tensor, modality: torch.Tensor,
             activation: str | None = None) -> torch.Tensor:
        """Decode one position: append ``x (b, d)`` to ``conv_state (b, d, k)`` (the last ``k`` inputs, oldest
        first) in place and return the output ``(b, d)``, through ``activation`` (``None`` or ``"silu"``);
        ``modality (b,)``."""
        return ops.conv_state_update(x, conv_state, self.weight, self.bias, activation,
                                     modality=None if self.n_modalities is None else modality, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, kernel_size={self.kernel_size}, bias={self.bias is not None}, " \
               f"{_sharing(self.n_modalities)}"
