"""Parameter and FLOP accounting of a model spec.

Parameters are counted on a model built on the ``meta`` device (no memory). A routed parameter has a leading
modality dimension ``M``; a token uses one of its ``M`` slices, so it counts ``1/M`` of it as active. With
deterministic routing, the parameters active per token therefore equal the dense model's, while the total
grows by ``M - 1`` copies of every routed sublayer.

FLOPs are analytic: each backbone reports its forward FLOPs per token by sublayer (see
:class:`momkit.descriptors.Backbone`), a modality's adapter and head count as the matmuls they are, and
training costs three times the forward pass (the backward pass computes gradients of both the inputs and
the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from momkit.model import Model
from momkit.registry import get_registry
from momkit.spec import ModelSpec

TRAINING_FACTOR = 3.0


@dataclass(frozen=True)
class SublayerParameters:
    """Parameters of one sublayer summed over the blocks (or of one model-level part)."""

    name: str
    routed: bool
    total: int
    active: int


@dataclass(frozen=True)
class Accounting:
    """What :func:`account` reports for a spec.

    Attributes:
        sublayers: Block sublayers summed over layers, then ``final_norm``.
        adapters: ``{modality: parameters}`` of each modality's input adapter.
        heads: ``{modality: parameters}`` of each modality's output head.
        total: Every parameter of the model.
        active: ``{modality: parameters}`` used by one token of that modality.
        training_flops: ``{modality: {part: FLOPs}}`` per token of that modality for one training step
            (forward and backward), by block sublayer (summed over layers), ``final_norm``, ``adapter`` and
            ``head``.
    """

    sublayers: list[SublayerParameters]
    adapters: dict[str, int]
    heads: dict[str, int]
    total: int
    active: dict[str, int]
    training_flops: dict[str, dict[str, float]]

    @property
    def blocks_active(self) -> int:
        """Block and final-norm parameters active per token (the same for every modality)."""
        return sum(s.active for s in self.sublayers)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def account(spec: ModelSpec, seq_len: int = 2048) -> Accounting:
    """Parameters and training FLOPs of ``spec`` at sequence length ``seq_len`` (which matters to the parts whose
    cost per token grows with the context: attention, chunked scans)."""
    with torch.device("meta"):
        model = Model(spec)
    routed, n_modalities = spec.routed, len(spec.modalities)
    backbone = get_registry().get("backbone", spec.backbone.kind)
    sublayers = []
    for name in backbone.sublayers:
        total = sum(_numel(getattr(block, name)) if isinstance(getattr(block, name), torch.nn.Module)
                    else getattr(block, name).numel() for block in model.blocks)
        sublayers.append(SublayerParameters(name, name in routed, total,
                                            total // n_modalities if name in routed else total))
    norm = _numel(model.final_norm)
    sublayers.append(SublayerParameters("final_norm", "final_norm" in routed, norm,
                                        norm // n_modalities if "final_norm" in routed else norm))
    adapters = {m.name: _numel(model.adapters[m.name]) for m in spec.modalities}
    heads = {m.name: _numel(model.heads[m.name]) for m in spec.modalities}
    blocks_active = sum(s.active for s in sublayers)
    active = {m.name: blocks_active + adapters[m.name] + heads[m.name] for m in spec.modalities}

    per_block = backbone.flops(spec.backbone, seq_len)
    layers = spec.backbone.n_layers
    d_model = spec.backbone.d_model
    flops = {}
    for m in spec.modalities:
        width = m.vocab_size if m.discrete else m.latent_dim
        parts = {part: layers * value for part, value in per_block.items()}
        parts["final_norm"] = 4.0 * d_model
        parts["adapter"] = 0.0 if m.discrete else 2.0 * m.latent_dim * d_model
        parts["head"] = 2.0 * d_model * width
        flops[m.name] = {part: TRAINING_FACTOR * value for part, value in parts.items()}
    return Accounting(sublayers=sublayers, adapters=adapters, heads=heads, total=_numel(model), active=active,
                      training_flops=flops)
