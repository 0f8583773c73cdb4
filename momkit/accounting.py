"""Parameter and FLOP accounting of a model spec.

Parameters are counted on a model built on the ``meta`` device (no memory). A routed parameter has a leading
modality dimension ``M``; a token uses one of its ``M`` slices, so it counts ``1/M`` of it as active. With
deterministic routing, the parameters active per token therefore equal the dense model's, while the total
grows by ``M - 1`` copies of every routed sublayer. An expert sublayer's token uses ``top_k`` of its expert
ids, and a block with experts runs ``top_k`` times (see :mod:`momkit.experts`), so its FLOPs are ``top_k``
times the block's, plus the router's.

FLOPs are analytic: each backbone reports its forward FLOPs per token by sublayer (see
:class:`momkit.descriptors.Backbone`), a modality's adapter (with a continuous modality's step embedding) and
head count as the matmuls they are, and training costs three times the forward pass (the backward pass
computes gradients of both the inputs and the weights). A bidirectional block's backward direction (the parts
its backbone lists in ``backward_flops``, reported as ``<part>_b``) counts for the tokens of the bidirectional
modalities.
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
    """Parameters of one sublayer summed over the blocks that have it (or of one model-level part).

    In a stack of several backbones (a spec with ``layers``) the name is ``<backbone>.<sublayer>``.
    """

    name: str
    total: int
    active: int
    layers: int
    routed_layers: int
    expert_layers: int = 0

    @property
    def routed(self) -> bool:
        """Whether every layer that has the sublayer routes it."""
        return self.routed_layers == self.layers

    @property
    def routing(self) -> str:
        """``routed``, ``experts``, ``shared``, or ``routed in k of n layers`` (``experts in ...``) where a stack
        routes it in some layers only."""
        for count, word in ((self.routed_layers, "routed"), (self.expert_layers, "experts")):
            if count == self.layers:
                return word
            if count:
                return f"{word} in {count} of {self.layers} layers"
        return "shared"


@dataclass(frozen=True)
class Accounting:
    """What :func:`account` reports for a spec.

    Attributes:
        sublayers: Block sublayers summed over layers, then ``final_norm``.
        adapters: ``{modality: parameters}`` of each modality's input adapter (with, for a continuous one, its
            diffusion-step embedding).
        heads: ``{modality: parameters}`` of each modality's output head (none for a head tied to its adapter).
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


def _size(part: torch.nn.Module | torch.Tensor) -> int:
    """Parameters of a sublayer: a module's, or a parameter's own elements."""
    return _numel(part) if isinstance(part, torch.nn.Module) else part.numel()


def _per_modality(block, name: str) -> bool:
    """Whether ``block`` holds one copy of sublayer ``name`` per modality: a routed sublayer, or the router of
    experts ``per_modality``."""
    experts = block.experts
    return name in block.routed or (name == "router" and experts is not None and experts.per_modality)


def _active(block, name: str, size: int) -> int:
    """Parameters of sublayer ``name`` (``size`` in all) that one token uses: ``1/M`` of a routed one (or of a
    per-modality router), ``top_k`` of the expert ids of an expert one."""
    experts = block.experts
    if experts is not None and name in experts.sublayers:
        return size * experts.top_k // block.router.n_ids
    return size // block.n_modalities if _per_modality(block, name) else size


def _step_embedding_flops(embedding: torch.nn.Module) -> float:
    """Forward FLOPs per token of a :class:`momkit.model.TimestepEmbedding`: its two matmuls."""
    first, last = embedding.mlp[0], embedding.mlp[2]
    return 2.0 * (first.in_features * first.out_features + last.in_features * last.out_features)


def _distinct(layers: list) -> list[tuple]:
    """``[(layer spec, how many layers have it)]``, in order of first appearance."""
    counted: list[list] = []
    for layer in layers:
        for entry in counted:
            if entry[0] == layer:
                entry[1] += 1
                break
        else:
            counted.append([layer, 1])
    return [tuple(entry) for entry in counted]


def account(spec: ModelSpec, seq_len: int = 2048) -> Accounting:
    """Parameters and training FLOPs of ``spec`` at sequence length ``seq_len`` (which matters to the parts whose
    cost per token grows with the context: attention, chunked scans)."""
    with torch.device("meta"):
        model = Model(spec)
    routed, n_modalities = spec.routed, len(spec.modalities)
    registry = get_registry()
    layer_specs = spec.blocks()
    kinds = list(dict.fromkeys(b.backbone.kind for b in layer_specs))
    qualify = len(kinds) > 1
    sublayers = []
    for kind in kinds:
        mine = [(block, layer) for block, layer in zip(model.blocks, layer_specs) if layer.backbone.kind == kind]
        names = list(registry.get("backbone", kind).sublayers)
        names += ["router"] if any(block.experts is not None for block, _ in mine) else []
        for name in names:
            parts = [(block, getattr(block, name, None)) for block, _ in mine]
            parts = [(block, part) for block, part in parts if part is not None]
            if not parts:
                continue
            total = sum(_size(part) for _, part in parts)
            active = sum(_active(block, name, _size(part)) for block, part in parts)
            routed_layers = sum(_per_modality(block, name) for block, _ in parts)
            expert_layers = sum(block.experts is not None and name in block.experts.sublayers for block, _ in parts)
            sublayers.append(SublayerParameters(f"{kind}.{name}" if qualify else name, total, active, len(parts),
                                                routed_layers, expert_layers))
    norm = _numel(model.final_norm)
    sublayers.append(SublayerParameters("final_norm", norm, norm // n_modalities if "final_norm" in routed else norm,
                                        1, int("final_norm" in routed)))
    steps = {m.name: _numel(model.timestep_embeddings[m.name]) for m in spec.modalities if not m.discrete}
    adapters = {m.name: _numel(model.adapters[m.name]) + steps.get(m.name, 0) for m in spec.modalities}
    heads = {m.name: _numel(model.heads[m.name]) - (model.heads[m.name].weight.numel() if m.tie_embeddings else 0)
             for m in spec.modalities}
    blocks_active = sum(s.active for s in sublayers)
    active = {m.name: blocks_active + adapters[m.name] + heads[m.name] for m in spec.modalities}

    per_layer: dict[str, float] = {}
    backward: dict[str, float] = {}
    for layer, count in _distinct(layer_specs):
        kind = layer.backbone.kind
        experts = layer.routing.experts
        backbone = registry.get("backbone", kind)
        parts = backbone.flops(layer.backbone, seq_len)
        if experts is not None:
            parts = {part: experts.top_k * value for part, value in parts.items()}
            parts["router"] = 4.0 * layer.backbone.d_model + 2.0 * layer.backbone.d_model * experts.n_experts
        for part, value in parts.items():
            key = f"{kind}.{part}" if qualify else part
            per_layer[key] = per_layer.get(key, 0.0) + count * value
            if layer.bidirectional and part in backbone.backward_flops:
                backward[f"{key}_b"] = backward.get(f"{key}_b", 0.0) + count * value
    d_model = spec.backbone.d_model
    flops = {}
    for m in spec.modalities:
        width = m.vocab_size if m.discrete else m.latent_dim
        parts = {**per_layer, **(backward if m.name in spec.bidirectional else {})}
        parts["final_norm"] = 4.0 * d_model
        parts["adapter"] = 0.0 if m.discrete else 2.0 * m.latent_dim * d_model + _step_embedding_flops(
            model.timestep_embeddings[m.name])
        parts["head"] = 2.0 * d_model * width
        flops[m.name] = {part: TRAINING_FACTOR * value for part, value in parts.items()}
    return Accounting(sublayers=sublayers, adapters=adapters, heads=heads, total=_numel(model), active=active,
                      training_flops=flops)
