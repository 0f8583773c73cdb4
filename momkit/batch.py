"""The one input type of a model: a batch of interleaved multimodal sequences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass
class Batch:
    """A batch of interleaved multimodal sequences.

    Attributes:
        modality: ``(b, l)`` int64 modality id of each position (the index into the spec's modalities).
        tokens: ``(b, l)`` int64 token ids, read at the positions of discrete modalities (other entries are
            ignored); required when a discrete modality occurs.
        latents: ``{name: (b, l, latent_dim)}`` for each continuous modality that occurs, read at its positions.
        seq_idx: optional ``(b, l)`` integer document index for packed sequences; no position sees another
            document.
        timesteps: ``{name: (b, l)}`` float diffusion step of the latents of a continuous modality, read at its
            positions (a diffusion objective sets it when it noises them); a continuous modality left out is
            clean, step 0.
    """

    modality: torch.Tensor
    tokens: torch.Tensor | None = None
    latents: Mapping[str, torch.Tensor] = field(default_factory=dict)
    seq_idx: torch.Tensor | None = None
    timesteps: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        """The batch on ``device``."""
        move = (lambda t: None if t is None else t.to(device))
        return Batch(move(self.modality), move(self.tokens), {k: v.to(device) for k, v in self.latents.items()},
                     move(self.seq_idx), {k: v.to(device) for k, v in self.timesteps.items()})


def segments(modality: torch.Tensor, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """``(b, l)`` id of the run of one modality within one document each position is in (a segment: one image,
    one caption), numbered ``0, 1, ...`` over the whole batch in row-major order."""
    starts = torch.ones_like(modality, dtype=torch.bool)
    starts[:, 1:] = modality[:, 1:] != modality[:, :-1]
    if seq_idx is not None:
        starts[:, 1:] |= seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts.flatten().cumsum(0).view_as(modality) - 1
