"""The registry: built-ins arrive through entry points, look-ups fail clearly, clashes name both sides."""

import sys
import textwrap
import types

import pytest

from momkit import hookimpl
from momkit.descriptors import Modality
from momkit.registry import KINDS, PluginError, Registry, get_registry
from momkit.spec import ModalityConfig


def modality_plugin(*names):
    module = types.ModuleType("plugin_" + "_".join(names))

    @hookimpl
    def momkit_modalities():
        return [Modality(name=n, description="test", config=ModalityConfig) for n in names]

    module.momkit_modalities = momkit_modalities
    return module


def test_builtins_registered_through_entry_points():
    registry = Registry.from_entry_points()
    assert {"mamba"} <= set(registry.names("backbone"))
    assert {"text", "image", "speech"} <= set(registry.names("modality"))
    assert "reference" in registry.names("scan_backend")
    for kind in KINDS:
        for entry in registry.tables[kind].values():
            assert entry.distribution
    assert registry.tables["backbone"]["mamba"].distribution == "momkit"


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match=r"unknown backbone 'mamab'; registered: .*mamba"):
        get_registry().get("backbone", "mamab")


def test_duplicate_name_names_both_distributions():
    registry = Registry()
    registry.register(modality_plugin("text", "video"), distribution="first-dist")
    registry.register(modality_plugin("video"), distribution="second-dist")
    with pytest.raises(PluginError, match="modality 'video' is registered twice.*first-dist.*second-dist"):
        registry.names("modality")


def test_wrong_descriptor_type_is_reported():
    registry = Registry()
    module = types.ModuleType("bad")
    module.momkit_backbones = hookimpl(lambda: ["not a descriptor"])
    registry.register(module, distribution="bad-dist")
    with pytest.raises(PluginError, match="momkit_backbones.*bad-dist"):
        registry.names("backbone")


def test_third_party_distribution_is_discovered(tmp_path, monkeypatch):
    """A separately installed distribution with a `momkit` entry point adds its names to the registry."""
    package = tmp_path / "momkit_extra_modality"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        from pydantic import Field

        from momkit import hookimpl
        from momkit.descriptors import Modality
        from momkit.spec import ModalityConfig

        class VideoConfig(ModalityConfig):
            latent_dim: int | None = Field(32, gt=0, description="latent size")

        @hookimpl
        def momkit_modalities():
            return [Modality(name="video", description="video latents", config=VideoConfig)]
    """))
    info = tmp_path / "momkit_extra_modality-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: momkit-extra-modality\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[momkit]\nvideo = momkit_extra_modality\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry.from_entry_points()
    assert registry.tables["modality"]["video"].distribution == "momkit-extra-modality"
    assert registry.modalities["video"].config.model_validate({"kind": "video"}).latent_dim == 32
    sys.modules.pop("momkit_extra_modality", None)


def test_broken_plugin_import_names_distribution(tmp_path, monkeypatch):
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[momkit]\nbroken = no_such_module_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="'broken'.*broken-plugin.*failed to import"):
        Registry.from_entry_points()
