"""Training: the loss falls, a resumed run equals an uninterrupted one, a finished run is skipped."""

import json
import math

import pytest
import torch
from torch import nn

from momkit import SpecError
from momkit import routing as routing_layers
from momkit.model import Model
from momkit.routing import decays
from momkit.spec import ModelSpec
from momkit.train import _optimizer, learning_rate, train


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
    train(toy_spec(device="cpu"), whole, progress=False)
    train(toy_spec(device="cpu"), split, max_steps=11, progress=False)
    assert not (split / "result.json").exists()
    train(toy_spec(device="cpu"), split, progress=False)
    assert lines(split) == lines(whole)


def _largest_difference(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference between the floats of two run logs whose other values are equal."""
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in a] == \
        [{k: v for k, v in r.items() if not isinstance(v, float)} for r in b]
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b) for k in x if isinstance(x[k], float))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision,bound", [("fp32", 1e-5), ("fp16", 1e-3)])
def test_resume_on_a_gpu_continues_to_the_kernels_rounding(toy_registry, tmp_path, precision, bound):
    """On a GPU the scan's backward adds float32 partial sums atomically, in an order that varies, so runs differ
    in their last bits: two uninterrupted runs on an H200 differed by up to 1.9e-7 (fp32) and 5.5e-5 (fp16), and a
    resumed one from them by as much. The bounds leave a margin of 18 to 50 over that."""
    spec = toy_spec(device="cuda", precision=precision, steps=16)
    runs = [tmp_path / name for name in ("whole", "again", "split")]
    for run in runs[:2]:
        result = train(spec, run, progress=False)
    assert math.isfinite(result["loss/text"]) and result["loss/text"] < lines(runs[0])[0]["loss/text"]
    train(spec, runs[2], max_steps=7, progress=False)
    train(spec, runs[2], progress=False)
    whole = lines(runs[0])
    spread, resumed = _largest_difference(lines(runs[1]), whole), _largest_difference(lines(runs[2]), whole)
    assert resumed < bound, (spread, resumed)


def test_each_training_batch_is_read_once_before_the_step_that_needs_it_waits(toy_registry, tmp_path,
                                                                               monkeypatch):
    from tests.conftest import ToySource

    reads, at_clipping = [], []
    read, clip = ToySource.batch, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(ToySource, "batch", lambda self, index, size: (
        reads.append(index) if self.seed % 2 == 0 else None) or read(self, index, size))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: (
        at_clipping.append(len(reads)) or clip(*args, **kwargs)))
    train(toy_spec(steps=5, grad_accum=2, eval_every=5), tmp_path, progress=False)
    assert reads == list(range(10))
    assert at_clipping == [3, 5, 7, 9, 10]


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


@pytest.mark.parametrize("kind,routing", [("mamba", "all"), ("mamba", "mom"), ("mamba2", "all"),
                                          ("transformer", "mot")])
def test_weight_decay_falls_on_the_matrices_of_linear_layers_and_embeddings(toy_registry, kind, routing):
    """Declared by the parameters (``no_weight_decay``), decay falls where it always has: on the weights of linear
    layers (routed or shared) and embeddings, never on norms, biases, conv taps or the state parameters."""
    spec = toy_spec().model_dump()
    spec["backbone"] = {"kind": kind, "d_model": 32, "n_layers": 1, **({"headdim": 16} if kind == "mamba2" else {})}
    spec["routing"] = {"specific": routing}
    model = Model(ModelSpec.model_validate(spec))
    matrices = {f"{name}.weight" for name, m in model.named_modules()
                if isinstance(m, (routing_layers.Linear, nn.Linear, nn.Embedding))}
    decayed = {name for name, p in model.named_parameters() if decays(p)}
    assert decayed == matrices
    groups = _optimizer(model, toy_spec(), decayed).param_groups
    assert [len(g["params"]) for g in groups] == [len(matrices), len(list(model.parameters())) - len(matrices)]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_a_run_stopped_before_its_first_evaluation_evaluates_at_its_last_step(toy_registry, tmp_path):
    result = train(toy_spec(), tmp_path, max_steps=3, progress=False)
    assert result["step"] == 3 and result["split"] == "eval" and result["loss/text"] > 0
    assert [r["split"] for r in lines(tmp_path)] == ["train"] * 3


def poisoned(monkeypatch, bad_steps):
    """Make the training loss NaN at the (0-based) optimiser steps in ``bad_steps`` (batch size 4, one micro-batch)."""
    import momkit.train as module

    original = module._Objectives.evaluate
    calls = {"n": 0}

    def evaluate(self, model, batch, generator):
        total, parts, router = original(self, model, batch, generator)
        if model.training:
            calls["n"] += 1
            if calls["n"] - 1 in bad_steps:
                total = total * float("nan")
        return total, parts, router

    monkeypatch.setattr(module._Objectives, "evaluate", evaluate)


def test_a_step_with_a_non_finite_loss_is_skipped_and_logged(toy_registry, tmp_path, monkeypatch):
    poisoned(monkeypatch, {5})
    result = train(toy_spec(), tmp_path, progress=False)
    records = lines(tmp_path)
    skipped = [r["step"] for r in records if r.get("skipped")]
    assert skipped == [6] and result["skipped_steps"] == 1 and math.isfinite(result["loss/text"])


def test_a_skipped_step_leaves_the_parameters_and_the_optimiser_alone(toy_registry, monkeypatch):
    from momkit.train import _Ranks, _Trainer

    trainer = _Trainer.build(toy_spec(), torch.device("cpu"), _Ranks(0, 1, False))
    ranks = _Ranks(0, 1, False)
    assert trainer.step(0, ranks)[1]
    params = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in trainer.optimizer.state.values()]
    poisoned(monkeypatch, {0})
    assert not trainer.step(1, ranks)[1]
    assert all(torch.equal(params[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, trainer.optimizer.state.values()))
    assert all(p.grad is None for p in trainer.model.parameters())
    monkeypatch.undo()
    assert trainer.step(2, ranks)[1]
    assert any(not torch.equal(params[k], v) for k, v in trainer.model.state_dict().items())


def test_too_many_bad_steps_in_a_row_stop_the_run_and_keep_its_checkpoint(toy_registry, tmp_path, monkeypatch):
    poisoned(monkeypatch, set(range(4, 24)))
    with pytest.raises(SpecError, match=r"stopped at step 7: the loss or the gradients were not finite for 3 steps "
                                         r"in a row \(train.max_bad_steps\); its checkpoint of step 4 is kept"):
        train(toy_spec(checkpoint_every=2, max_bad_steps=3), tmp_path, progress=False)
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"] == 4


def test_fp16_trains_with_a_gradient_scaler_and_resumes_exactly(toy_registry, tmp_path):
    spec = toy_spec(device="cpu", precision="fp16", steps=16)
    whole, split = tmp_path / "whole", tmp_path / "split"
    result = train(spec, whole, progress=False)
    assert math.isfinite(result["loss/text"]) and result["loss/text"] < lines(whole)[0]["loss/text"]
    train(spec, split, max_steps=7, progress=False)
    train(spec, split, progress=False)
    assert lines(split) == lines(whole)
