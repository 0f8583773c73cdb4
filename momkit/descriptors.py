"""What plugins return from their hooks: one small frozen record per registered name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
from torch import nn

from momkit.blocks import Block
from momkit.configs import BackboneConfig, DatasetConfig, EncoderConfig, ModalityConfig, ObjectiveConfig
from momkit.errors import PluginError, SpecError

__all__ = ["Backbone", "Dataset", "Encoder", "Logger", "Modality", "Objective", "ScanBackend"]


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
        block: Its block class, a subclass of :class:`momkit.Block` that implements the block contract; built
            as ``block(config, modalities, routed, backend)`` (see :class:`momkit.Block`). A class that leaves
            a method of the contract abstract is refused when the registry loads the plugin.
        sublayers: Names of its routable sublayers, the attributes of the built block.
        flops: ``flops(config, seq_len) -> {part: float}``: analytic forward FLOPs per token of one block,
            keyed by sublayer name, plus keys for work without weights (``scan``, ``attention``); a matmul
            of ``in -> out`` features counts ``2 * in * out``. Routing does not change them.
        presets: Named routings, each the tuple of sublayers it routes; ``dense`` (none) and ``all`` (every
            sublayer) exist for every backbone and need not be listed.
        present: Optional ``present(config, bidirectional) -> names``: the sublayers a block of these options has
            (causal, or with ``bidirectional`` modalities), where some of ``sublayers`` exist only with some
            options; a spec's routing leaves the others out. ``None``: every one of ``sublayers``.
        backward_flops: The parts of ``flops`` a bidirectional block runs again for its backward direction
            (``conv1d``, ``x_proj``, ``dt_proj`` and ``scan`` for Mamba); counted for the tokens of the
            bidirectional modalities.
    """

    name: str
    description: str
    config: type[BackboneConfig]
    block: type[Block]
    sublayers: tuple[str, ...]
    flops: Callable
    presets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    present: Callable | None = None
    backward_flops: tuple[str, ...] = ()

    def __post_init__(self):
        if not (isinstance(self.block, type) and issubclass(self.block, Block)):
            raise PluginError(f"backbone {self.name!r}: block must be a subclass of momkit.Block, got "
                              f"{self.block!r}")
        missing = sorted(self.block.__abstractmethods__)
        if missing:
            raise PluginError(f"backbone {self.name!r}: its block class {self.block.__name__} does not implement "
                              f"{', '.join(missing)} of the block contract (momkit.Block: "
                              f"{', '.join(sorted(Block.__abstractmethods__))})")

    def preset(self, name: str) -> tuple[str, ...]:
        """The sublayers routed by preset ``name``; ``ValueError`` listing this backbone's presets if unknown."""
        table = {"dense": (), "all": self.sublayers, **self.presets}
        if name not in table:
            raise SpecError(f"routing preset {name!r} is not defined for backbone {self.name!r}; "
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
        convert: Optional ``convert(input_path, out_dir, modalities, **options) -> Path`` turning a user's files
            into a format the dataset reads (``momkit convert`` calls it with its options ``source``, ``columns``,
            ``on_error``, ``batch_size``, ``device``, ``split``, ``glob``, ``images``).
        decoders: Optional ``decoders(config, modalities) -> {name: decoder}`` for the modalities whose items it
            can turn back into images (``momkit sample`` draws them): ``decoder.length`` is the positions of
            one image, ``decoder.decode(values)`` maps ``(n, length)`` tokens or ``(n, length, latent_dim)``
            latents to ``(n, height, width, 3)`` uint8 RGB images and ``decoder.encode`` back. A text
            modality's decoder (no ``length``; ``encode([text])`` gives its ids) writes ``momkit sample``'s prompts.
        check: Optional ``check(config, modalities)``: ``momkit validate`` calls it to refuse data that does not
            fit the spec (raising :class:`momkit.SpecError`), without building a split.

    A source may also have ``token_bytes``, ``{name: (vocab_size,) int64}`` UTF-8 bytes of each token of its
    text modalities; the evaluation then reports bits per byte (``bpb/<name>``).
    """

    name: str
    description: str
    config: type[DatasetConfig]
    build: Callable
    convert: Callable | None = None
    decoders: Callable | None = None
    check: Callable | None = None


@dataclass(frozen=True)
class Logger:
    """An experiment logger: a place a run's metrics go besides its ``metrics.jsonl`` (which momkit always
    writes: resumption and reports read it).

    Attributes:
        name: The name ``train.loggers`` selects it by.
        description: One line for ``momkit plugins`` and the docs.
        open: ``open(context) -> sink`` with ``context`` a :class:`momkit.tracking.LogContext` (the run
            directory, the spec, its tags, the step a resumed run continues from); ``sink.log(record)`` takes
            each line of ``metrics.jsonl`` as it is written (a dict: ``split``, ``step``, ``flops``, losses, ...)
            and ``sink.close()`` ends the run's logging. ``open`` raises :class:`momkit.SpecError` when its
            library is missing, naming the extra that installs it.
    """

    name: str
    description: str
    open: Callable


ENCODER_INPUTS = ("text", "image", "audio")
"""What an encoder reads: ``str`` texts, images (PIL images or ``(h, w, 3)`` uint8 arrays), or audio clips
``(samples, sample_rate)`` with ``samples`` a 1-D float array in ``[-1, 1]``."""


@dataclass(frozen=True)
class Encoder:
    """An encoder: one modality's raw items in, that modality's token ids or latent vectors out (and back).

    Attributes:
        name: The ``kind`` a modality's ``encoder`` setting selects it by.
        description: One line for ``momkit plugins`` and the docs.
        inputs: What it reads, one of :data:`ENCODER_INPUTS`.
        config: Pydantic model of its settings, a subclass of :class:`momkit.configs.EncoderConfig`.
        open: ``open(config, directory, device) -> codec``. ``directory`` (a ``Path``) holds what the encoder
            fitted, kept beside the shards; it is empty before fitting. The codec has:

            - ``fit_items``: how many raw items it wants to see before encoding (0: none); ``momkit convert``
              then calls ``fit(items)``, which fits and writes its state into ``directory``;
            - optionally ``save()``, which ``momkit convert`` calls to keep in ``directory`` what the codec
              read from elsewhere (a tokenizer file), so that the shards decode on their own;
            - ``size``: the vocabulary size or latent width it gives (once fitted or loaded);
            - ``encode(items) -> list`` of ``(n,)`` int64 ids or ``(n, latent_dim)`` float32 vectors, one per
              item; it raises :class:`momkit.SpecError` for an item it cannot encode;
            - optionally ``decode(values)``: image encoders map ``(k, length)`` ids or ``(k, length, d)``
              latents to ``(k, height, width, 3)`` uint8 images (``length``: positions of one image); text
              encoders map a list of ids to a string;
            - optionally, text encoders, ``token_bytes() -> (size,)`` int64 UTF-8 bytes of each token, for
              bits per byte.
    """

    name: str
    description: str
    inputs: str
    config: type[EncoderConfig]
    open: Callable

    def __post_init__(self) -> None:
        if self.inputs not in ENCODER_INPUTS:
            raise PluginError(f"encoder {self.name!r} reads {self.inputs!r}; valid inputs: "
                              f"{', '.join(ENCODER_INPUTS)}")


def _always() -> bool:
    return True


@dataclass(frozen=True)
class ScanBackend:
    """A kernel backend, as returned by a plugin's ``momkit_scan_backends`` hook.

    A backend implements some of the kernel operations of :mod:`momkit.ops`: the two scans, the routed linear layer,
    the causal convolution, the two single-position state updates of decoding, and the learned experts' router
    logits and gated mix. Its name selects it for all of
    them at once: a spec's ``scan_backend`` reaches every kernel operation of the blocks built from that spec, and
    an operation the named backend does not implement runs on the ``"auto"`` choice for that operation. The front
    doors check every argument before they call a backend, so a backend receives tensors of consistent shapes on one
    device and may assume them. Each callable takes its front door's arguments as keywords (the extensions included,
    ``None`` when unused) and returns what the front door returns; an operation left ``None`` is one the backend
    lacks.

    Extensions are what momkit's front doors add to mamba_ssm's interfaces; a backend lists those it
    implements, and the front door refuses a call that needs one the backend lacks:

    - ``"modality"``: a per-modality ``A`` with a leading ``M`` and a ``modality (b, l)`` index (both scans),
      per-modality parameters with a leading ``M`` in the causal convolution and the state updates;
    - ``"seq_idx"``: ``seq_idx`` for :func:`momkit.ops.selective_scan` and :func:`momkit.ops.causal_conv1d`
      (``ssd_scan`` always has it);
    - ``"initial_state"``: ``initial_state`` for :func:`momkit.ops.selective_scan` (``ssd_scan``'s
      ``initial_states`` is mamba_ssm's own).

    :func:`momkit.ops.routed_linear` is momkit's own (every backend that has it takes ``modality``). Its ``order``
    and ``groups`` are hints, not requirements: the front door passes each (as a keyword of its name) only to a
    backend that lists it (``"order"``, ``"groups"``), and runs the call on any other without it, since the result
    does not depend on it.

    Attributes:
        name: The name a spec's ``scan_backend`` and a front door's ``backend=`` select it by.
        description: One line for ``momkit plugins`` and the docs.
        selective_scan: Implements :func:`momkit.ops.selective_scan`, or ``None`` if the backend lacks it.
        ssd_scan: Implements :func:`momkit.ops.ssd_scan`, or ``None`` if the backend lacks it.
        routed_linear: Implements :func:`momkit.ops.routed_linear`, or ``None``.
        causal_conv1d: Implements :func:`momkit.ops.causal_conv1d`, or ``None``.
        selective_state_update: Implements :func:`momkit.ops.selective_state_update`, or ``None``.
        conv_state_update: Implements :func:`momkit.ops.conv_state_update`, or ``None``.
        router_logits: Implements :func:`momkit.ops.router_logits`, or ``None``.
        expert_slots: Implements :func:`momkit.ops.expert_slots`, or ``None``.
        gated_residual: Implements :func:`momkit.ops.gated_residual`, or ``None``.
        gated_mix: Implements :func:`momkit.ops.gated_mix`, or ``None``.
        devices: Device types (``"cpu"``, ``"cuda"``) the backend runs on.
        priority: Among the available backends that run a call, ``backend="auto"`` picks the highest: one number
            for every operation, or ``{operation: number}`` (with ``"default"`` for the rest, else 0), so a
            backend can rank above another for the operations the benchmarks show it faster at (:meth:`rank`).
        extensions: The extensions (above) the backend implements.
        dtypes: The dtypes of the inputs it computes on (the main input's: ``u``, ``x`` or ``state``), or
            ``None`` for every floating dtype; ``backend="auto"`` passes over a backend that lacks a call's.
        is_available: Whether the backend can run in this process (its compiler or library imports).
    """

    name: str
    description: str
    selective_scan: Callable | None = None
    ssd_scan: Callable | None = None
    routed_linear: Callable | None = None
    causal_conv1d: Callable | None = None
    selective_state_update: Callable | None = None
    conv_state_update: Callable | None = None
    router_logits: Callable | None = None
    expert_slots: Callable | None = None
    gated_residual: Callable | None = None
    gated_mix: Callable | None = None
    devices: tuple[str, ...] = ("cpu",)
    priority: int | Mapping[str, int] = 0
    extensions: frozenset[str] = frozenset()
    dtypes: frozenset[torch.dtype] | None = None
    is_available: Callable[[], bool] = field(default=_always)

    def rank(self, op: str) -> int:
        """The priority of this backend for operation ``op``."""
        if isinstance(self.priority, Mapping):
            return self.priority.get(op, self.priority.get("default", 0))
        return self.priority
