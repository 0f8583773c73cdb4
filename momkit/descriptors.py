"""What plugins return from their hooks: one small frozen record per registered name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Mapping

from momkit.ops.backend import ScanBackend

if TYPE_CHECKING:
    from momkit.spec import BackboneConfig

__all__ = ["Backbone", "Dataset", "Modality", "Objective", "ScanBackend"]


@dataclass(frozen=True)
class Modality:
    """A kind of token in an interleaved sequence.

    Attributes:
        name: The name specs refer to it by.
        kind: ``"discrete"`` (token ids below ``vocab_size``) or ``"continuous"`` (vectors of ``latent_dim``).
        description: One line for ``momkit plugins`` and the docs.
        vocab_size: Vocabulary size of a discrete modality.
        latent_dim: Vector size of a continuous modality.
    """

    name: str
    kind: Literal["discrete", "continuous"]
    description: str
    vocab_size: int | None = None
    latent_dim: int | None = None

    def __post_init__(self):
        if self.kind == "discrete" and not (self.vocab_size and self.vocab_size > 0 and self.latent_dim is None):
            raise ValueError(f"discrete modality {self.name!r} needs a positive vocab_size and no latent_dim, "
                             f"got vocab_size={self.vocab_size}, latent_dim={self.latent_dim}")
        if self.kind == "continuous" and not (self.latent_dim and self.latent_dim > 0 and self.vocab_size is None):
            raise ValueError(f"continuous modality {self.name!r} needs a positive latent_dim and no vocab_size, "
                             f"got latent_dim={self.latent_dim}, vocab_size={self.vocab_size}")
        if self.kind not in ("discrete", "continuous"):
            raise ValueError(f"modality {self.name!r} has kind {self.kind!r}; expected 'discrete' or 'continuous'")


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
        name: The name specs refer to it by.
        description: One line for ``momkit plugins`` and the docs.
        build: Factory of the loss module.
    """

    name: str
    description: str
    build: Callable


@dataclass(frozen=True)
class Dataset:
    """A source of interleaved multimodal sequences.

    Attributes:
        name: The name specs refer to it by.
        description: One line for ``momkit plugins`` and the docs.
        build: Factory of the iterable of batches.
    """

    name: str
    description: str
    build: Callable
