"""The ``umamba`` backbone: a 3x3 convolution over each image's patch grid, then momkit's Mamba mixer.

One block is two residual steps::

    g = x + grid_proj(silu(grid_conv(grid_norm(x))))     at positions of grid_modality only
    y = g + mamba_mixer(norm(g))                          every position (momkit's Mamba block)

``grid_conv`` is a depthwise 3x3 convolution whose taps read the patch grid of the image span the position is
in: a position at offset ``o`` of its span sits at row ``o // grid_size``, column ``o % grid_size``, and the tap
``(dr, dc)`` reads the span's position ``o + dr * grid_size + dc`` when that lies in the same span and the
column ``o % grid_size + dc`` is on the grid. The spans and offsets are momkit's ``Spans`` of the grid modality:
index arithmetic on the device.

Causal by default: the convolution then uses the five taps at or before the position in raster order (the
row above and the position's left neighbour, as PixelCNN's masked convolution does), so no output depends
on a later position. When the spec makes ``grid_modality`` bidirectional, the convolution uses all nine taps
and the Mamba mixer adds its backward scan over the span: the image is seen whole, as U-Mamba sees it.

The grid sublayers act on ``grid_modality`` alone; they are routable like the rest, but only that modality's
copy is ever used, so route the Mamba mixer's sublayers (the ``mom`` preset) rather than ``all``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from momkit import Layout
from momkit.blocks import Spans
from momkit.errors import SpecError
from momkit.plugins import mamba
from momkit.routing import Linear, RMSNorm

GRID = ("grid_norm", "grid_conv", "grid_proj")
SUBLAYERS = (*mamba.SUBLAYERS, *GRID)
TAPS = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1))
CAUSAL_TAPS = tuple((dr, dc) for dr, dc in TAPS if dr < 0 or (dr == 0 and dc <= 0))


class UMambaConfig(mamba.MambaConfig):
    """Options of the ``umamba`` backbone: the ``mamba`` backbone's and the patch grid's."""

    grid_modality: str = Field("image", description="Modality (by name) whose spans are patch grids.")
    grid_size: int = Field(4, ge=1, description="Patches per row of an image: a span of grid_size ** 2 "
                                                "positions is one image, in raster order.")


class GridConv(nn.Module):
    """Depthwise 3x3 weights ``(9, d)`` and bias ``(d,)``, or one of each per modality (a leading ``M``)."""

    def __init__(self, dim: int, n_modalities: int | None = None):
        super().__init__()
        copies = () if n_modalities is None else (n_modalities,)
        self.n_modalities = n_modalities
        self.weight = nn.Parameter(torch.randn(*copies, len(TAPS), dim) / len(TAPS))
        self.bias = nn.Parameter(torch.zeros(*copies, dim))

    def of(self, modality: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``(..., 9, d)`` and bias ``(..., d)`` of positions ``modality (...)`` (broadcastable)."""
        if self.n_modalities is None:
            return self.weight, self.bias
        return self.weight[modality], self.bias[modality]


@dataclass
class UMambaState:
    """Decoding state: the Mamba mixer's, the last ``grid_size + 2`` normalised inputs (oldest first) and each
    row's offset in its current image span (-1 outside one)."""

    mixer: mamba.MambaState
    window: torch.Tensor  # (b, grid_size + 2, d_model)
    offset: torch.Tensor  # (b,) int64


class UMambaBlock(mamba.MambaBlock):
    """One U-Mamba layer: the patch-grid convolution, then the Mamba mixer; routed as the spec says."""

    config: UMambaConfig
    supports_prefill = False

    def __init__(self, config: UMambaConfig, modalities: list[str], routed: frozenset[str], backend: str = "auto", *,
                 bidirectional: tuple[str, ...] = ()):
        super().__init__(config, modalities, routed, backend, bidirectional=bidirectional)
        if config.grid_modality not in self.modalities:
            raise SpecError(f"grid_modality {config.grid_modality!r} is not a modality of this block; its "
                            f"modalities: {', '.join(self.modalities)}")
        d = config.d_model
        self.grid_norm = RMSNorm(d, eps=config.norm_eps, n_modalities=self.routing("grid_norm"))
        self.grid_conv = GridConv(d, n_modalities=self.routing("grid_conv"))
        self.grid_proj = Linear(d, d, bias=False, n_modalities=self.routing("grid_proj"), backend=backend)

    @property
    def _grid_id(self) -> int:
        return self.modalities.index(self.config.grid_modality)

    @property
    def _taps(self) -> tuple[tuple[int, int], ...]:
        return TAPS if self.config.grid_modality in self.bidirectional else CAUSAL_TAPS

    def _grid(self, x: torch.Tensor, modality: torch.Tensor, conv: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``x`` plus the grid step's output ``grid_proj(silu(conv))`` at the ``grid`` positions."""
        return x + torch.where(grid[..., None], self.grid_proj(F.silu(conv), modality), 0.0)

    def run(self, x: torch.Tensor, layout: Layout, state: UMambaState | None = None) -> torch.Tensor:
        """``x (b, l, d_model)`` -> ``(b, l, d_model)``; see :meth:`momkit.Block.run`."""
        modality, g = layout.modality, self.config.grid_size
        length = x.shape[1]
        images = Spans.of(layout, [self._grid_id])
        grid, runs, column = images.mask, images.segments, images.offset % g
        index = torch.arange(length, device=x.device).expand_as(modality)
        h = self.grid_norm(x, modality)
        weight, bias = self.grid_conv.of(modality)
        conv = bias.expand_as(h)
        for dr, dc in self._taps:
            source = index + dr * g + dc
            inside = grid & (source >= 0) & (source < length) & (column + dc >= 0) & (column + dc < g)
            source = source.clamp(0, length - 1)
            inside &= runs.gather(1, source) == runs
            tap = weight[..., TAPS.index((dr, dc)), :]
            conv = conv + torch.where(inside[..., None], h.gather(1, source[..., None].expand_as(h)) * tap, 0.0)
        return super().run(self._grid(x, modality, conv, grid), layout)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> UMambaState:
        """The mixer's zero state, an empty window and no current span."""
        weight = self.in_proj.weight
        return UMambaState(mixer=super().allocate_state(batch_size, max_length),
                           window=torch.zeros(batch_size, self.config.grid_size + 2, self.d_model, dtype=weight.dtype,
                                              device=weight.device),
                           offset=torch.full((batch_size,), -1, dtype=torch.int64, device=weight.device))

    def run_step(self, x: torch.Tensor, layout: Layout, state: UMambaState) -> torch.Tensor:
        """Decode one position (causal taps only: a bidirectional image is never decoded position by position)."""
        modality, g = layout.modality, self.config.grid_size
        grid = modality == self._grid_id
        state.offset.copy_(torch.where(grid, state.offset + 1, -1))
        h = self.grid_norm(x, modality)
        state.window.copy_(torch.cat([state.window[:, 1:], h[:, None]], dim=1))
        weight, bias = self.grid_conv.of(modality)
        column = state.offset % g
        conv = bias.expand_as(h)
        for dr, dc in CAUSAL_TAPS:
            delta = dr * g + dc
            inside = grid & (state.offset + delta >= 0) & (column + dc >= 0) & (column + dc < g)
            tap = weight[..., TAPS.index((dr, dc)), :]
            conv = conv + torch.where(inside[..., None], state.window[:, g + 1 + delta] * tap, 0.0)
        return super().run_step(self._grid(x, modality, conv, grid), layout, state.mixer)


def present(config: UMambaConfig, bidirectional: bool) -> tuple[str, ...]:
    """The Mamba mixer's sublayers for these options, and the grid's."""
    return (*mamba.present(config, bidirectional), *GRID)


def flops(config: UMambaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token: the Mamba mixer's, and the grid step's (counted for every token, though only the
    grid modality's run it): the norm, nine taps, and ``grid_proj``."""
    d = config.d_model
    return {**mamba.flops(config, seq_len), "grid_norm": 4.0 * d, "grid_conv": 2.0 * len(TAPS) * d,
            "grid_proj": 2.0 * d * d}
