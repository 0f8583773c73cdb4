"""The block contract shared by every backbone, and :func:`build_block`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from momkit.ops.checks import check_ids
from momkit.registry import get_registry
from momkit.spec import BlockSpec, ModelSpec


class Block(nn.Module):
    """Base class of backbone blocks: one pre-norm residual layer over interleaved modalities.

    Subclasses implement ``forward(x, modality, seq_idx=None)`` for ``x (b, l, d_model)``, ``modality (b, l)``
    int64 and, for packed documents, ``seq_idx (b, l)`` (no position sees another document),
    ``allocate_state(batch_size)`` and ``step(x_t, modality_t, state)`` for ``x_t (b, d_model)`` and
    ``modality_t (b,)``, which updates ``state`` in place; and call :meth:`check_inputs` first, so that a
    caller's mistake is a ``ValueError`` before any kernel runs.

    Attributes:
        d_model: Width of the residual stream.
        modalities: Modality names; a token of modality id ``i`` is of ``modalities[i]``.
        routed: The sublayers that hold one weight set per modality.
    """

    def __init__(self, d_model: int, modalities: list[str], routed: frozenset[str]):
        super().__init__()
        self.d_model = d_model
        self.modalities = list(modalities)
        self.routed = frozenset(routed)

    @property
    def n_modalities(self) -> int:
        """Number of modalities ``M``, the leading dimension of routed parameters."""
        return len(self.modalities)

    def routing(self, sublayer: str) -> int | None:
        """``n_modalities`` for a routed ``sublayer``, ``None`` for a shared one (see :mod:`momkit.routing`)."""
        return self.n_modalities if sublayer in self.routed else None

    def check_inputs(self, x: torch.Tensor, modality: torch.Tensor, seq_idx: torch.Tensor | None = None,
                     step: bool = False) -> None:
        """Check ``x (b, l, d_model)``, ``modality (b, l)`` and the optional ``seq_idx (b, l)`` of packed
        documents (``(b, d_model)`` and ``(b,)`` for a step)."""
        form = "(b, d_model)" if step else "(b, l, d_model)"
        if not isinstance(x, torch.Tensor) or x.dim() != (2 if step else 3) or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be {form} with d_model = {self.d_model}, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if not isinstance(modality, torch.Tensor) or tuple(modality.shape) != tuple(x.shape[:-1]):
            got = tuple(modality.shape) if isinstance(modality, torch.Tensor) else type(modality).__name__
            raise ValueError(f"modality must be {'(b,)' if step else '(b, l)'} = {tuple(x.shape[:-1])} "
                             f"to match x, got {got}")
        if modality.dtype != torch.int64:
            raise ValueError(f"modality must be int64, got {modality.dtype}")
        if modality.device != x.device:
            raise ValueError(f"modality is on {modality.device} but x is on {x.device}")
        check_ids(modality, self.n_modalities, names=self.modalities)
        if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != modality.shape
                                    or seq_idx.dtype not in (torch.int32, torch.int64)
                                    or seq_idx.device != x.device):
            got = (f"{tuple(seq_idx.shape)} {seq_idx.dtype} on {seq_idx.device}" if isinstance(seq_idx, torch.Tensor)
                   else type(seq_idx).__name__)
            raise ValueError(f"seq_idx must be an int32 or int64 tensor of shape {tuple(modality.shape)} on "
                             f"{x.device}, like modality; got {got}")


def build_block(spec: BlockSpec | ModelSpec | dict[str, Any]) -> Block:
    """Build one block from a spec: a :class:`BlockSpec`, its dict form, or a :class:`ModelSpec` (one layer).

    Raises:
        ValueError: the spec is invalid (a pydantic ``ValidationError`` naming each bad field).
    """
    if isinstance(spec, dict):
        spec = BlockSpec.model_validate(spec)
    if isinstance(spec, ModelSpec):
        spec = spec.block()
    if not isinstance(spec, BlockSpec):
        raise TypeError(f"build_block takes a BlockSpec, a ModelSpec or a dict, got {type(spec).__name__}")
    backbone = get_registry().get("backbone", spec.backbone.kind)
    return backbone.build(spec.backbone, spec.modality_names, spec.routed, spec.scan_backend)
