"""The whole multimodal model: modality adapters, a stack of blocks, a final norm and modality heads; and
:func:`build_block` and :func:`build_model`, which build them from specs through the registry."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from momkit.batch import Batch
from momkit.blocks import Block, Layout
from momkit.errors import SpecError
from momkit.experts import RouterSummary, attach
from momkit.generation import Generation, generate
from momkit.ops.checks import check_ids
from momkit.registry import get_registry
from momkit.routing import RMSNorm
from momkit.spec import BlockSpec, ModelSpec
from momkit.weights import DEFAULT_SHARD_BYTES, save_weights

DEFAULT_NORM_EPS = 1e-5
SPEC_FILE = "spec.yaml"


def build_block(spec: BlockSpec | ModelSpec | dict[str, Any]) -> Block:
    """Build one block from a spec: a :class:`BlockSpec`, its dict form, or a :class:`ModelSpec` without
    ``layers`` (one of its identical layers).

    The block is the spec's backbone's block class, built as ``block(config, modalities, routed, backend)``
    with the spec's ``scan_backend`` as the backend of every kernel operation, and ``bidirectional=`` the spec's
    bidirectional modalities when it names some and the class supports them.

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
    options = {"bidirectional": tuple(spec.bidirectional)} if spec.bidirectional and \
        backbone.block.supports_bidirectional else {}
    block = backbone.block(spec.backbone, spec.modality_names, spec.routed, spec.scan_backend, **options)
    if block.experts is not None:
        attach(block, backbone.sublayers)
    return block


def build_blocks(spec: ModelSpec) -> nn.ModuleList:
    """The ``backbone.n_layers`` blocks of a model spec, bottom first (:meth:`ModelSpec.blocks`).

    Raises:
        SpecError: a block cannot be built from its spec (an expert sublayer that holds more than linear layers);
            for a spec with ``layers``, the message starts with the pattern entry at fault (``layers.1: ...``).
    """
    blocks = nn.ModuleList()
    for i, block in enumerate(spec.blocks()):
        try:
            blocks.append(build_block(block))
        except SpecError as exc:
            raise SpecError(f"layers.{i % len(spec.layers)}: {exc}" if spec.stacked else str(exc)) from None
    return blocks


@dataclass
class ModelOutput:
    """Predictions of a model for a :class:`Batch`, addressable by modality name.

    For a discrete modality, ``predictions[name]`` holds the logits ``(N, vocab_size)`` of the next token at
    every position whose next position is of that modality and in the same document; for a continuous one,
    the head's output ``(N, latent_dim)`` at the modality's own positions. ``targets[name]`` is the ``(b, l)``
    mask of the positions predicted, in the row-major order of ``predictions[name]``.

    Attributes:
        hidden: ``(b, l, d_model)`` the final-norm output.
        predictions: ``{name: (N, out)}``.
        targets: ``{name: (b, l) bool}``.
        router: The routers' losses and loads (:class:`momkit.experts.RouterSummary`) of a model with learned
            experts, whose ``aux_loss`` training adds to the objectives' loss; ``None`` without experts.
    """

    hidden: torch.Tensor
    predictions: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]
    router: RouterSummary | None = None


def _next_of(modality: torch.Tensor, seq_idx: torch.Tensor | None, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(b, l)`` of the positions whose successor is of modality ``i`` (same document), and of those
    successors."""
    follows = torch.zeros_like(modality, dtype=torch.bool)
    follows[:, :-1] = modality[:, 1:] == i
    if seq_idx is not None:
        follows[:, :-1] &= seq_idx[:, 1:] == seq_idx[:, :-1]
    target = torch.zeros_like(follows)
    target[:, 1:] = follows[:, :-1]
    return follows, target


class TimestepEmbedding(nn.Module):
    """A diffusion step as a ``d_model`` vector, added to the adapter's output of a continuous modality's
    noised latents (as Transfusion conditions on the step): sinusoidal features of the step, then
    ``Linear, SiLU, Linear``.

    Args:
        d_model: Width of the output.
        features: Number of sinusoidal features (half cosines, half sines).
        max_period: Longest period of the features, in steps.
    """

    def __init__(self, d_model: int, features: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.features, self.max_period = features, max_period
        self.mlp = nn.Sequential(nn.Linear(features, d_model), nn.SiLU(), nn.Linear(d_model, d_model))

    def forward(self, steps: torch.Tensor) -> torch.Tensor:
        """``steps (N,)`` float -> ``(N, d_model)``."""
        half = self.features // 2
        weight = self.mlp[0].weight
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=steps.device) / half)
        angles = steps.to(freqs.dtype)[:, None] * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(weight.dtype))


class Model(nn.Module):
    """A model built from a :class:`momkit.ModelSpec` by :func:`build_model`.

    Attributes:
        spec: The spec it was built from.
        adapters: ``{name: module}`` mapping a modality's tokens or latents to ``d_model``.
        blocks: The ``n_layers`` blocks.
        final_norm: RMSNorm after the last block, routed when the spec routes ``final_norm``.
        heads: ``{name: module}`` mapping ``d_model`` to a modality's logits or latents.
        timestep_embeddings: ``{name: TimestepEmbedding}`` of each continuous modality, added to its
            adapter's output at its positions for the diffusion step of ``batch.timesteps`` (0 if not given).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        registry = get_registry()
        d_model = spec.backbone.d_model
        kinds = [registry.get("modality", m.kind) for m in spec.modalities]
        self.adapters = nn.ModuleDict({m.name: k.build_adapter(m, d_model) for m, k in zip(spec.modalities, kinds)})
        self.blocks = build_blocks(spec)
        n = len(spec.modalities) if "final_norm" in spec.routed else None
        self.final_norm = RMSNorm(d_model, eps=getattr(spec.backbone, "norm_eps", DEFAULT_NORM_EPS), n_modalities=n)
        self.heads = nn.ModuleDict({m.name: k.build_head(m, d_model) for m, k in zip(spec.modalities, kinds)})
        for m in spec.modalities:
            if m.tie_embeddings:
                self._tie(m.name)
        self.timestep_embeddings = nn.ModuleDict({m.name: TimestepEmbedding(d_model) for m in spec.modalities
                                                  if not m.discrete})

    def _tie(self, name: str) -> None:
        adapter, head = self.adapters[name], self.heads[name]
        weight = getattr(adapter, "weight", None)
        if not isinstance(weight, nn.Parameter) or getattr(head, "weight", None) is None or \
                head.weight.shape != weight.shape:
            raise SpecError(f"modality {name!r} sets tie_embeddings, but its adapter and head have no weights of "
                            f"one shape to share (adapter {type(adapter).__name__}, head {type(head).__name__}); "
                            f"valid: tie_embeddings false, or a (vocab_size, d_model) weight in both")
        head.weight = weight

    @property
    def modalities(self):
        """The spec's modality settings, in modality-id order."""
        return self.spec.modalities

    def check(self, batch: Batch) -> None:
        """Raise ``ValueError`` naming what is wrong with ``batch`` for this model."""
        modality = batch.modality
        if not isinstance(modality, torch.Tensor) or modality.dim() != 2 or modality.dtype != torch.int64:
            got = f"{tuple(modality.shape)} {modality.dtype}" if isinstance(modality, torch.Tensor) else modality
            raise SpecError(f"batch.modality must be a (b, l) int64 tensor, got {got}")
        check_ids(modality, len(self.modalities), names=[m.name for m in self.modalities], label="batch.modality",
                  cpu_only=False)
        continuous = [m.name for m in self.modalities if not m.discrete]
        unknown = sorted(set(batch.latents) - set(continuous))
        if unknown:
            raise SpecError(f"batch.latents has {unknown}, not continuous modalities of this model; "
                            f"its continuous modalities: {continuous or 'none'}")
        for i, m in enumerate(self.modalities):
            where = modality == i
            if not bool(where.any()):
                continue
            if m.discrete:
                self._check_tokens(batch.tokens, where, m)
            else:
                latents = batch.latents.get(m.name)
                want = (*modality.shape, m.latent_dim)
                if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != want:
                    got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else None
                    raise SpecError(f"batch.latents[{m.name!r}] must be {want} = (b, l, latent_dim) since "
                                    f"modality {m.name!r} occurs; got {got}")
        unknown = sorted(set(batch.timesteps) - set(continuous))
        if unknown:
            raise SpecError(f"batch.timesteps has {unknown}, not continuous modalities of this model; "
                            f"its continuous modalities: {continuous or 'none'}")
        for name, steps in batch.timesteps.items():
            if not isinstance(steps, torch.Tensor) or steps.shape != modality.shape or not steps.is_floating_point():
                got = f"{tuple(steps.shape)} {steps.dtype}" if isinstance(steps, torch.Tensor) else steps
                raise SpecError(f"batch.timesteps[{name!r}] must be a float tensor of shape {tuple(modality.shape)}, "
                                f"got {got}")
        if batch.seq_idx is not None and (batch.seq_idx.shape != modality.shape or batch.seq_idx.is_floating_point()):
            raise SpecError(f"batch.seq_idx must be an integer tensor of shape {tuple(modality.shape)}, got "
                            f"{tuple(batch.seq_idx.shape)} {batch.seq_idx.dtype}")

    @staticmethod
    def _check_tokens(tokens: Any, where: torch.Tensor, m) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.shape != where.shape or tokens.dtype != torch.int64:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else tokens
            raise SpecError(f"batch.tokens must be a {tuple(where.shape)} int64 tensor since discrete modality "
                            f"{m.name!r} occurs; got {got}")
        bad = where & ((tokens < 0) | (tokens >= m.vocab_size))
        if bool(bad.any()):
            row, pos = (int(v) for v in bad.nonzero()[0])
            raise SpecError(f"token id {int(tokens[row, pos])} at batch row {row}, position {pos} is out of range "
                            f"for modality {m.name!r} (vocab_size {m.vocab_size}): valid ids are "
                            f"0..{m.vocab_size - 1}")

    def embed(self, modality: torch.Tensor, tokens: torch.Tensor | None, latents: Mapping[str, torch.Tensor],
              timesteps: Mapping[str, torch.Tensor] | None = None):
        """``(*, d_model)`` inputs of the blocks for positions of ``modality (*)``: each adapter's output, plus,
        for a continuous modality, the embedding of its latents' diffusion step (``timesteps``; 0 if absent).

        Every adapter and step embedding runs, on no positions for an absent modality, so that every parameter
        takes part in every forward pass (its gradient is zero, never missing, which data-parallel reductions
        rely on).
        """
        weight = next(self.parameters())
        h = torch.zeros(*modality.shape, self.spec.backbone.d_model, dtype=weight.dtype, device=weight.device)
        timesteps = timesteps or {}
        for i, m in enumerate(self.modalities):
            where = modality == i
            if m.discrete:
                inputs = tokens[where] if tokens is not None else torch.zeros(0, dtype=torch.int64, device=h.device)
                h[where] = self.adapters[m.name](inputs).to(h.dtype)
                continue
            inputs = latents[m.name][where] if m.name in latents else h.new_zeros(0, m.latent_dim)
            steps = timesteps[m.name][where] if m.name in timesteps else h.new_zeros(inputs.shape[0])
            h[where] = (self.adapters[m.name](inputs) + self.timestep_embeddings[m.name](steps)).to(h.dtype)
        return h

    def _embed_rows(self, modality: torch.Tensor, tokens: torch.Tensor, latents: Mapping[str, torch.Tensor]):
        """:meth:`embed` of one position per row, ``modality (b,)``, without selecting rows by a mask (which reads
        the mask's count on the host): every adapter runs on every row, each row keeps its own modality's output,
        so that a decoding step can be captured in a CUDA graph."""
        weight = next(self.parameters())
        h = torch.zeros(*modality.shape, self.spec.backbone.d_model, dtype=weight.dtype, device=weight.device)
        for i, m in enumerate(self.modalities):
            where = modality == i
            if m.discrete:
                out = self.adapters[m.name](torch.where(where, tokens, 0))
            else:
                given = latents.get(m.name)
                inputs = h.new_zeros(*modality.shape, m.latent_dim) if given is None else \
                    torch.where(where[:, None], given, 0).to(h.dtype)
                out = self.adapters[m.name](inputs) + self.timestep_embeddings[m.name](h.new_zeros(modality.shape))
            h = torch.where(where[:, None], out.to(h.dtype), h)
        return h

    def forward(self, batch: Batch) -> ModelOutput:
        """Run the model on ``batch``; see :class:`ModelOutput`."""
        self.check(batch)
        h = self.embed(batch.modality, batch.tokens, batch.latents, batch.timesteps)
        layout = Layout(batch.modality, batch.seq_idx)
        for block in self.blocks:
            block.router_stats = None
        for block in self.blocks:
            h = block(h, layout)
        h = self.final_norm(h, batch.modality)
        predictions, targets = {}, {}
        for i, m in enumerate(self.modalities):
            if m.discrete:
                source, targets[m.name] = _next_of(batch.modality, batch.seq_idx, i)
            else:
                source = targets[m.name] = batch.modality == i
            predictions[m.name] = self.heads[m.name](h[source])
        return ModelOutput(hidden=h, predictions=predictions, targets=targets, router=RouterSummary.of(self.blocks))

    def allocate_state(self, batch_size: int, max_length: int | None = None) -> list:
        """Decoding state of every block for ``batch_size`` sequences."""
        return [block.decoding_state(batch_size, max_length) for block in self.blocks]

    @property
    def can_prefill(self) -> bool:
        """Whether every block takes a decoding state in ``forward`` (see :meth:`prefill`)."""
        return all(block.supports_prefill and block.experts is None for block in self.blocks)

    @property
    def can_capture(self) -> bool:
        """Whether a decoding step (:meth:`step`) can be captured in a CUDA graph: every block's class sets
        :attr:`momkit.Block.capturable_step`, none has learned experts, no modality is bidirectional."""
        return not self.spec.bidirectional and all(block.capturable_step and block.experts is None
                                                   for block in self.blocks)

    def prefill(self, tokens: torch.Tensor, modality: torch.Tensor, state: list,
                latents: Mapping[str, torch.Tensor] | None = None,
                timesteps: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed ``l`` positions per sequence in one pass: ``tokens (b, l)``, ``modality (b, l)`` (and ``latents
        {name: (b, l, dim)}`` with their diffusion ``timesteps {name: (b, l)}``); returns the final-norm output
        ``(b, l, d_model)`` and advances ``state`` as ``l`` calls of :meth:`step` would (a span of a bidirectional
        modality is seen whole). ``SpecError`` where a block takes no state in forward (:attr:`can_prefill`)."""
        h = self.embed(modality, tokens, latents or {}, timesteps)
        layout = Layout(modality)
        for block, block_state in zip(self.blocks, state):
            h = block(h, layout, state=block_state)
        return self.final_norm(h, modality)

    def step(self, tokens: torch.Tensor, modality: torch.Tensor, state: list,
             latents: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Feed one position per sequence: ``tokens (b,)``, ``modality (b,)`` (and ``latents {name: (b, dim)}``
        for continuous ones); returns the final-norm output ``(b, d_model)`` and advances ``state``. A position of
        a bidirectional modality cannot be decoded alone (its span is seen whole): ``SpecError``."""
        if self.spec.bidirectional:
            ids = torch.tensor([self.spec.modality_names.index(n) for n in self.spec.bidirectional],
                               device=modality.device)
            if bool(torch.isin(modality, ids).any()):
                raise SpecError(f"step was given a position of bidirectional modality "
                                f"{', '.join(self.spec.bidirectional)}, whose span is seen whole: run the sequence "
                                f"through forward (generate does so for sequences with bidirectional spans)")
        h = self._embed_rows(modality, tokens, latents or {})
        for block, block_state in zip(self.blocks, state):
            h = block.step(h, modality, block_state)
        return self.final_norm(h, modality)

    def generate(self, prompt: Batch, max_new_tokens: int, **options) -> Generation:
        """Sample a continuation of each prompt; see :func:`momkit.generation.generate`."""
        return generate(self, prompt, max_new_tokens, **options)

    def save(self, directory: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        """Write the model into ``directory``: its validated spec (``spec.yaml``) and its weights
        (``model.safetensors``, or shards of at most ``max_shard_bytes`` and their index); :func:`momkit.load`
        reads it back bit for bit. A tied head's weight is stored once, as its adapter's."""
        save_model(directory, self.spec, self.state_dict(), max_shard_bytes)


def tied_heads(spec: ModelSpec) -> set[str]:
    """The parameter names of the heads tied to their adapters (see ``tie_embeddings``)."""
    return {f"heads.{m.name}.weight" for m in spec.modalities if m.tie_embeddings}


def untied(spec: ModelSpec, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the weights of the heads tied to their adapters, which are stored once."""
    tied = tied_heads(spec)
    return {name: t for name, t in state.items() if name not in tied}


def save_model(directory: str | Path, spec: ModelSpec, state: Mapping[str, torch.Tensor],
               max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Write a model directory from a spec and a full state dict (see :meth:`Model.save`): into a fresh
    directory, then moved into place, so an interrupted save leaves the earlier directory whole."""
    directory = Path(directory)
    fresh = directory.with_name(directory.name + ".partial")
    shutil.rmtree(fresh, ignore_errors=True)
    save_weights(fresh, untied(spec, state), max_shard_bytes)
    (fresh / SPEC_FILE).write_text(spec.to_yaml())
    if directory.exists():
        shutil.rmtree(directory)
    fresh.rename(directory)


def build_model(spec: ModelSpec | dict[str, Any]) -> Model:
    """Build the model of a :class:`ModelSpec` (or its dict form).

    Raises:
        ValueError: the spec is invalid (a pydantic ``ValidationError`` naming each bad field).
    """
    if isinstance(spec, dict):
        spec = ModelSpec.model_validate(spec)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"build_model takes a ModelSpec or a dict, got {type(spec).__name__}")
    return Model(spec)
