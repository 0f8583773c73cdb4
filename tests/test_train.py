"""Training: the loss falls, a resumed run equals an uninterrupted one, a finished run is skipped."""

import json

import pytest
import torch

from momkit.spec import ModelSpec
from momkit.train import learning_rate, train


def toy_spec(**train_changes):
    return ModelSpec.model_validate({
        "name": "toy", "modalities": ["text", {"kind": "image", "name": "latent", "latent_dim": 4}],
        "routing": {"specific": "mom"}, "data": {"kind": "toy"},
        "backbone": {"kind": "mamba", "d_model": 32, "n_layers": 2, "d_state": 8},
        "train": {"steps": 24, "batch_size": 4, "seq_len": 48, "eval_every": 8, "checkpoint_every": 8,
                  "warmup_steps": 4, "lr": 5e-3, "eval_batches": 2, **train_changes}})


def lines(path):
    """The run's log without the wall-clock times."""
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_loss_falls_and_result_is_written(toy_registry, tmp_path):
    result = train(toy_spec(), tmp_path, progress=False)
    evals = [r for r in lines(tmp_path) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16, 24]
    assert evals[-1]["loss/text"] < evals[0]["loss/text"] - 0.5
    assert set(result) >= {"loss/text", "ppl/text", "loss/latent", "flops", "step"}
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert all(b["flops"] > a["flops"] > 0 for a, b in zip(evals, evals[1:]))


def test_resume_continues_exactly(toy_registry, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train(toy_spec(), whole, progress=False)
    train(toy_spec(), split, max_steps=11, progress=False)
    assert not (split / "result.json").exists()
    train(toy_spec(), split, progress=False)
    assert lines(split) == lines(whole)


def test_finished_run_is_skipped(toy_registry, tmp_path):
    train(toy_spec(steps=8), tmp_path, progress=False)
    before = (tmp_path / "metrics.jsonl").read_text()
    checkpoint = (tmp_path / "checkpoint" / "progress.json").stat().st_mtime_ns
    train(toy_spec(steps=8), tmp_path, progress=False)
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "checkpoint" / "progress.json").stat().st_mtime_ns == checkpoint


def test_other_spec_in_same_directory_is_refused(toy_registry, tmp_path):
    train(toy_spec(steps=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds a run of a different spec"):
        train(toy_spec(steps=3), tmp_path, progress=False)


def test_interrupt_keeps_a_resumable_checkpoint(toy_registry, tmp_path, monkeypatch):
    import momkit.train as module

    calls = {"n": 0}
    original = module._Log.write

    def interrupt_at_step_six(self, record):
        original(self, record)
        calls["n"] += record["split"] == "train"
        if calls["n"] == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(module._Log, "write", interrupt_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        train(toy_spec(), tmp_path, progress=False)
    monkeypatch.setattr(module._Log, "write", original)
    train(toy_spec(), tmp_path / "reference", progress=False)
    train(toy_spec(), tmp_path, progress=False)
    assert lines(tmp_path) == lines(tmp_path / "reference")


def test_learning_rate_schedule(toy_registry):
    spec = toy_spec(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(0, spec) == pytest.approx(0.1)
    assert learning_rate(9, spec) == pytest.approx(1.0)
    assert learning_rate(99, spec) == pytest.approx(0.1, abs=1e-3)
    assert learning_rate(55, spec) == pytest.approx(0.55)


def test_weight_decay_spares_norms_and_state_parameters(toy_registry):
    from momkit.model import Model
    from momkit.train import _optimizer

    model = Model(toy_spec())
    decayed, plain = _optimizer(model, toy_spec()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") for p in decayed["params"])
    assert any(names[id(p)].endswith("A_log") for p in plain["params"])
    assert any("norm" in names[id(p)] for p in plain["params"])
    assert torch.is_tensor(decayed["params"][0])
