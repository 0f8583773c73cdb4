"""Pretrained models in and out: :func:`load` reads a momkit model directory, a Hugging Face ``transformers``
checkpoint (``MambaForCausalLM``, ``Mamba2ForCausalLM``, ``LlamaForCausalLM``), a mamba_ssm
``MambaLMHeadModel`` directory or a hub id, and upcycles it into a routed spec; :func:`export` writes a dense
model as a ``transformers`` checkpoint.

Each checkpoint format is a :class:`Format`: how its ``config.json`` becomes a momkit spec, and where each
momkit parameter lives among its tensors. A source is data, never code: safetensors where the checkpoint has
them, else ``pytorch_model.bin`` read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Callable

import torch

from momkit.errors import SpecError
from momkit.model import SPEC_FILE, Model, build_model, tied_heads, untied
from momkit.spec import ModelSpec, load_spec
from momkit.weights import load_weights, save_weights

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
IGNORED = re.compile(r".*rotary_emb\.inv_freq")
FREEZE_WORDS = ("shared", "routed", "experts", "router")
SUITE_SOURCE = "variant:"


def _extra(name: str) -> str:
    return f"pip install 'momkit[{name}]'"


def _value(config: dict, key: str, default: Any = None) -> Any:
    """``config[key]``, with transformers' JSON spelling of infinities (``{"__float__": "Infinity"}``) read."""
    value = config.get(key, default)
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    if isinstance(value, list):
        return [float(v["__float__"]) if isinstance(v, dict) and "__float__" in v else v for v in value]
    return value


def _require(config: dict, where: str, key: str, supported: Any, default: Any = None) -> None:
    """Refuse a checkpoint whose ``config[key]`` changes what the model computes in a way momkit does not
    implement."""
    value = _value(config, key, default)
    if value != supported and not (isinstance(supported, tuple) and value in supported):
        allowed = " or ".join(map(repr, supported)) if isinstance(supported, tuple) else repr(supported)
        raise SpecError(f"{where}: {key} = {value!r} is not supported; momkit imports {allowed}")


@dataclass(frozen=True)
class Format:
    """A checkpoint format of one architecture.

    Attributes:
        name: How the format is named in messages, e.g. ``transformers MambaForCausalLM``.
        backbone: The momkit backbone it maps to.
        embedding, final_norm, head: The names of the token embedding, the final norm's weight and the output
            layer's weight.
        layers: The prefix of layer ``i``'s tensors, ``f"{layers}.{i}."``.
        sublayers: ``(momkit name, checkpoint name)`` pairs within a layer, e.g. ``("gate_norm", "mixer.norm")``.
        options: ``config.json`` -> the backbone's options, ``n_layers`` included, and ``tie`` (whether the
            head is the embedding); refuses what momkit does not implement.
    """

    name: str
    backbone: str
    embedding: str
    final_norm: str
    head: str
    layers: str
    sublayers: tuple[tuple[str, str], ...]
    options: Callable[[dict, str], dict]

    def key(self, name: str, modality: str = "text") -> str:
        """The checkpoint's name of the momkit parameter ``name`` of a model whose one modality is ``modality``."""
        fixed = {f"adapters.{modality}.weight": self.embedding, f"heads.{modality}.weight": self.head,
                 "final_norm.weight": self.final_norm}
        if name in fixed:
            return fixed[name]
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match:
            layer, rest = match.groups()
            for mine, theirs in self.sublayers:
                if rest == mine or rest.startswith(mine + "."):
                    return f"{self.layers}.{layer}.{theirs}{rest[len(mine):]}"
        raise SpecError(f"parameter {name!r} has no counterpart in the {self.name} format")


def _mamba_options(config: dict, where: str) -> dict:
    _require(config, where, "hidden_act", "silu", "silu")
    return {"d_model": config["hidden_size"], "n_layers": config["num_hidden_layers"],
            "d_state": config.get("state_size", 16), "expand": config.get("expand", 2),
            "d_conv": config.get("conv_kernel", 4), "dt_rank": config.get("time_step_rank", "auto"),
            "bias": config.get("use_bias", False), "conv_bias": config.get("use_conv_bias", True),
            "norm_eps": config.get("layer_norm_epsilon", 1e-5), "tie": config.get("tie_word_embeddings", True)}


def _mamba2_options(config: dict, where: str) -> dict:
    _require(config, where, "hidden_act", "silu", "silu")
    _require(config, where, "time_step_limit", [0.0, math.inf], [0.0, math.inf])
    d, expand, headdim = config["hidden_size"], config.get("expand", 2), config.get("head_dim", 64)
    if config.get("num_heads", expand * d // headdim) * headdim != expand * d:
        raise SpecError(f"{where}: num_heads * head_dim = {config.get('num_heads')} * {headdim} must equal "
                        f"expand * hidden_size = {expand * d}, as momkit derives the heads from head_dim")
    return {"d_model": d, "n_layers": config["num_hidden_layers"], "d_state": config.get("state_size", 128),
            "expand": expand, "headdim": headdim, "ngroups": config.get("n_groups", 8),
            "chunk_size": config.get("chunk_size", 256), "d_conv": config.get("conv_kernel", 4),
            "bias": config.get("use_bias", False), "conv_bias": config.get("use_conv_bias", True),
            "norm_eps": config.get("layer_norm_epsilon", 1e-5), "tie": config.get("tie_word_embeddings", False)}


def _rope_theta(config: dict, where: str) -> float:
    rope = config.get("rope_parameters") or {}
    _require({"rope_type": rope.get("rope_type", "default")}, where, "rope_type", "default")
    _require(config, where, "rope_scaling", None)
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _llama_options(config: dict, where: str) -> dict:
    for key in ("attention_bias", "mlp_bias"):
        _require(config, where, key, False, False)
    _require(config, where, "hidden_act", "silu", "silu")
    d, heads = config["hidden_size"], config["num_attention_heads"]
    _require(config, where, "head_dim", (None, d // heads))
    kv_heads = config.get("num_key_value_heads") or heads
    return {"d_model": d, "n_layers": config["num_hidden_layers"], "n_heads": heads,
            "n_kv_heads": None if kv_heads == heads else kv_heads, "ffn_dim": config["intermediate_size"],
            "rope_theta": _rope_theta(config, where), "norm_eps": config.get("rms_norm_eps", 1e-6),
            "tie": config.get("tie_word_embeddings", False)}


def _mamba_ssm_options(config: dict, where: str) -> dict:
    ssm = dict(config.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    _require(config, where, "rms_norm", True, True)
    _require(config, where, "d_intermediate", 0, 0)
    _require(config, where, "attn_layer_idx", ([], None))
    options = {"d_model": config["d_model"], "n_layers": config["n_layer"],
               "norm_eps": config.get("norm_epsilon", 1e-5), "tie": config.get("tie_embeddings", True)}
    own = ("headdim", "ngroups", "chunk_size") if layer == "Mamba2" else ("dt_rank",)
    options.update({name: ssm[name] for name in ("d_state", "d_conv", "expand", "conv_bias", "bias", *own)
                    if name in ssm})
    if layer == "Mamba2":
        for key, supported in (("rmsnorm", True), ("norm_before_gate", False), ("d_ssm", None),
                               ("D_has_hdim", False), ("dt_limit", [0.0, math.inf])):
            _require({f"ssm_cfg.{key}": ssm.get(key, supported)}, where, f"ssm_cfg.{key}", supported)
        options.setdefault("d_state", 128)
    return options


def _layer_names(*names: str, mixer: str = "mixer.") -> tuple[tuple[str, str], ...]:
    return (("norm", "norm"), *((name, mixer + name) for name in names))


MAMBA_LAYER = _layer_names("in_proj", "conv1d", "x_proj", "dt_proj", "A_log", "D", "out_proj")
MAMBA2_LAYER = (*_layer_names("in_proj", "conv1d", "dt_bias", "A_log", "D", "out_proj"), ("gate_norm", "mixer.norm"))
LLAMA_LAYER = (("attn_norm", "input_layernorm"), ("q_proj", "self_attn.q_proj"), ("k_proj", "self_attn.k_proj"),
               ("v_proj", "self_attn.v_proj"), ("o_proj", "self_attn.o_proj"), ("ffn_norm", "post_attention_layernorm"),
               ("ffn.w1", "mlp.gate_proj"), ("ffn.w3", "mlp.up_proj"), ("ffn.w2", "mlp.down_proj"))
HF_MAMBA = dict(embedding="backbone.embeddings.weight", final_norm="backbone.norm_f.weight", head="lm_head.weight",
                layers="backbone.layers")
SSM_MAMBA = {**HF_MAMBA, "embedding": "backbone.embedding.weight"}
FORMATS = {
    ("transformers", "mamba"): Format("transformers MambaForCausalLM", "mamba", **HF_MAMBA, sublayers=MAMBA_LAYER,
                                      options=_mamba_options),
    ("transformers", "mamba2"): Format("transformers Mamba2ForCausalLM", "mamba2", **HF_MAMBA,
                                       sublayers=MAMBA2_LAYER, options=_mamba2_options),
    ("transformers", "llama"): Format("transformers LlamaForCausalLM", "transformer", "model.embed_tokens.weight",
                                      "model.norm.weight", "lm_head.weight", "model.layers", LLAMA_LAYER,
                                      _llama_options),
    ("mamba_ssm", "Mamba1"): Format("mamba_ssm MambaLMHeadModel (Mamba1)", "mamba", **SSM_MAMBA,
                                    sublayers=MAMBA_LAYER, options=_mamba_ssm_options),
    ("mamba_ssm", "Mamba2"): Format("mamba_ssm MambaLMHeadModel (Mamba2)", "mamba2", **SSM_MAMBA,
                                    sublayers=MAMBA2_LAYER, options=_mamba_ssm_options),
}
ARCHITECTURES = {"mamba": "MambaForCausalLM", "mamba2": "Mamba2ForCausalLM", "llama": "LlamaForCausalLM"}


def _format_of(directory: Path) -> Format:
    config = json.loads((directory / "config.json").read_text())
    if "model_type" in config:
        key = ("transformers", config["model_type"])
    elif "d_model" in config and "n_layer" in config:
        key = ("mamba_ssm", (config.get("ssm_cfg") or {}).get("layer", "Mamba1"))
    else:
        key = ("unknown", "")
    if key not in FORMATS:
        raise SpecError(f"{directory}/config.json is of model type {key[1] or 'unknown'!r}; momkit imports "
                        f"transformers {', '.join(ARCHITECTURES.values())} and mamba_ssm MambaLMHeadModel "
                        f"(Mamba1, Mamba2) checkpoints, and momkit model directories")
    return FORMATS[key]


def _imported(directory: Path, fmt: Format, name: str) -> Model:
    """A momkit model named ``name``, of one ``text`` modality, holding the checkpoint's weights."""
    config = json.loads((directory / "config.json").read_text())
    options = fmt.options(config, f"{directory}/config.json")
    tie = options.pop("tie")
    weights = load_weights(directory)
    if fmt.embedding not in weights:
        raise SpecError(f"{directory} has no tensor {fmt.embedding!r}: not a {fmt.name} checkpoint")
    vocab = weights[fmt.embedding].shape[0]
    spec = ModelSpec.model_validate({
        "name": name, "modalities": [{"kind": "text", "vocab_size": vocab, "tie_embeddings": tie}],
        "backbone": {"kind": fmt.backbone, **options}, "routing": {"specific": "dense"}})
    model = build_model(spec)
    used = set()
    state = {}
    for name, param in untied(spec, model.state_dict()).items():
        key = fmt.key(name)
        if key not in weights:
            raise SpecError(f"{directory} has no tensor {key!r} (momkit's {name}); is it a complete {fmt.name} "
                            f"checkpoint?")
        tensor = weights[key]
        if tensor.shape != param.shape and tensor.numel() == param.numel() and name.endswith("conv1d.weight"):
            tensor = tensor.reshape(param.shape)
        if tensor.shape != param.shape:
            raise SpecError(f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)}, but its config.json "
                            f"gives momkit's {name} the shape {tuple(param.shape)}")
        state[name] = tensor
        used.add(key)
    left = sorted(k for k in weights if k not in used and not IGNORED.fullmatch(k) and not (tie and k == fmt.head))
    if left:
        raise SpecError(f"{directory} has tensors momkit does not map: {', '.join(left[:5])}"
                        f"{' ...' if len(left) > 5 else ''}")
    _load_state(model, state)
    return model


def _load_state(model: Model, state: dict[str, torch.Tensor]) -> None:
    """Load a state without tied heads, in the state's floating dtype if it has a single one."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_heads(model.spec)]
    if missing or unexpected:
        raise SpecError(f"the weights do not fit the spec: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _momkit_dir(directory: Path) -> Model:
    spec = load_spec(directory / SPEC_FILE)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{directory / SPEC_FILE} is a block spec; a model directory holds a model spec")
    model = build_model(spec)
    _load_state(model, load_weights(directory))
    return model


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SpecError(f"{repo_id!r} is not a directory here; to download it from the Hugging Face hub, "
                        f"{_extra('hub')}") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.yaml"]))
    except Exception as exc:
        raise SpecError(f"could not download {repo_id!r} from the Hugging Face hub: "
                        f"{str(exc).splitlines()[0]}") from None


def _open(source: str | Path) -> Model:
    path, name = Path(source), Path(source).name
    if not path.exists():
        if isinstance(source, str) and HUB_ID.fullmatch(source):
            path = _download(source)
        else:
            raise SpecError(f"model source {str(source)!r} does not exist: give a momkit model directory, a "
                            f"transformers or mamba_ssm checkpoint directory, or a hub id such as "
                            f"state-spaces/mamba-130m-hf")
    if not path.is_dir():
        raise SpecError(f"model source {str(path)!r} is a file; give the directory that holds it")
    if (path / SPEC_FILE).is_file():
        return _momkit_dir(path)
    if (path / "config.json").is_file():
        return _imported(path, _format_of(path), name)
    raise SpecError(f"{path} holds neither a momkit model ({SPEC_FILE} and weights) nor a checkpoint "
                    f"(config.json and weights)")


def _as_spec(spec: ModelSpec | dict | str | Path) -> ModelSpec:
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    if isinstance(spec, dict):
        spec = ModelSpec.model_validate(spec)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"spec must be a model spec (a ModelSpec, a mapping or a YAML path), got "
                        f"{type(spec).__name__}")
    return spec


def load(source: str | Path | Model, spec: ModelSpec | dict | str | Path | None = None) -> Model:
    """Load a pretrained model, and with ``spec``, upcycle it into that spec's model.

    Args:
        source: A momkit model directory (:meth:`Model.save`); a ``transformers`` checkpoint directory of
            ``MambaForCausalLM``, ``Mamba2ForCausalLM`` or ``LlamaForCausalLM`` (``config.json`` and weights),
            imported as the ``mamba``, ``mamba2`` or ``transformer`` backbone with one ``text`` modality of the
            checkpoint's vocabulary; a mamba_ssm ``MambaLMHeadModel`` directory (``config.json`` and
            ``pytorch_model.bin``); a hub id, downloaded with ``huggingface_hub``; or a :class:`Model`.
        spec: A model spec (a :class:`ModelSpec`, a mapping or a YAML path) to build and fill from the
            source (see :func:`fill`); its new parameters are initialised as training would, from
            ``train.seed``.

    Raises:
        SpecError: the source is missing or of an unknown format, its config asks for what momkit does not
            implement, or the spec does not fit it (naming the field and both sizes).
    """
    model = source if isinstance(source, Model) else _open(source)
    if spec is None:
        return model
    spec = _as_spec(spec)
    torch.manual_seed(spec.train.seed)
    target = build_model(spec)
    fill(target, model)
    return target


def _block_role(block, sublayer: str) -> str:
    if sublayer in block.routed:
        return "routed"
    if block.experts is not None and sublayer in block.experts.sublayers:
        return "experts"
    return "router" if block.experts is not None and sublayer == "router" else "shared"


def sharing(model: Model) -> dict[str, str]:
    """``{parameter name: role}``: ``routed`` for a per-modality copy of a routed sublayer (or final norm),
    ``experts`` for the experts of an expert sublayer, ``router`` for a block's router, ``modality`` for a
    modality's own adapter, head and step embedding, ``shared`` for the rest, which every modality uses."""
    roles = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if parts[0] in ("adapters", "heads", "timestep_embeddings"):
            roles[name] = "modality"
        elif parts[0] == "blocks":
            roles[name] = _block_role(model.blocks[int(parts[1])], parts[2])
        elif parts[0] == "final_norm":
            roles[name] = "routed" if "final_norm" in model.spec.routed else "shared"
        else:
            roles[name] = "shared"
    return roles


def frozen(model: Model, patterns: list[str]) -> set[str]:
    """The parameter names that ``train.freeze`` patterns select: the words ``shared``, ``routed``, ``experts``
    and ``router`` (see :func:`sharing`) and shell-style name patterns; ``SpecError`` for a pattern that selects
    nothing."""
    roles = sharing(model)
    chosen = set()
    for pattern in patterns:
        picked = {n for n, role in roles.items() if role == pattern} if pattern in FREEZE_WORDS else \
            {n for n in roles if fnmatchcase(n, pattern)}
        if not picked:
            examples = ", ".join(list(roles)[:4])
            raise SpecError(f"train.freeze entry {pattern!r} selects no parameter of {model.spec.name!r}; give "
                            f"{', '.join(FREEZE_WORDS)}, or a pattern of parameter names such as {examples}")
        chosen |= picked
    return chosen


def _differences(source: ModelSpec, spec: ModelSpec, layer: int | None) -> list[str]:
    """The shape-setting fields in which ``spec`` differs from ``source``: ``field: spec's, source's``."""
    found = []
    if spec.backbone.d_model != source.backbone.d_model:
        found.append(("backbone.d_model", spec.backbone.d_model, source.backbone.d_model))
    if layer is not None:
        mine, theirs = spec.blocks()[layer].backbone, source.blocks()[layer].backbone
        where = f"layers.{layer % len(spec.layers)}.backbone" if spec.stacked else "backbone"
        for field in type(mine).model_fields:
            if field not in ("d_model", "n_layers") and getattr(mine, field) != getattr(theirs, field, None):
                found.append((f"{where}.{field}", getattr(mine, field), getattr(theirs, field, None)))
    return [f"{field} is {a} in the spec, {b} in the source" for field, a, b in found]


def _modality_fits(source: ModelSpec, spec: ModelSpec, name: str) -> None:
    i = spec.modality_names.index(name)
    mine, theirs = spec.modalities[i], source.modalities[source.modality_names.index(name)]
    for field in ("vocab_size", "latent_dim"):
        if getattr(mine, field) != getattr(theirs, field):
            raise SpecError(f"modalities.{i}.{field} is {getattr(mine, field)} in the spec, "
                            f"{getattr(theirs, field)} in the source model ({name!r})")
    if mine.tie_embeddings and not theirs.tie_embeddings:
        raise SpecError(f"modalities.{i}.tie_embeddings is true in the spec, false in the source model ({name!r}), "
                        f"whose head is not its embedding; set it false")


def _copies(spec: ModelSpec, source: ModelSpec, name: str) -> list[int]:
    """The source's copy of each of the spec's modalities, for a sublayer routed in both."""
    missing = [m for m in spec.modality_names if m not in source.modality_names]
    if missing:
        raise SpecError(f"{name} is routed in the source and in the spec, but the source has no copy for "
                        f"modalities {missing}; the source's modalities: {', '.join(source.modality_names)}")
    return [source.modality_names.index(m) for m in spec.modality_names]


@torch.no_grad()
def fill(model: Model, source: Model) -> None:
    """Copy ``source``'s weights into ``model``, upcycling where ``model`` routes what ``source`` shares.

    Blocks and the final norm must have the same structure (layer count and kinds, widths); a sublayer routed in
    ``model`` and shared in ``source`` gets the shared weight in every copy, so on a modality the source knows, the
    filled model computes what the source did; so does a shared sublayer made experts (sparse upcycling: every
    expert starts as the dense weight, the router as initialised). Adapters, heads and step embeddings are copied
    for the modalities both have (by name); the spec's other modalities keep their initialisation.

    Raises:
        SpecError: naming the spec field that does not fit (``backbone.d_model``, ``backbone.n_layers``,
            ``modalities.1.vocab_size``, ...) with both values.
    """
    spec, theirs = model.spec, source.spec
    if spec.backbone.n_layers != theirs.backbone.n_layers:
        raise SpecError(f"backbone.n_layers is {spec.backbone.n_layers} in the spec, {theirs.backbone.n_layers} in "
                        f"the source")
    for i, (mine, other) in enumerate(zip(spec.blocks(), theirs.blocks())):
        if mine.backbone.kind != other.backbone.kind:
            raise SpecError(f"layer {i}: backbone.kind is {mine.backbone.kind!r} in the spec, "
                            f"{other.backbone.kind!r} in the source")
    src, src_roles, roles = dict(source.named_parameters(remove_duplicate=False)), sharing(source), sharing(model)
    for name, param in model.named_parameters():
        parts = name.split(".")
        if roles[name] == "modality":
            if parts[1] not in theirs.modality_names:
                continue
            _modality_fits(theirs, spec, parts[1])
        if roles[name] == "router" and name not in src:
            continue
        if name not in src:
            raise SpecError(f"the source model has no parameter {name}; its structure differs from the spec's")
        value = src[name].detach()
        if roles[name] == "routed" and src_roles[name] == "routed":
            value = value[_copies(spec, theirs, name)]
        elif roles[name] in ("routed", "experts") and src_roles[name] == "shared":
            value = value.expand(*param.shape[:1], *value.shape)
        elif roles[name] != src_roles[name]:
            raise SpecError(f"routing: {name} is {src_roles[name]} in the source and {roles[name]} in the spec; "
                            f"momkit upcycles shared weights into routed copies or experts, and copies the rest "
                            f"as they are")
        if value.shape != param.shape:
            layer = int(parts[1]) if parts[0] == "blocks" else None
            found = _differences(theirs, spec, layer) or [f"{name} is {tuple(param.shape)} in the spec, "
                                                          f"{tuple(value.shape)} in the source"]
            raise SpecError("the spec does not fit the source: " + "; ".join(found))
        param.copy_(value)


def _hf_config(spec: ModelSpec) -> dict:
    """The ``config.json`` of a transformers model equal to the dense one-text-modality model of ``spec``."""
    b, text = spec.backbone, spec.modalities[0]
    common = {"vocab_size": text.vocab_size, "hidden_size": b.d_model, "num_hidden_layers": b.n_layers,
              "tie_word_embeddings": text.tie_embeddings, "pad_token_id": None, "bos_token_id": None,
              "eos_token_id": None, "torch_dtype": "float32"}
    if b.kind == "mamba":
        return {**common, "model_type": "mamba", "state_size": b.d_state, "expand": b.expand,
                "conv_kernel": b.d_conv, "time_step_rank": b.rank, "use_bias": b.bias, "use_conv_bias": b.conv_bias,
                "layer_norm_epsilon": b.norm_eps, "hidden_act": "silu"}
    if b.kind == "mamba2":
        return {**common, "model_type": "mamba2", "state_size": b.d_state, "expand": b.expand,
                "num_heads": b.nheads, "head_dim": b.headdim, "n_groups": b.ngroups, "chunk_size": b.chunk_size,
                "conv_kernel": b.d_conv, "use_bias": b.bias, "use_conv_bias": b.conv_bias,
                "layer_norm_epsilon": b.norm_eps, "hidden_act": "silu"}
    return {**common, "model_type": "llama", "num_attention_heads": b.n_heads, "num_key_value_heads": b.kv_heads,
            "intermediate_size": b.ffn_hidden, "rms_norm_eps": b.norm_eps, "rope_theta": b.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": b.rope_theta}, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 2048}


def export(model: Model, directory: str | Path, to: str = "transformers") -> Path:
    """Write ``model`` as a ``transformers`` checkpoint (``config.json`` and ``model.safetensors``) that
    ``AutoModelForCausalLM.from_pretrained`` loads with the same logits.

    Only dense ``mamba`` (selective throughout), ``mamba2`` and ``transformer`` (as ``LlamaForCausalLM``)
    models of one discrete modality export: transformers has no routed model. ``SpecError`` names what stands in
    the way.
    """
    if to != "transformers":
        raise SpecError(f"cannot export to {to!r}; valid targets: transformers")
    spec = model.spec
    routed = sorted(spec.routed) + sorted({s for block in spec.blocks() for s in block.routed})
    routed += sorted({s for block in spec.blocks() if block.routing.experts for s in block.routing.experts.sublayers})
    if routed:
        raise SpecError(f"{spec.name!r} routes {', '.join(dict.fromkeys(routed))}; transformers has no routed "
                        f"model, so only dense specs export")
    kinds = {block.backbone.kind for block in spec.blocks()}
    if spec.stacked or len(kinds) != 1 or spec.backbone.kind not in ("mamba", "mamba2", "transformer"):
        raise SpecError(f"{spec.name!r} stacks {', '.join(sorted(kinds))}; exports cover models of one backbone: "
                        f"mamba, mamba2 or transformer")
    fixed = [s for s in ("dt", "B", "C") if s not in getattr(spec.backbone, "selective", ("dt", "B", "C"))]
    if fixed:
        raise SpecError(f"{spec.name!r} makes {', '.join(fixed)} fixed in time (selective "
                        f"{spec.backbone.selective}); transformers' Mamba is selective throughout: valid selective "
                        f"[dt, B, C]")
    if len(spec.modalities) != 1 or not spec.modalities[0].discrete:
        raise SpecError(f"{spec.name!r} has modalities {', '.join(spec.modality_names)}; a transformers causal "
                        f"language model has one discrete modality")
    config = _hf_config(spec)
    fmt = FORMATS[("transformers", config["model_type"])]
    config["architectures"] = [ARCHITECTURES[config["model_type"]]]
    state = {fmt.key(name, spec.modality_names[0]): t.detach().cpu().contiguous()
             for name, t in untied(spec, model.state_dict()).items()}
    state = {k: t.unsqueeze(1) if k.endswith("conv1d.weight") else t for k, t in state.items()}
    directory = Path(directory)
    save_weights(directory, state)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory
