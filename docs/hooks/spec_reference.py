"""MkDocs hook: generate the spec reference from the pydantic models.

Replaces the marker ``<!-- momkit:spec-reference -->`` in ``reference/spec.md`` with one table per model
(field, type, default, description, constraints), built from ``model_fields`` of
:class:`momkit.spec.BlockSpec`, :class:`momkit.spec.ModelSpec`, :class:`momkit.spec.RoutingSpec`,
:class:`momkit.spec.ModalityConfig`, :class:`momkit.spec.BackboneConfig` and the config model of every
modality and backbone in the registry, followed by the names registered in the environment that builds
the site. Nothing here is written by hand, so the
page cannot drift from the code.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from typing import Any

import annotated_types
from mkdocs.exceptions import PluginError
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

MARKER = "<!-- momkit:spec-reference -->"


# ---------------------------------------------------------------------------------------------- formatting


def _anchor(model: type) -> str:
    return model.__name__.lower()


def _type(annotation: Any, linked: dict[type, str]) -> str:
    """The annotation in Python syntax, e.g. ``int | None`` or ``list[str] | 'dense' | 'mom'``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type(args[0], linked)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a, linked) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type(a, linked) for a in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _type_cell(annotation: Any, linked: dict[type, str]) -> str:
    text = f"`{_type(annotation, linked)}`"
    target = annotation
    if typing.get_origin(target) is list and len(typing.get_args(target)) == 1:
        target = typing.get_args(target)[0]
    if typing.get_origin(target) is typing.Annotated:
        target = typing.get_args(target)[0]
    if isinstance(target, type) and target in linked:
        return f"[{text}](#{linked[target]})"
    return text


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            value = value.model_dump()
    else:
        value = field.default
    return f"`{_yaml_scalar(value)}`"


CONSTRAINTS = {
    annotated_types.Gt: lambda c: f"> {c.gt}",
    annotated_types.Ge: lambda c: f"≥ {c.ge}",
    annotated_types.Lt: lambda c: f"< {c.lt}",
    annotated_types.Le: lambda c: f"≤ {c.le}",
    annotated_types.MinLen: lambda c: f"at least {c.min_length} item{'s' * (c.min_length != 1)}"
    if c.min_length != 1 else "non-empty",
    annotated_types.MaxLen: lambda c: f"at most {c.max_length} items",
    annotated_types.MultipleOf: lambda c: f"multiple of {c.multiple_of}",
}


def _constraints(field: FieldInfo) -> str:
    parts = []
    for item in field.metadata:
        render = CONSTRAINTS.get(type(item))
        if render is not None:
            parts.append(render(item))
    return ", ".join(parts) or "—"


def _cell(text: str) -> str:
    """One table cell: whitespace collapsed, pipes outside code spans escaped."""
    parts = " ".join(text.split()).split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def _table(model: type[BaseModel], fields: list[str], linked: dict[type, str]) -> list[str]:
    rows = ["| field | type | default | description | constraints |", "| --- | --- | --- | --- | --- |"]
    for name in fields:
        field = model.model_fields[name]
        if not field.description:
            raise PluginError(f"spec reference: field {model.__name__}.{name} has no description")
        rows.append(f"| `{name}` | {_type_cell(field.annotation, linked)} | {_default(field)} | "
                    f"{_cell(field.description)} | {_constraints(field)} |")
    return rows


def _doc(model: type) -> str:
    return inspect.cleandoc(model.__doc__ or "").replace("``", "`")


# ------------------------------------------------------------------------------------------------ the page


def _section(model: type[BaseModel], heading: str, linked: dict[type, str], intro: str = "",
             base: type[BaseModel] | None = None) -> list[str]:
    lines = [f"{heading} `{model.__name__}` {{ #{_anchor(model)} }}", "",
             f"`{model.__module__}.{model.__qualname__}`: {_doc(model)}", ""]
    if intro:
        lines += [intro, ""]
    if base is None:
        own, inherited = list(model.model_fields), []
    else:  # fields declared (or redeclared, e.g. with another default) in the subclass's own body
        declared = inspect.get_annotations(model)
        own = [n for n in model.model_fields if n not in base.model_fields or n in declared]
        inherited = [n for n in base.model_fields if n not in own]
    lines += _table(model, own, linked)
    if inherited:
        names = ", ".join(f"`{n}`" for n in inherited)
        lines += ["", f"Also takes the fields of [`{base.__name__}`](#{_anchor(base)}): {names}."]
    lines.append("")
    return lines


def _registered(registry) -> list[str]:
    lines = ["## Registered names", "",
             "Names a spec may use, as registered in the environment that built this page "
             "(`momkit plugins` lists those of yours).", "",
             "| spec field | registered names |", "| --- | --- |"]
    lines.append(f"| `modalities[].kind` | {', '.join(f'`{n}`' for n in registry.names('modality'))} |")
    lines.append(f"| `backbone.kind` | {', '.join(f'`{n}`' for n in registry.names('backbone'))} |")
    lines.append(f"| `scan_backend` | `auto`, {', '.join(f'`{n}`' for n in registry.names('scan_backend'))} |")
    lines.append(f"| `objectives.*.kind` | {', '.join(f'`{n}`' for n in registry.names('objective'))} |")
    lines.append(f"| `data.kind` | {', '.join(f'`{n}`' for n in registry.names('dataset'))} |")
    lines.append("")
    return lines


def _modality(modality, linked: dict[type, str], base: type[BaseModel]) -> list[str]:
    intro = (f"Settings of a modality entry with `kind: {modality.name}` ({modality.description}); "
             f"`{modality.name}` alone stands for `{{kind: {modality.name}}}` with these defaults.")
    return _section(modality.config, "###", linked, intro=intro, base=base)


def _backbone(backbone, linked: dict[type, str], base: type[BaseModel]) -> list[str]:
    presets = {"dense": (), "all": backbone.sublayers, **backbone.presets}
    preset_rows = ["| preset | routed sublayers |", "| --- | --- |"]
    for name in sorted(presets):
        routed = ", ".join(f"`{s}`" for s in presets[name]) or "none"
        preset_rows.append(f"| `{name}` | {routed} |")
    intro = "\n".join([
        f"Options of `backbone.kind: {backbone.name}` ({backbone.description}).",
        "",
        f"Routable sublayers: {', '.join(f'`{s}`' for s in backbone.sublayers)}.",
        "",
        *preset_rows,
    ])
    return _section(backbone.config, "###", linked, intro=intro, base=base)


def _plugin_settings(descriptor, kind_field: str, linked: dict[type, str], base: type[BaseModel]) -> list[str]:
    intro = f"Settings of `{kind_field}: {descriptor.name}` ({descriptor.description})."
    return _section(descriptor.config, "###", linked, intro=intro, base=base)


def render() -> str:
    import momkit
    from momkit.spec import (BackboneConfig, BlockSpec, DatasetConfig, LayerSpec, ModalityConfig, ModelSpec,
                             ObjectiveConfig, RoutingSpec, TrainConfig)

    try:
        registry = momkit.get_registry()
        backbones = registry.backbones
        modalities = registry.modalities
    except Exception as exc:  # a broken plugin must not produce a silently incomplete page
        raise PluginError(f"spec reference: the momkit registry failed to load: {exc}") from exc

    linked = {m: _anchor(m) for m in (BlockSpec, ModelSpec, LayerSpec, RoutingSpec, ModalityConfig, BackboneConfig,
                                      ObjectiveConfig, DatasetConfig, TrainConfig)}
    lines = ["## Block and model", ""]
    lines += _section(BlockSpec, "###", linked)
    lines += _section(ModelSpec, "###", linked,
                      intro="A `ModelSpec` is a `BlockSpec` with a `name`; its `backbone.n_layers` is required.",
                      base=BlockSpec)
    lines += _section(LayerSpec, "###", linked,
                      intro="An entry of a `ModelSpec`'s `layers` (a pattern repeated to `backbone.n_layers`).")
    lines += ["## Modalities", ""]
    lines += _section(ModalityConfig, "###", linked,
                      intro="An entry of `modalities` is validated by the settings model of its `kind`, one of "
                            "those below.")
    for modality in modalities.values():
        lines += _modality(modality, linked, ModalityConfig)
    lines += ["## Routing", ""]
    lines += _section(RoutingSpec, "###", linked)
    model_sublayers = ", ".join(f"`{n}`" for n in ModelSpec.model_sublayers)
    lines += [f"In a `ModelSpec`, a list may also name the model-level sublayers ({model_sublayers}), which the "
              f"`all` preset routes too.", ""]
    lines += ["## Backbones", ""]
    lines += _section(BackboneConfig, "###", linked,
                      intro="`backbone` in a spec is validated by the options model of its `kind`, one of "
                            "those below.")
    for backbone in backbones.values():
        lines += _backbone(backbone, linked, BackboneConfig)
    lines += ["## Training", ""]
    lines += _section(TrainConfig, "###", linked)
    lines += ["## Objectives", ""]
    lines += _section(ObjectiveConfig, "###", linked,
                      intro="An entry of `objectives` is validated by the settings model of its `kind`.")
    for objective in registry.objectives.values():
        lines += _plugin_settings(objective, "objectives.<modality>.kind", linked, ObjectiveConfig)
    lines += ["## Data", ""]
    lines += _section(DatasetConfig, "###", linked,
                      intro="`data` is validated by the settings model of its `kind`.")
    for dataset in registry.datasets.values():
        lines += _plugin_settings(dataset, "data.kind", linked, DatasetConfig)
    lines += _registered(registry)
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
