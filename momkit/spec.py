"""Specs: the declarative description of a block or a model, checked against the registry.

A spec is plain data (a dict, or YAML) validated by pydantic. Every name in it (backbone, sublayers,
modalities, scan backend) is checked against the plugins that are installed, and the backbone's options by
that backbone's own pydantic model, so a misspelt name or option is an error that names it and lists what
would be valid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Mapping, Union

import yaml
from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator

from momkit.configs import BackboneConfig, DatasetConfig, EncoderConfig, ModalityConfig, ObjectiveConfig, StrictModel
from momkit.errors import SpecError
from momkit.registry import get_registry

__all__ = ["BackboneConfig", "BlockSpec", "DatasetConfig", "EncoderConfig", "ExpertsSpec", "LayerSpec",
           "ModalityConfig", "ModelSpec", "ObjectiveConfig", "ParallelConfig", "Routed", "RoutingSpec", "StrictModel",
           "TrainConfig", "flatten", "load_spec", "read_mapping", "set_field"]

MODEL_SUBLAYERS = ("final_norm",)


class ExpertsSpec(StrictModel):
    """Learned experts: sublayers holding ``n_experts`` weight sets, of which a router picks ``top_k`` per token."""

    sublayers: list[str] = Field(min_length=1, description="The expert sublayers: linear sublayers of the "
                                                           "backbone (all of a Transformer's `ffn`; `w1`, `w2`, "
                                                           "`w3` of the `ffn` backbone; Mamba's projections).")
    n_experts: int = Field(ge=2, description="Experts (weight sets) of each expert sublayer, per modality with "
                                             "`per_modality`.")
    top_k: int = Field(1, ge=1, description="Experts each token uses; the block runs once per chosen expert and "
                                            "mixes the results by the router's renormalised probabilities.")
    capacity_factor: float | None = Field(None, gt=0, description="In training, each expert takes at most "
                                                                  "ceil(capacity_factor * top_k * tokens / "
                                                                  "n_experts) token slots of a batch and drops "
                                                                  "the rest (first come, first served); `null`: "
                                                                  "dropless. Evaluation and decoding are "
                                                                  "dropless.")
    balance_loss: float = Field(0.01, ge=0, description="Weight of the load-balancing loss (Switch "
                                                         "Transformer's) added to the training loss.")
    z_loss: float = Field(0.001, ge=0, description="Weight of the router z-loss (mean squared log-sum-exp of "
                                                   "the router logits) added to the training loss.")
    per_modality: bool = Field(False, description="Give each modality its own `n_experts` experts and its own "
                                                  "router (modality x experts).")
    gradient: str = Field("switch", pattern="^(switch|exact)$",
                          description="The gates' gradient: `switch`, the renormalised top-k probabilities' values "
                                      "with Switch Transformer's gradient (the task loss trains the router, also "
                                      "at top_k 1); `exact`, their exact gradient (none at top_k 1).")

    @model_validator(mode="after")
    def _k(self) -> ExpertsSpec:
        if self.top_k > self.n_experts:
            raise SpecError(f"routing.experts.top_k ({self.top_k}) exceeds n_experts ({self.n_experts}); valid "
                            f"top_k: 1..{self.n_experts}")
        repeated = sorted({s for s in self.sublayers if self.sublayers.count(s) > 1})
        if repeated:
            raise SpecError(f"routing.experts.sublayers lists {', '.join(map(repr, repeated))} more than once")
        return self


class Routed(frozenset):
    """The routed sublayers of a block (a frozenset of names, routed by modality) and its learned experts
    (:class:`ExpertsSpec` or ``None``), as a block receives them."""

    experts: ExpertsSpec | None

    def __new__(cls, names=(), experts: ExpertsSpec | None = None):
        routed = super().__new__(cls, names)
        routed.experts = experts
        return routed

    def __reduce__(self):
        return (Routed, (frozenset(self), self.experts))


class RoutingSpec(StrictModel):
    """Which sublayers hold one weight set per modality (routed); the rest hold one shared set; and which hold
    learned experts."""

    specific: Union[list[str], str] = Field(
        "dense",
        description="The routed sublayers: a list of the backbone's sublayer names, or the name of a preset: "
                    "`dense` (none) and `all` (every sublayer) for every backbone, and the backbone's own, "
                    "such as `mom` (Mixture-of-Mamba) or `mot` (Mixture-of-Transformers).")
    experts: ExpertsSpec | None = Field(None, description="Learned experts on some sublayers (a second routing "
                                                          "mode beside the modality's); `null`: none.")

    def resolve(self, backbone, model_sublayers: tuple[str, ...] = ()) -> Routed:
        """The routed sublayers of ``backbone`` (a :class:`momkit.descriptors.Backbone`), with the experts.

        ``model_sublayers`` are the routable sublayers outside the blocks (a model's ``final_norm``), which
        a list may name and the ``all`` preset, or a backbone preset that lists them, routes.
        """
        routed = self._specific(backbone, model_sublayers)
        if self.experts is not None:
            unknown = [s for s in self.experts.sublayers if s not in backbone.sublayers]
            if unknown:
                raise SpecError(f"routing.experts.sublayers names {', '.join(map(repr, unknown))}, not a sublayer "
                                f"of backbone {backbone.name!r}; its sublayers: {', '.join(backbone.sublayers)}")
            both = [s for s in self.experts.sublayers if s in routed]
            if both:
                raise SpecError(f"routing.experts.sublayers names {', '.join(map(repr, both))}, which "
                                f"routing.specific routes by modality; leave it out of one of them (experts.per_"
                                f"modality: true gives each modality its own experts)")
        return Routed(routed, self.experts)

    def _specific(self, backbone, model_sublayers: tuple[str, ...]) -> frozenset[str]:
        valid = (*backbone.sublayers, *model_sublayers)
        if isinstance(self.specific, str):
            preset = backbone.preset(self.specific)
            extra = model_sublayers if self.specific == "all" else ()
            return frozenset(s for s in (*preset, *extra) if s in valid)
        unknown = [s for s in self.specific if s not in valid]
        if unknown:
            raise SpecError(f"routing.specific names {', '.join(map(repr, unknown))}, not a sublayer of "
                            f"backbone {backbone.name!r}; its sublayers: {', '.join(valid)}")
        repeated = sorted({s for s in self.specific if self.specific.count(s) > 1})
        if repeated:
            raise SpecError(f"routing.specific lists {', '.join(map(repr, repeated))} more than once")
        return frozenset(self.specific)


def _init_details(error: dict) -> dict:
    """A reported pydantic error as the details to raise it again."""
    return {key: error[key] for key in ("type", "loc", "input", "ctx") if key in error}


def _config_of(kind: str, value: Any) -> StrictModel:
    """Validate ``value`` (a mapping with a ``kind``) by the config model of the ``kind`` plugin it names."""
    if isinstance(value, StrictModel):
        value = value.model_dump(exclude_unset=True)
    if not isinstance(value, dict) or "kind" not in value:
        raise SpecError(f"a {kind} must be a mapping with a `kind`, one of "
                        f"{', '.join(get_registry().names(kind))}; got {value!r}")
    return get_registry().get(kind, value["kind"]).config.model_validate(value)


def _with_encoder(entry: Any) -> Any:
    """A modality entry whose ``encoder`` (a name or a mapping) is validated by that encoder's config model."""
    if isinstance(entry, StrictModel):
        entry = entry.model_dump(exclude_unset=True)
    encoder = entry.get("encoder") if isinstance(entry, dict) else None
    if encoder is None:
        return entry
    return {**entry, "encoder": _config_of("encoder", {"kind": encoder} if isinstance(encoder, str) else encoder)}


KERNEL_OPERATIONS = ("selective_scan", "ssd_scan", "routed_linear", "causal_conv1d", "selective_state_update",
                     "conv_state_update", "router_logits", "expert_slots", "gated_residual", "gated_mix")
"""The kernel operations of :mod:`momkit.ops`, the keys a per-operation ``scan_backend`` may give."""


class BlockSpec(StrictModel):
    """One residual block: its modalities, backbone, routing and scan backend."""

    layers_required: ClassVar[bool] = False
    model_sublayers: ClassVar[tuple[str, ...]] = ()

    modalities: list[SerializeAsAny[ModalityConfig]] = Field(
        min_length=1, description="The modalities, each a registered modality name (with its default settings) "
                                  "or a mapping `{kind, name, ...settings}`; their order gives the modality ids "
                                  "0..M-1.")
    backbone: SerializeAsAny[BackboneConfig] = Field(
        description="`kind` (a registered backbone), `d_model`, and that backbone's own options.")
    routing: RoutingSpec = Field(default_factory=RoutingSpec, description="Routed and shared sublayers.")
    bidirectional: list[str] = Field(
        default_factory=list, description="Modalities whose spans (runs of the modality within one document: one "
                                          "image) are seen whole: a position inside a span also sees the later "
                                          "positions of its span (a Mamba block's backward scan, a Transformer's "
                                          "attention within the span); all else stays causal.")
    scan_backend: Union[str, dict[str, str]] = Field(
        "auto", description="Kernel backend of every kernel operation of the blocks: the scans, the routed linear "
                            "layers, the causal convolutions and the decoding updates. `auto` picks, per "
                            "operation, the available backend that ranks highest for it on the tensors' device "
                            "and dtype; a registered name runs "
                            "every operation that backend implements (the others on `auto`); a mapping from "
                            "operation names (and `default`) to backends chooses per operation, e.g. "
                            "`{selective_scan: cuda, default: auto}`.")

    @field_validator("modalities", mode="before")
    @classmethod
    def _modality_settings(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        configs, errors = [], []
        for i, entry in enumerate(value):
            try:
                configs.append(_config_of("modality", _with_encoder({"kind": entry} if isinstance(entry, str)
                                                                   else entry)))
            except ValidationError as exc:
                errors += [{**_init_details(err), "loc": (i, *err["loc"])} for err in exc.errors()]
            except ValueError as exc:
                errors.append({"type": "value_error", "loc": (i,), "input": entry, "ctx": {"error": exc}})
        if errors:
            raise ValidationError.from_exception_data("modalities", errors)
        return configs

    @field_validator("modalities")
    @classmethod
    def _modality_names_unique(cls, value: list[ModalityConfig]) -> list[ModalityConfig]:
        names = [m.name for m in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SpecError(f"modalities names {', '.join(map(repr, repeated))} more than once; give repeated "
                            f"kinds distinct `name`s")
        return value

    @field_validator("backbone", mode="before")
    @classmethod
    def _backbone_options(cls, value: Any) -> Any:
        config = _config_of("backbone", value)
        if cls.layers_required and config.n_layers is None:
            raise SpecError("backbone.n_layers is required in a model spec")
        if not cls.layers_required and config.n_layers is not None:
            raise SpecError("backbone.n_layers belongs to a model spec; a block spec describes one block")
        return config

    @field_validator("routing")
    @classmethod
    def _routing_fits_backbone(cls, value: RoutingSpec, info) -> RoutingSpec:
        backbone = info.data.get("backbone")
        if backbone is not None:
            value.resolve(get_registry().get("backbone", backbone.kind), cls.model_sublayers)
        return value

    @field_validator("bidirectional")
    @classmethod
    def _bidirectional_fits(cls, value: list[str], info) -> list[str]:
        names = [m.name for m in info.data.get("modalities", [])]
        unknown = [name for name in value if name not in names]
        if unknown:
            raise SpecError(f"bidirectional names {', '.join(map(repr, unknown))}, not modalities of this spec; "
                            f"its modalities: {', '.join(names)}")
        if len(set(value)) != len(value):
            raise SpecError(f"bidirectional lists a modality more than once: {value}")
        backbone = info.data.get("backbone")
        if value and backbone is not None:
            block = get_registry().get("backbone", backbone.kind).block
            if not (block.supports_bidirectional or block.position_wise):
                able = [n for n, b in get_registry().backbones.items()
                        if b.block.supports_bidirectional or b.block.position_wise]
                raise SpecError(f"backbone {backbone.kind!r} does not support bidirectional spans; backbones that "
                                f"do: {', '.join(able)}")
        return value

    @field_validator("scan_backend")
    @classmethod
    def _backend_registered(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        chosen = value if isinstance(value, dict) else {"default": value}
        unknown = sorted(set(chosen) - {*KERNEL_OPERATIONS, "default"})
        if unknown:
            raise SpecError(f"scan_backend names operation(s) {', '.join(map(repr, unknown))}; valid keys: "
                            f"{', '.join(KERNEL_OPERATIONS)}, default")
        for name in chosen.values():
            if name != "auto":
                get_registry().get("scan_backend", name)
        return value

    def to_yaml(self) -> str:
        """The spec as YAML, every field written (what run and model directories keep, and read back)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @property
    def modality_names(self) -> list[str]:
        """The modalities' names, in modality-id order."""
        return [m.name for m in self.modalities]

    @property
    def routed(self) -> Routed:
        """The sublayers that hold one weight set per modality, and the learned experts (``routed.experts``); of
        those a backbone has with some options only, the ones these options have (:attr:`Backbone.present`)."""
        backbone = get_registry().get("backbone", self.backbone.kind)
        routed = self.routing.resolve(backbone, self.model_sublayers)
        if backbone.present is None:
            return routed
        absent = set(backbone.sublayers) - set(backbone.present(self.backbone, bool(self.bidirectional)))
        return Routed(routed - absent, routed.experts)


class TrainConfig(StrictModel):
    """How a model is trained: optimiser, schedule, batches, evaluation and checkpoints."""

    steps: int = Field(200, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimiser step; under `torchrun` they are "
                                                 "shared by the ranks, so it must be a multiple of their number.")
    seq_len: int = Field(256, ge=2, description="Positions per training sequence.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate of AdamW.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of `lr` at the "
                                                             "end of the cosine decay.")
    warmup_steps: int = Field(20, ge=0, description="Steps of linear warm-up from 0 to `lr`.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of matrices (not of norms, biases, "
                                                       "A_log, D, dt biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: no clipping).")
    eval_every: int = Field(50, ge=1, description="Evaluate on the held-out split every this many steps "
                                                  "(and after the last).")
    eval_batches: int = Field(4, ge=1, description="Held-out batches per evaluation.")
    checkpoint_every: int = Field(50, ge=1, description="Save a resumable checkpoint every this many steps.")
    seed: int = Field(0, description="Seed of initialisation and of the objectives' noise.")
    device: str = Field("auto", description="`auto` (CUDA if available, else CPU), `cpu`, `cuda`, `cuda:1`, ...")
    precision: str = Field("auto", pattern="^(auto|fp32|bf16|fp16)$",
                           description="`bf16` autocast, `fp16` autocast with a gradient scaler (for GPUs without "
                                       "bfloat16), `fp32`, or `auto` (bf16 on CUDA, fp32 on CPU).")
    max_bad_steps: int = Field(20, ge=1, description="A step whose loss or gradients are not finite is skipped "
                                                     "(no update), counted and logged; the run stops after this "
                                                     "many such steps in a row, keeping its last checkpoint.")
    freeze: list[str] = Field(default_factory=list, description="Parameters kept fixed: `shared` (those every "
                                                                "modality uses), `routed` (the per-modality "
                                                                "copies of routed sublayers), `experts`, `router`, "
                                                                "or name patterns such as `adapters.text.*` "
                                                                "(shell-style, matched against `momkit.Model` "
                                                                "parameter names).")

    loggers: list[str] = Field(default_factory=list, description="Experiment loggers that receive the run's "
                                                                 "metrics besides its metrics.jsonl: registered "
                                                                 "names, built in `tensorboard`, `wandb` and "
                                                                 "`mlflow` (each an optional extra). Changing them "
                                                                 "does not change the run: a run resumes with "
                                                                 "others.")

    @field_validator("loggers")
    @classmethod
    def _registered_loggers(cls, value: list[str]) -> list[str]:
        for name in value:
            get_registry().get("logger", name)
        repeated = sorted({n for n in value if value.count(n) > 1})
        if repeated:
            raise SpecError(f"train.loggers lists {', '.join(map(repr, repeated))} more than once")
        return value

    @field_validator("freeze")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        empty = [i for i, p in enumerate(value) if not p.strip()]
        if empty:
            raise SpecError(f"train.freeze entry {empty[0]} is empty; give `shared`, `routed` or a parameter "
                            f"name pattern")
        return value


class ParallelConfig(StrictModel):
    """How a run launched with ``torchrun`` shares the work between its processes."""

    strategy: str = Field("ddp", pattern="^(ddp|fsdp)$",
                          description="`ddp`: DistributedDataParallel, every rank holds the whole model; `fsdp`: "
                                      "FSDP2 (`fully_shard`), parameters, gradients and optimiser state sharded "
                                      "over the ranks.")
    reshard_after_forward: bool = Field(
        True, description="`fsdp`: free each block's gathered parameters after its forward and gather them again "
                          "for its backward; `false` keeps them until the backward (one all-gather fewer per "
                          "block and step, for the memory of the blocks' whole parameters).")
    param_dtype: str = Field(
        "fp32", pattern="^(fp32|bf16)$",
        description="`fsdp`: the dtype the parameters are gathered in and computed with. `bf16` halves the "
                    "all-gathers and casts once per gather instead of at every use; the sharded parameters, the "
                    "optimiser and the gradients' reduction stay in float32.")

    @model_validator(mode="after")
    def _fsdp_options(self) -> ParallelConfig:
        changed = [f"{name}: {value}" for name, value in self.model_dump().items()
                   if name != "strategy" and value != type(self).model_fields[name].default]
        if self.strategy != "fsdp" and changed:
            raise SpecError(f"parallel.{changed[0]} applies to strategy fsdp, not {self.strategy!r}; set "
                            f"parallel.strategy: fsdp or leave the option at its default")
        return self


class LayerSpec(StrictModel):
    """One entry of a model's layer pattern: a backbone with its options, and its routing."""

    backbone: dict[str, Any] | None = Field(
        None, description="`kind` and that backbone's options; `d_model` comes from the model's `backbone`. "
                          "Left out: the model's `backbone` (less `n_layers`).")
    routing: RoutingSpec | None = Field(None, description="Routed and shared sublayers of this entry. Left out: "
                                                          "the model's `routing` (less `final_norm`).")


class ModelSpec(BlockSpec):
    """A model: a named stack of ``backbone.n_layers`` blocks, with how to train it.

    Every block is the spec's ``backbone`` with its ``routing``, unless ``layers`` gives a pattern of blocks,
    repeated to the model's depth (see :meth:`blocks`).
    """

    layers_required: ClassVar[bool] = True
    model_sublayers: ClassVar[tuple[str, ...]] = MODEL_SUBLAYERS

    name: str = Field(min_length=1, description="Name of the model, used in logs and summaries.")
    objectives: dict[str, SerializeAsAny[ObjectiveConfig]] = Field(
        default_factory=dict, description="Objective of each modality by name; a modality left out gets "
                                          "`next_token` if discrete, `diffusion` if continuous.")
    data: SerializeAsAny[DatasetConfig] | None = Field(None, description="Training and held-out data; `None` "
                                                                         "is the built-in `shapes` dataset.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Multi-process training under "
                                                                                 "`torchrun`.")
    init_from: str | None = Field(
        None, description="Start training from this model instead of from random weights: a momkit model "
                          "directory, a transformers or mamba_ssm checkpoint directory, or a Hugging Face hub id; "
                          "upcycled when this spec routes what the source shares (every routed copy starts as "
                          "the shared weight). In a suite, `variant:NAME` is the model that variant's run of the "
                          "same seed leaves.")
    layers: list[LayerSpec] | None = Field(
        None, description="A pattern of layers, repeated to `backbone.n_layers` (a multiple of its length): each "
                          "entry `{backbone, routing}`, a field left out taking the model's. For example "
                          "`[{}, {backbone: {kind: ffn}, routing: {specific: dense}}]` alternates the model's "
                          "backbone with feed-forward layers. Left out: every layer is the model's backbone.")

    @field_validator("objectives", mode="before")
    @classmethod
    def _objective_settings(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        return {name: _config_of("objective", entry) for name, entry in value.items()}

    @field_validator("data", mode="before")
    @classmethod
    def _data_settings(cls, value: Any) -> Any:
        return None if value is None else _config_of("dataset", value)

    @model_validator(mode="after")
    def _objectives_fit_modalities(self) -> ModelSpec:
        names = self.modality_names
        for name, objective in self.objectives.items():
            if name not in names:
                raise SpecError(f"objectives names modality {name!r}, not one of this spec's: {', '.join(names)}")
            modality = self.modalities[names.index(name)]
            if get_registry().get("objective", objective.kind).discrete != modality.discrete:
                form = "discrete" if modality.discrete else "continuous"
                fits = [n for n, o in get_registry().objectives.items() if o.discrete == modality.discrete]
                raise SpecError(f"objective {objective.kind!r} does not apply to {form} modality {name!r}; "
                                f"objectives for {form} modalities: {', '.join(fits) or 'none'}")
        return self

    @model_validator(mode="after")
    def _parameters_match_precision(self) -> ModelSpec:
        if self.parallel.param_dtype == "bf16" and self.train.precision == "fp16":
            raise SpecError("parallel.param_dtype: bf16 with train.precision: fp16 would compute float16 products "
                            "from bfloat16 parameters; use train.precision bf16 or auto with bf16 parameters, or "
                            "parallel.param_dtype: fp32 with fp16")
        return self

    @model_validator(mode="after")
    def _bidirectional_objectives(self) -> ModelSpec:
        for name in self.bidirectional:
            if self.objective(name).kind == "next_token":
                raise SpecError(f"bidirectional modality {name!r} is trained with next_token, whose targets are the "
                                f"later positions of its span: a position that sees them predicts nothing; valid "
                                f"bidirectional modalities: those with a non-causal objective (diffusion)")
        return self

    def objective(self, name: str) -> ObjectiveConfig:
        """The objective of modality ``name``: the spec's, else the default for its kind."""
        if name in self.objectives:
            return self.objectives[name]
        modality = self.modalities[self.modality_names.index(name)]
        return _config_of("objective", {"kind": "next_token" if modality.discrete else "diffusion"})

    def dataset(self) -> DatasetConfig:
        """The spec's ``data``, or the built-in ``shapes`` dataset."""
        return self.data if self.data is not None else _config_of("dataset", {"kind": "shapes"})

    @model_validator(mode="after")
    def _layer_pattern(self) -> ModelSpec:
        if self.layers is None:
            return self
        if not self.layers:
            raise SpecError("layers is an empty pattern; give at least one entry, or leave layers out")
        n, period = self.backbone.n_layers, len(self.layers)
        if n % period:
            raise SpecError(f"backbone.n_layers ({n}) must be a multiple of the {period} entries of layers; "
                            f"valid n_layers: {period}, {2 * period}, {3 * period}, ...")
        for i in range(period):
            self._entry(i)
        return self

    def _entry(self, i: int) -> BlockSpec:
        """The block spec of entry ``i`` of ``layers``: a ``SpecError`` names the entry and the field at fault."""
        data = self._block_data()
        entry = self.layers[i]
        if entry.backbone is not None:
            if "d_model" in entry.backbone:
                raise SpecError(f"layers.{i}.backbone.d_model: the layers share the model's d_model "
                                f"({self.backbone.d_model}); set backbone.d_model instead")
            data["backbone"] = {**entry.backbone, "d_model": self.backbone.d_model}
        if entry.routing is not None:
            data["routing"] = entry.routing.model_dump()
        try:
            return BlockSpec.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise SpecError(f"layers.{i}: {problems}") from None

    def _block_data(self) -> dict[str, Any]:
        data = self.model_dump(include=set(BlockSpec.model_fields))
        data["backbone"].pop("n_layers")
        data["routing"]["specific"] = (self.routing.specific if isinstance(self.routing.specific, str) else
                                       [s for s in self.routing.specific if s not in MODEL_SUBLAYERS])
        return data

    @property
    def stacked(self) -> bool:
        """Whether the spec gives a pattern of layers (``layers``)."""
        return self.layers is not None

    def block(self) -> BlockSpec:
        """The spec of every block of a model without ``layers`` (the routing of the model-level sublayers left
        out); ``SpecError`` for a model with ``layers``, whose blocks differ (see :meth:`blocks`)."""
        if self.stacked:
            raise SpecError(f"model spec {self.name!r} gives a pattern of layers; take its blocks from blocks()")
        return BlockSpec.model_validate(self._block_data())

    def blocks(self) -> list[BlockSpec]:
        """The spec of each of the ``backbone.n_layers`` blocks, bottom first: the pattern of ``layers``
        repeated, or :meth:`block` for every layer."""
        if not self.stacked:
            return [self.block() for _ in range(self.backbone.n_layers)]
        pattern = [self._entry(i) for i in range(len(self.layers))]
        return [pattern[i % len(pattern)] for i in range(self.backbone.n_layers)]


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> BlockSpec | ModelSpec:
    """Read a YAML spec: a :class:`ModelSpec` if it has a ``name``, else a :class:`BlockSpec`.

    ``overrides`` maps dotted field paths to values set before validation (see :func:`set_field`), as
    ``momkit train SPEC.yaml train.lr=3e-4`` does.

    Raises:
        SpecError: the file is missing, not YAML, not a mapping, or not a valid spec (a pydantic
            ``ValidationError``, which is a ``ValueError``, with the path of each bad field).
    """
    data = read_mapping(path, "spec")
    for dotted, value in (overrides or {}).items():
        set_field(data, dotted, value)
    return (ModelSpec if "name" in data else BlockSpec).model_validate(data)


def set_field(data: dict, dotted: str, value: Any) -> None:
    """Set the field at ``dotted`` in the spec mapping ``data``: mapping keys, and list indices
    (``layers.1.routing.specific``) into lists the spec already has; missing mappings on the way are created.
    Suites and command-line overrides set fields this way; the spec is validated afterwards."""
    keys = dotted.split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[:depth]) or "the spec"
        if isinstance(node, list):
            if not (key.isdigit() and int(key) < len(node)):
                raise SpecError(f"cannot set {dotted!r}: {where} is a list of {len(node)} entries; valid "
                                f"indices: {', '.join(map(str, range(len(node)))) or 'none'}")
            key = int(key)
        elif not isinstance(node, dict):
            raise SpecError(f"cannot set {dotted!r}: {where} is not a mapping or a list in the spec")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted path: leaf value}`` of nested mappings and lists (the paths :func:`set_field` takes)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def read_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ``ValueError`` naming the file if it is missing, not YAML or no mapping."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{what} file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping of {what} fields, got {type(data).__name__}")
    return data
