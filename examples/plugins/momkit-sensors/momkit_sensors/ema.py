"""The ``ema`` backbone: a gated exponential moving average over time, a small recurrent block written from
momkit's plugin docs (``momkit.Block``) to show a third-party backbone.

One block is ``y = x + out_proj(h * silu(g))`` with ``u, g = in_proj(norm(x))`` and, per channel,
``h_t = a_t h_{t-1} + (1 - a_t) u_t``, ``a_t = sigmoid(decay)``; with ``decay`` routed, each position uses its
modality's decay rates. ``h`` restarts from zero at every document's first position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from momkit import Block, Layout
from momkit.routing import Linear, RMSNorm, no_weight_decay
from momkit.spec import BackboneConfig

SUBLAYERS = ("norm", "in_proj", "decay", "out_proj")


class EmaConfig(BackboneConfig):
    """Options of the ``ema`` backbone."""

    expand: int = Field(1, gt=0, description="Channels of the moving average: expand * d_model.")


@dataclass
class EmaState:
    """Decoding state of one block: the moving average ``(b, expand * d_model)``."""

    h: torch.Tensor


class EmaBlock(Block):
    """One ``ema`` layer whose sublayers are shared or routed as the spec says."""

    config: EmaConfig

    def __init__(self, config: EmaConfig, modalities: list[str], routed: frozenset[str], backend: str = "auto"):
        super().__init__(config, modalities, routed, backend)
        d, width = config.d_model, config.expand * config.d_model
        self.norm = RMSNorm(d, n_modalities=self.routing("norm"))
        self.in_proj = Linear(d, 2 * width, bias=False, n_modalities=self.routing("in_proj"), backend=backend)
        copies = () if self.routing("decay") is None else (self.n_modalities,)
        self.decay = no_weight_decay(nn.Parameter(torch.zeros(*copies, width)))
        self.out_proj = Linear(width, d, bias=False, n_modalities=self.routing("out_proj"), backend=backend)

    def _rates(self, modality: torch.Tensor) -> torch.Tensor:
        """``a`` of each position, ``(*modality.shape, width)``."""
        decay = self.decay if self.routing("decay") is None else self.decay[modality]
        return torch.sigmoid(decay).expand(*modality.shape, self.decay.shape[-1])

    def run(self, x: torch.Tensor, layout: Layout, state: EmaState | None = None) -> torch.Tensor:
        modality = layout.modality
        u, g = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        a = self._rates(modality)
        starts = torch.zeros(modality.shape, dtype=torch.bool, device=x.device)
        if layout.seq_idx is not None:
            starts[:, 1:] = layout.seq_idx[:, 1:] != layout.seq_idx[:, :-1]
        h, outputs = torch.zeros_like(u[:, 0]), []
        for t in range(x.shape[1]):
            h = a[:, t] * h.masked_fill(starts[:, t, None], 0.0) + (1 - a[:, t]) * u[:, t]
            outputs.append(h)
        return x + self.out_proj(torch.stack(outputs, dim=1) * F.silu(g), modality)

    def run_step(self, x: torch.Tensor, layout: Layout, state: EmaState) -> torch.Tensor:
        modality = layout.modality
        u, g = self.in_proj(self.norm(x, modality), modality).chunk(2, dim=-1)
        a = self._rates(modality)
        state.h = a * state.h + (1 - a) * u
        return x + self.out_proj(state.h * F.silu(g), modality)

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> EmaState:
        weight = self.in_proj.weight
        return EmaState(h=torch.zeros(batch_size, self.decay.shape[-1], dtype=weight.dtype, device=weight.device))


def flops(config: EmaConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one block."""
    d, width = config.d_model, config.expand * config.d_model
    return {"norm": 4.0 * d, "in_proj": 2.0 * d * 2 * width, "decay": 6.0 * width, "out_proj": 2.0 * width * d}
