"""The plugin registry: loads the ``momkit`` entry points and indexes what their hooks return by name."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Iterator

import pluggy

from momkit import hookspecs
from momkit.descriptors import Backbone, Dataset, Encoder, Logger, Modality, Objective, ScanBackend
from momkit.errors import PluginError, SpecError

ENTRY_POINT_GROUP = "momkit"

KINDS = {
    "modality": ("momkit_modalities", Modality),
    "backbone": ("momkit_backbones", Backbone),
    "objective": ("momkit_objectives", Objective),
    "scan_backend": ("momkit_scan_backends", ScanBackend),
    "dataset": ("momkit_datasets", Dataset),
    "logger": ("momkit_loggers", Logger),
    "encoder": ("momkit_encoders", Encoder),
}
"""Each kind of registered name: ``{kind: (hook name, descriptor type)}``."""


@dataclass(frozen=True)
class Entry:
    """One registered name: its kind, descriptor and the distribution whose plugin provided it."""

    kind: str
    name: str
    descriptor: object
    distribution: str


class Registry:
    """Every registered modality, backbone, objective, scan backend, dataset, logger and encoder, by name.

    Built from the ``momkit`` entry-point group by :meth:`from_entry_points`; plugins may also be added with
    :meth:`register` (for tests and notebooks) before the first look-up.
    """

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._distributions: dict[str, str] = {}
        self._tables: dict[str, dict[str, Entry]] | None = None

    @classmethod
    def from_entry_points(cls) -> Registry:
        """A registry of every plugin installed under the ``momkit`` entry-point group."""
        registry = cls()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else "unknown distribution"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"momkit plugin {ep.name!r} ({ep.value}) of distribution {dist!r} failed to "
                                  f"import: {exc}") from exc
            registry.register(plugin, distribution=dist, name=f"{dist}:{ep.name}")
        return registry

    def register(self, plugin: object, distribution: str, name: str | None = None) -> None:
        """Add ``plugin`` (a module or object with hook implementations) as coming from ``distribution``."""
        if self._tables is not None:
            raise RuntimeError("plugins must be registered before the registry's first look-up")
        plugin_name = self._pm.register(plugin, name=name)
        self._distributions[plugin_name] = distribution

    def _build(self) -> dict[str, dict[str, Entry]]:
        tables: dict[str, dict[str, Entry]] = {}
        for kind, (hook_name, expected) in KINDS.items():
            table: dict[str, Entry] = {}
            for impl in getattr(self._pm.hook, hook_name).get_hookimpls():
                dist = self._distributions.get(impl.plugin_name, impl.plugin_name)
                try:
                    descriptors = impl.function() or []
                except PluginError as exc:
                    raise PluginError(f"{hook_name} of plugin {impl.plugin_name!r} ({dist}): {exc}") from exc
                for descriptor in descriptors:
                    if not isinstance(descriptor, expected):
                        raise PluginError(f"{hook_name} of plugin {impl.plugin_name!r} ({dist}) returned "
                                        f"{descriptor!r}; expected {expected.__module__}.{expected.__name__}")
                    if descriptor.name in table:
                        other = table[descriptor.name].distribution
                        raise PluginError(f"{kind} {descriptor.name!r} is registered twice: by distribution "
                                         f"{other!r} and by distribution {dist!r}; uninstall one of them")
                    table[descriptor.name] = Entry(kind, descriptor.name, descriptor, dist)
            tables[kind] = dict(sorted(table.items()))
        return tables

    @property
    def tables(self) -> dict[str, dict[str, Entry]]:
        """``{kind: {name: Entry}}`` for every kind of :data:`KINDS`, built on first use."""
        if self._tables is None:
            self._tables = self._build()
        return self._tables

    def names(self, kind: str) -> list[str]:
        """Registered names of ``kind``, sorted."""
        return list(self.tables[kind])

    def get(self, kind: str, name: str):
        """The descriptor of ``kind`` registered as ``name``.

        Raises:
            SpecError: ``name`` is not registered; the message lists the registered names of ``kind``.
        """
        table = self.tables[kind]
        if name not in table:
            known = ", ".join(table) or "none"
            raise SpecError(f"unknown {kind.replace('_', ' ')} {name!r}; registered: {known}")
        return table[name].descriptor

    def _descriptors(self, kind: str) -> dict:
        return {name: entry.descriptor for name, entry in self.tables[kind].items()}

    @property
    def modalities(self) -> dict[str, Modality]:
        """``{name: Modality}`` of every registered modality."""
        return self._descriptors("modality")

    @property
    def backbones(self) -> dict[str, Backbone]:
        """``{name: Backbone}`` of every registered backbone."""
        return self._descriptors("backbone")

    @property
    def objectives(self) -> dict[str, Objective]:
        """``{name: Objective}`` of every registered objective."""
        return self._descriptors("objective")

    @property
    def scan_backends(self) -> dict[str, ScanBackend]:
        """``{name: ScanBackend}`` of every registered scan backend."""
        return self._descriptors("scan_backend")

    @property
    def datasets(self) -> dict[str, Dataset]:
        """``{name: Dataset}`` of every registered dataset."""
        return self._descriptors("dataset")

    @property
    def loggers(self) -> dict[str, Logger]:
        """``{name: Logger}`` of every registered experiment logger."""
        return self._descriptors("logger")

    @property
    def encoders(self) -> dict[str, Encoder]:
        """``{name: Encoder}`` of every registered encoder."""
        return self._descriptors("encoder")


_current: Registry | None = None


def get_registry() -> Registry:
    """The process's registry, loaded from the installed entry points on first use."""
    global _current
    if _current is None:
        _current = Registry.from_entry_points()
    return _current


@contextlib.contextmanager
def use_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process's registry inside a ``with`` block (tests, notebooks)."""
    global _current
    previous, _current = _current, registry
    try:
        yield registry
    finally:
        _current = previous
