"""What plugins return from their hooks: one small frozen record per registered name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping

from torch import nn

from momkit.ops.backend import ScanBackend

if TYPE_CHECKING:
    from momkit.spec import BackboneConfig, DatasetConfig, ModalityConfig, ObjectiveConfig

__all__ = ["Backbone", "Dataset", "Modality", "Objective", "ScanBackend"]


@dataclass(frozen=True)
class Modality:
    """A kind of token in an interleaved sequence, and how tokens of that kind enter and leave the model.

    A spec instantiates a modality with settings (its ``config`` model: a vocabulary size for discrete
    tokens, a latent dimension for continuous vectors), possibly several times under different names.

    Attributes:
        name: The ``kind`` a spec's modality entry selects it by.
        description: One line for ``momkit plugins`` and the docs.
        config: Pydantic model of its settings, a subclass of :class:`momkit.spec.ModalityConfig`.
        build_adapter: ``build_adapter(config, d_model) -> nn.Module`` mapping token ids ``(N,)`` or latents
            ``(N, latent_dim)`` to ``(N, d_model)``; by default an embedding or a linear projection.
        build_head: ``build_head(config, d_model) -> nn.Module`` mapping ``(N, d_model)`` to logits
            ``(N, vocab_size)`` or latents ``(N, latent_dim)``; by default a linear layer.
    """

    name: str
    description: str
    config: type[ModalityConfig]
    build_adapter: Callable = field(default=None)
    build_head: Callable = field(default=None)

    def __post_init__(self):
        object.__setattr__(self, "build_adapter", self.build_adapter or default_adapter)
        object.__setattr__(self, "build_head", self.build_head or default_head)


def default_adapter(config: ModalityConfig, d_model: int) -> nn.Module:
    """An embedding of ``vocab_size`` tokens, or a linear projection of ``latent_dim`` vectors, to ``d_model``."""
    if config.discrete:
        return nn.Embedding(config.vocab_size, d_model)
    return nn.Linear(config.latent_dim, d_model)


def default_head(config: ModalityConfig, d_model: int) -> nn.Module:
    """A linear map from ``d_model`` to ``vocab_size`` logits or ``latent_dim`` values."""
    return nn.Linear(d_model, config.vocab_size if config.discrete else config.latent_dim, bias=False)


@dataclass(frozen=True)
class Backbone:
    """A kind of residual layer and how to build it from a spec.

    Attributes:
        name: The ``backbone.kind`` that selects it.
        description: One line for ``momkit plugins`` and the docs.
        config: Pydantic model of its options, a subclass of :class:`momkit.spec.BackboneConfig`.
        sublayers: Names of its routable sublayers, the attributes of the built block.
        presets: Named routings, each the tuple of sublayers it routes; ``dense`` (none) and ``all`` (every
            sublayer) exist for every backbone and need not be listed.
        build: ``build(config, modalities, routed, scan_backend) -> nn.Module``: ``modalities`` is the
            spec's list of names, ``routed`` the frozenset of sublayers that get one weight set per modality,
            ``scan_backend`` the name passed to the scan front doors.
        flops: ``flops(config, seq_len) -> {part: float}``: analytic forward FLOPs per token of one block,
            keyed by sublayer name, plus keys for work without weights (``scan``, ``attention``); a matmul
            of ``in -> out`` features counts ``2 * in * out``. Routing does not change them.
    """

    name: str
    description: str
    config: type[BackboneConfig]
    sublayers: tuple[str, ...]
    build: Callable
    flops: Callable
    presets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def preset(self, name: str) -> tuple[str, ...]:
        """The sublayers routed by preset ``name``; ``ValueError`` listing this backbone's presets if unknown."""
        table = {"dense": (), "all": self.sublayers, **self.presets}
        if name not in table:
            raise ValueError(f"routing preset {name!r} is not defined for backbone {self.name!r}; "
                             f"its presets: {', '.join(sorted(table))}")
        return table[name]


@dataclass(frozen=True)
class Objective:
    """A training objective: turns a model's output for one modality into a loss.

    Attributes:
        name: The ``kind`` a spec's objective entry selects it by.
        description: One line for ``momkit plugins`` and the docs.
        config: Pydantic model of its settings, a subclass of :class:`momkit.spec.ObjectiveConfig`.
        discrete: ``True`` if it applies to discrete modalities only, ``False`` for continuous ones only.
        build: ``build(config, modality_config, modality_id) -> loss`` where ``loss`` has
            ``prepare(batch, generator) -> (batch, context)``, which may alter the inputs (a diffusion
            objective noises the latents), and ``__call__(output, batch, context) -> (loss_sum, count)``: the
            summed loss over the modality's predictions and their number.
    """

    name: str
    description: str
    config: type[ObjectiveConfig]
    discrete: bool
    build: Callable


@dataclass(frozen=True)
class Dataset:
    """A source of interleaved multimodal sequences.

    Attributes:
        name: The ``kind`` a spec's ``data`` selects it by.
        description: One line for ``momkit plugins`` and the docs.
        config: Pydantic model of its settings, a subclass of :class:`momkit.spec.DatasetConfig`.
        build: ``build(config, modalities, split, seq_len) -> source``: ``modalities`` is the spec's list of
            :class:`momkit.spec.ModalityConfig` (their order gives the modality ids), ``split`` is ``"train"`` or
            ``"eval"``; ``source.batch(index, batch_size)`` returns the :class:`momkit.Batch` number ``index``
            of ``(batch_size, seq_len)`` sequences, the same for the same index, packed documents marked by
            ``seq_idx``; ``source.num_batches(batch_size)`` is ``None`` for an endless split, else how many
            distinct batches it has, ``batch(i)`` then being ``batch(i % num_batches)`` (epochs).
        convert: Optional ``convert(input_path, out_dir, modalities) -> Path`` turning a user's files into a
            faster format the dataset reads (``momkit convert`` calls it).
    """

    name: str
    description: str
    config: type[DatasetConfig]
    build: Callable
    convert: Callable | None = None
