"""A plugin installed as its own distribution adds a modality, a dataset, a backbone and an encoder; a spec trains
on them, data converts through the encoder, and the plugin's own tests run momkit's block contract checks on its
backbone."""

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

import pytest
import yaml

from momkit.registry import Registry, use_registry
from momkit.spec import ModelSpec
from momkit.train import train

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PLUGINS = Path(__file__).parents[1] / "examples" / "plugins"
PLUGIN = PLUGINS / "momkit-sensors"
UMAMBA = PLUGINS / "momkit-umamba"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example plugins pip-installed into a fresh target directory put on ``sys.path``."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN), str(UMAMBA)], check=True)
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith(("momkit_sensors", "momkit_umamba"))]:
        del sys.modules[name]


def _plugin_tests(installed, plugin: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(plugin / "tests")],
                          env=env, capture_output=True, text=True)


def test_plugin_registers_through_its_entry_point(installed):
    registry = Registry.from_entry_points()
    assert registry.tables["modality"]["sensor"].distribution == "momkit-sensors"
    assert registry.tables["dataset"]["sine_waves"].distribution == "momkit-sensors"
    assert registry.tables["backbone"]["ema"].distribution == "momkit-sensors"
    assert registry.tables["encoder"]["waveform"].distribution == "momkit-sensors"


def test_plugin_encoder_converts_recordings_for_training(installed, tmp_path):
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    for hertz in range(1, 9):
        samples = (np.sin(2 * np.pi * hertz * np.arange(64) / 64) * 32000).astype(np.int16)
        with wave.open(str(recordings / f"{hertz}.wav"), "wb") as clip:
            clip.setnchannels(1)
            clip.setsampwidth(2)
            clip.setframerate(64)
            clip.writeframes(samples.tobytes())
        (recordings / f"{hertz}.txt").write_text(f"wave {hertz} hz")
    spec = {"name": "recordings", "modalities": [{"kind": "text", "encoder": "bytes"},
                                                 {"kind": "sensor", "latent_dim": 4,
                                                  "encoder": {"kind": "waveform", "channels": 4}}],
            "backbone": {"kind": "ema", "d_model": 16, "n_layers": 1}, "routing": {"specific": "all"},
            "data": {"kind": "jsonl", "shards": str(tmp_path / "shards"), "eval_fraction": 0.25},
            "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "eval_every": 3, "eval_batches": 1,
                      "device": "cpu"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed), os.environ.get("PYTHONPATH", "")])}
    for command in (["convert", str(tmp_path / "spec.yaml"), str(recordings), str(tmp_path / "shards"),
                     "--columns", "text=text,audio=sensor"],
                    ["train", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "run")]):
        result = subprocess.run([sys.executable, "-m", "momkit", *command], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    header = yaml.safe_load((tmp_path / "shards" / "header.json").read_text())
    assert header["encoders"]["sensor"] == {"config": {"kind": "waveform", "channels": 4}, "size": 4}
    assert header["modalities"][1]["positions"] == 8 * 16


@pytest.mark.parametrize("plugin", [PLUGIN, UMAMBA], ids=lambda p: p.name)
def test_plugin_backbone_passes_the_contract_suite(installed, plugin):
    """The plugin's tests, run as its author runs them: pytest over its `tests/` folder."""
    result = _plugin_tests(installed, plugin)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "9 passed" in result.stdout


def test_spec_using_the_plugin_trains(installed, tmp_path):
    with use_registry(Registry.from_entry_points()):
        data = yaml.safe_load((PLUGIN / "sensors.yaml").read_text())
        data["backbone"] = {"kind": "ema", "d_model": 16, "n_layers": 1}
        data["routing"] = {"specific": "all"}
        data["train"].update(steps=6, batch_size=2, seq_len=64, eval_every=3, eval_batches=1)
        spec = ModelSpec.model_validate(data)
        result = train(spec, tmp_path, progress=False)
    assert result["step"] == 6 and result["loss/sensor"] > 0 and result["loss/text"] > 0


def test_umamba_registers_and_trains_from_its_spec(installed, tmp_path):
    with use_registry(Registry.from_entry_points()) as registry:
        assert registry.tables["backbone"]["umamba"].distribution == "momkit-umamba"
        data = yaml.safe_load((UMAMBA / "umamba.yaml").read_text())
        data["data"]["cache_dir"] = str(tmp_path / "cache")
        data["data"]["codebook_documents"] = 64
        data["backbone"].update(d_model=16, n_layers=1, d_state=4)
        data["train"].update(steps=4, batch_size=2, seq_len=64, eval_every=2, eval_batches=1, device="cpu")
        spec = ModelSpec.model_validate(data)
        result = train(spec, tmp_path / "run", progress=False)
    assert result["step"] == 4 and result["loss/image"] > 0 and result["loss/text"] > 0
