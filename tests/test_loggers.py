"""Experiment loggers: TensorBoard events, an offline Weights & Biases run and an MLflow run are written by a
training run and read back equal to its metrics.jsonl; a logger from a plugin receives every record."""

import json
import struct
import sys
import time
import types

import pytest
import yaml

from momkit import hookimpl
from momkit.cli import main
from momkit.descriptors import Logger
from momkit.registry import Registry, use_registry

SPEC = {"name": "logged", "modalities": ["text", "image"], "routing": {"specific": "mom"},
        "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
        "data": {"kind": "synthetic", "seed": 1},
        "train": {"steps": 6, "batch_size": 2, "seq_len": 32, "eval_every": 3, "checkpoint_every": 3,
                  "warmup_steps": 1, "eval_batches": 1, "device": "cpu"}}


def _train(tmp_path, *overrides, max_steps=None):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    extra = ["--max-steps", str(max_steps)] if max_steps else []
    return main(["train", str(path), *overrides, "--out", str(tmp_path / "run"), "--quiet", *extra])


def _metrics(tmp_path, split):
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if r["split"] == split}


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert _train(tmp_path, "train.loggers=[tensorboard]", max_steps=4) == 0
    assert _train(tmp_path, "train.loggers=[tensorboard]") == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    for split, key in (("train", "loss/text"), ("eval", "loss/image")):
        logged = {e.step: e.value for e in events.Scalars(f"{split}/{key}")}
        expected = _metrics(tmp_path, split)
        assert sorted(logged) == sorted(expected)
        assert all(logged[s] == pytest.approx(expected[s][key], rel=1e-6) for s in logged)
    by_flops = EventAccumulator(str(tmp_path / "run" / "tensorboard" / "by_mflops"),
                                size_guidance={"scalars": 0}).Reload().Scalars("train_by_mflops/loss/text")
    assert [e.step for e in by_flops] == [int(r["flops"] / 1e6) for r in _metrics(tmp_path, "train").values()]
    assert "spec" in " ".join(events.Tags()["tensors"])


def _wandb_records(path):
    """The protobuf records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    32 KiB blocks of records, each a 7-byte header (CRC-32, length, type: 1 whole, 2 first, 3 middle, 4 last
    piece) and its bytes."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pieces, records = 7, b"", []
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 or position + 7 + length > len(data):
            break
        piece = data[position + 7:position + 7 + length]
        position += 7 + length
        pieces += piece
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def test_offline_wandb_run_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert _train(tmp_path, "train.loggers=[wandb]") == 0
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 60
    while True:  # W&B's service may still be writing the run's last records after finish() returns
        records = _wandb_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[items["_step"]] = items
    for split, key in (("train", "loss/text"), ("eval", "loss/image")):
        for step, expected in _metrics(tmp_path, split).items():
            assert history[step][f"{split}/{key}"] == pytest.approx(expected[key], rel=1e-6)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert "name:logged" in run.tags and "seed:0" in run.tags
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["backbone"]["d_model"] == 16


def test_mlflow_run_reads_back(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert _train(tmp_path, "train.loggers=[mlflow]", max_steps=4) == 0
    assert _train(tmp_path, "train.loggers=[mlflow]") == 0
    client = mlflow.tracking.MlflowClient(store)
    run = client.get_run((tmp_path / "run" / "mlflow_run_id").read_text())
    assert run.data.params["backbone.d_model"] == "16" and run.data.tags["name"] == "logged"
    for split, key in (("train", "loss/text"), ("eval", "loss/image")):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"{split}/{key}")}
        expected = _metrics(tmp_path, split)
        assert set(history) == set(expected)
        assert all(history[s] == pytest.approx(expected[s][key], rel=1e-6) for s in history)


def test_a_plugin_logger_receives_every_record(tmp_path):
    received, closed = [], []

    class Sink:
        def __init__(self, context):
            assert context.tags == {"name": "logged", "seed": "0"} and context.spec.name == "logged"

        def log(self, record):
            received.append(record)

        def close(self):
            closed.append(True)

    plugin = types.ModuleType("memory_logger")
    plugin.momkit_loggers = hookimpl(lambda: [Logger(name="memory", description="keeps records", open=Sink)])
    registry = Registry.from_entry_points()
    registry.register(plugin, distribution="tests")
    with use_registry(registry):
        assert _train(tmp_path, "train.loggers=[memory]") == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert received == lines and closed == [True]


def test_logger_errors_exit_2_with_one_line(tmp_path, capsys, monkeypatch):
    assert _train(tmp_path, "train.loggers=[neptune]") == 2
    err = capsys.readouterr().err
    assert "neptune" in err and "mlflow, tensorboard, wandb" in err
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert _train(tmp_path, "train.loggers=[wandb]") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install 'momkit[wandb]'") and len(err.splitlines()) == 1


def test_a_suite_run_is_tagged_with_its_variant(tmp_path):
    from momkit.spec import ModelSpec
    from momkit.tracking import LogContext

    spec = ModelSpec.model_validate({**SPEC, "name": "mom/seed1", "train": {**SPEC["train"], "seed": 1}})
    context = LogContext.of(tmp_path, spec, 0)
    assert context.tags == {"name": "mom/seed1", "seed": "1", "variant": "mom"}
    assert context.run_id == LogContext.of(tmp_path, spec, 3).run_id
