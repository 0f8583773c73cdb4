"""Ablation suites: every variant trained once, tables and plots written, broken suites stopped early."""

import json
import math

import pytest
import yaml

from momkit.ablate import SuiteSpec, curve_noise, flops_to_match, load_suite, monotone, report, run_suite
from momkit.cli import main

BASE = {
    "name": "toy", "modalities": ["text", "image"], "data": {"kind": "toy"},
    "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 1, "d_state": 4},
    "train": {"steps": 6, "batch_size": 2, "seq_len": 32, "eval_every": 3, "checkpoint_every": 3,
              "warmup_steps": 1, "eval_batches": 1},
}


def write_suite(tmp_path, **changes):
    suite = {"name": "toy-suite", "base": "base.yaml", "baseline": "dense", "seeds": [0, 1],
             "variants": {"dense": {"routing.specific": "dense"}, "mom": {"routing.specific": "mom"}},
             "overrides": {"train.lr": 0.004}, **changes}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    return tmp_path / "suite.yaml"


def test_suite_runs_every_variant_and_reports(toy_registry, tmp_path):
    path = write_suite(tmp_path, grid={"routing.specific": [["in_proj"], ["in_proj", "out_proj"]]})
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    variants = ["dense", "mom", "routing.specific=in_proj", "routing.specific=in_proj+out_proj"]
    for variant in variants:
        for seed in (0, 1):
            assert (out / "runs" / variant / f"seed{seed}" / "result.json").exists()
    rows = list(__import__("csv").DictReader((out / "summary.csv").open()))
    assert {(r["variant"], r["modality"]) for r in rows} == {(v, m) for v in variants for m in ("text", "image")}
    dense_text = next(r for r in rows if r["variant"] == "dense" and r["modality"] == "text")
    assert float(dense_text["gain"]) == 0.0 and float(dense_text["flops_to_match"]) == pytest.approx(1.0)
    assert "FLOPs-to-match" in (out / "summary.md").read_text()
    for modality in ("text", "image"):
        assert (out / "plots" / f"loss_vs_flops_{modality}.png").stat().st_size > 1000
    spec = yaml.safe_load((out / "runs" / "mom" / "seed1" / "spec.yaml").read_text())
    assert spec["train"]["seed"] == 1 and spec["train"]["lr"] == 0.004 and spec["routing"]["specific"] == "mom"

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint/progress.json")}
    assert main(["ablate", str(path), "--out", str(out)]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/checkpoint/progress.json")}

    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "summary.md").exists()


def test_interrupted_suite_completes_on_rerun(toy_registry, tmp_path):
    path = write_suite(tmp_path, seeds=[0])
    suite, base = load_suite(path)
    run_suite(suite, base, tmp_path / "out", max_steps=4, progress=False)
    assert not (tmp_path / "out" / "runs" / "dense" / "seed0" / "result.json").exists()
    rows = report(tmp_path / "out")
    assert rows and all(not r["finished"] for r in rows)
    run_suite(suite, base, tmp_path / "out", progress=False)
    assert json.loads((tmp_path / "out" / "runs" / "mom" / "seed0" / "result.json").read_text())["step"] == 6


@pytest.mark.parametrize("changes,message", [
    ({"baseline": "sparse"}, "baseline 'sparse' is not a variant; variants: dense, mom"),
    ({"grid": {"routing.specific": []}}, "grid field.*'routing.specific'.*no values"),
    ({"variants": {}, "grid": {}}, "no variants"),
    ({"seed": 3}, "unknown field.*'seed'"),
    ({"variants": {"dense": {"routing.specific": "dense"}, "bad": {"backbone.d_stat": 4}}},
     "variant 'bad' .* not a valid spec.*d_stat"),
])
def test_broken_suite_stops_before_training(toy_registry, tmp_path, capsys, changes, message):
    path = write_suite(tmp_path, **changes)
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not (tmp_path / "out" / "runs").exists()


def test_flops_to_match_interpolates():
    curve = [(10.0, 3.0), (20.0, 2.0), (30.0, 1.0)]
    assert flops_to_match(curve, 1.5, 40.0) == pytest.approx(25.0 / 40.0)
    assert flops_to_match(curve, 3.5, 40.0) == pytest.approx(10.0 / 40.0)
    assert flops_to_match(curve, 0.5, 40.0) is None


def test_monotone_fit_pools_noise_and_measures_it():
    curve = [(1.0, 3.0), (2.0, 1.0), (3.0, 2.0), (4.0, 0.5)]
    assert [loss for _, loss in monotone(curve)] == [3.0, 1.5, 1.5, 0.5]
    assert curve_noise(curve) == pytest.approx(math.sqrt(2 * 0.25 / 4))
    assert curve_noise(curve[:1]) is None


def _fake_suite(out, losses):
    """A suite directory whose runs' eval curves are ``{variant: [[loss per eval] per seed]}``."""
    (out / "runs").mkdir(parents=True)
    (out / "suite.json").write_text(json.dumps({"name": "fake", "baseline": "base", "variants": list(losses),
                                                "seeds": [0, 1]}))
    for variant, seeds in losses.items():
        for seed, values in enumerate(seeds):
            run = out / "runs" / variant / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "metrics.jsonl").write_text("".join(
                json.dumps({"split": "eval", "step": 10 * (i + 1), "flops": 100.0 * (i + 1), "loss/text": v}) + "\n"
                for i, v in enumerate(values)))


def test_flops_to_match_is_not_fooled_by_a_noisy_flat_curve(tmp_path):
    noisy = [3.0, 1.2, 0.9, 1.1, 1.0, 1.05, 1.0]
    _fake_suite(tmp_path, {"base": [noisy, noisy], "same": [noisy, noisy],
                           "faster": [[3.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8]] * 2})
    rows = {r["variant"]: r for r in report(tmp_path)}
    assert rows["base"]["flops_to_match"] == 1.0 and rows["same"]["flops_to_match"] == 1.0
    assert rows["faster"]["flops_to_match"] < 0.7
    assert rows["base"]["curve_noise"] > 0.01
    assert "curve noise" in (tmp_path / "summary.md").read_text()


def test_grid_variants_are_named_by_their_values():
    suite = SuiteSpec.model_validate({"name": "g", "base": {}, "baseline": "routing.specific=dense",
                                      "grid": {"routing.specific": ["dense", ["in_proj", "x_proj"]]}})
    assert list(suite.all_variants()) == ["routing.specific=dense", "routing.specific=in_proj+x_proj"]
