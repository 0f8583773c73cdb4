"""Training under torchrun on CPU (gloo), with DDP and FSDP2: two ranks equal one process, and a run resumes
on another number of ranks."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader

from momkit.model import Model
from momkit.spec import ModelSpec
from momkit.rundir import RunDir
from momkit.train import _load, _optimizer

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SPEC = {
    "name": "ranks", "modalities": ["text", "image"], "routing": {"specific": "mom"},
    "backbone": {"kind": "mamba", "d_model": 16, "n_layers": 2, "d_state": 4},
    "data": {"kind": "synthetic", "seed": 3},
    "train": {"steps": 6, "batch_size": 2, "grad_accum": 2, "seq_len": 32, "eval_every": 3,
              "checkpoint_every": 3, "warmup_steps": 1, "eval_batches": 3, "device": "cpu"},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPERTS = {**SPEC, "routing": {"specific": "dense"},
           "layers": [{}, {"backbone": {"kind": "ffn"}, "routing": {"specific": "dense", "experts": {
               "sublayers": ["w1", "w2", "w3"], "n_experts": 4, "top_k": 2, "capacity_factor": 1.0}}}]}


def momkit(tmp_path, ranks, out, *args, strategy="ddp", base=SPEC, parallel=None):
    spec = tmp_path / f"spec-{strategy}.yaml"
    spec.write_text(yaml.safe_dump({**base, "parallel": {"strategy": strategy, **(parallel or {})}}))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m"] if ranks > 1 else \
        [sys.executable, "-m"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "momkit", "train", str(spec), "--out", str(out), *args], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def parameters(out, strategy, base=SPEC):
    spec = ModelSpec.model_validate({**base, "parallel": {"strategy": strategy}})
    model = Model(spec)
    _load(RunDir(out), model, _optimizer(model, spec))
    return model.state_dict()


def curve(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, strategy="ddp", base=SPEC):
    for x, y in zip(curve(a), curve(b), strict=True):
        assert x.keys() == y.keys() and x["step"] == y["step"] and x["flops"] == y["flops"]
        for key in x:
            if key.startswith(("loss", "ppl", "aux", "dropped", "router_mi")):
                assert x[key] == pytest.approx(y[key], rel=1e-4), key
            if key == "expert_load":
                assert x[key] == y[key]
    pa, pb = parameters(a, strategy, base), parameters(b, strategy, base)
    for name in pa:
        torch.testing.assert_close(pa[name], pb[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("strategy, parallel", [("ddp", {}), ("fsdp", {}),
                                                ("fsdp", {"reshard_after_forward": False})])
def test_two_ranks_equal_one_process(tmp_path, strategy, parallel):
    momkit(tmp_path, 1, tmp_path / "one", strategy=strategy)
    momkit(tmp_path, 2, tmp_path / "two", strategy=strategy, parallel=parallel)
    assert_same_run(tmp_path / "one", tmp_path / "two", strategy)
    assert (tmp_path / "two" / "result.json").exists()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_accumulating_micro_batches_equal_one_process(tmp_path, strategy):
    base = {**SPEC, "train": {**SPEC["train"], "grad_accum": 4}}
    momkit(tmp_path, 1, tmp_path / "one", strategy=strategy, base=base)
    momkit(tmp_path, 2, tmp_path / "two", strategy=strategy, base=base)
    assert_same_run(tmp_path / "one", tmp_path / "two", strategy, base)


def test_fsdp_computes_in_bfloat16_and_keeps_float32_parameters(tmp_path):
    momkit(tmp_path, 1, tmp_path / "one", strategy="fsdp")
    momkit(tmp_path, 2, tmp_path / "two", strategy="fsdp", parallel={"param_dtype": "bf16"})
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    losses = [(x["loss"], y["loss"]) for x, y in zip(one, two, strict=True) if x["split"] == "eval"]
    assert all(abs(x - y) < 0.02 * x for x, y in losses), losses
    assert any(x != y for x, y in losses), "bf16 parameters computed the float32 run exactly"
    saved = FileSystemReader(tmp_path / "two" / "checkpoint").read_metadata().state_dict_metadata
    model = {name: meta for name, meta in saved.items() if name.startswith("model.")}
    assert model and all(meta.properties.dtype == torch.float32 for meta in model.values())


def test_two_ranks_equal_one_process_with_experts(tmp_path):
    momkit(tmp_path, 1, tmp_path / "one", base=EXPERTS)
    momkit(tmp_path, 2, tmp_path / "two", base=EXPERTS)
    assert_same_run(tmp_path / "one", tmp_path / "two", base=EXPERTS)
    assert any("aux/balance" in line for line in curve(tmp_path / "two"))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path, strategy):
    momkit(tmp_path, 1, tmp_path / "one", strategy=strategy)
    momkit(tmp_path, 2, tmp_path / "switched", "--max-steps", "3", strategy=strategy)
    assert not (tmp_path / "switched" / "result.json").exists()
    momkit(tmp_path, 1, tmp_path / "switched", strategy=strategy)
    assert_same_run(tmp_path / "one", tmp_path / "switched", strategy)


def test_grad_accum_must_divide_among_ranks(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "train": {**SPEC["train"], "grad_accum": 1}}))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
                             "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m",
                             "momkit", "train", str(spec), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "train.grad_accum = 1 must be a multiple of the number of ranks (2)" in result.stderr


def test_suite_workers_run_variants_concurrently(tmp_path, monkeypatch):
    import threading
    import time

    import momkit.ablate
    from momkit.cli import main

    spans, run = {}, momkit.ablate.subprocess.run

    def timed(command, **kwargs):
        start = time.monotonic()
        result = run(command, **kwargs)
        spans[threading.get_ident()] = (start, time.monotonic())
        return result

    monkeypatch.setattr(momkit.ablate.subprocess, "run", timed)
    base = {**SPEC, "train": {**SPEC["train"], "steps": 8, "grad_accum": 1}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump({
        "name": "workers", "base": "base.yaml", "baseline": "dense", "seeds": [0],
        "variants": {"dense": {"routing.specific": "dense"}, "mom": {"routing.specific": "mom"}}}))
    out = tmp_path / "out"
    assert main(["ablate", str(tmp_path / "suite.yaml"), "--out", str(out), "--workers", "2"]) == 0
    (a_start, a_end), (b_start, b_end) = spans.values()
    assert a_start < b_end and b_start < a_end, spans
    for variant in ("dense", "mom"):
        assert (out / "runs" / variant / "seed0" / "result.json").exists()
    assert (out / "summary.md").exists()


def test_slurm_launcher_through_submitit(tmp_path):
    pytest.importorskip("submitit")
    from momkit.ablate import SuiteSpec, run_suite

    suite = SuiteSpec.model_validate({"name": "slurm", "base": {}, "baseline": "dense", "seeds": [0],
                                      "variants": {"dense": {"routing.specific": "dense"}}})
    base = {**SPEC, "train": {**SPEC["train"], "steps": 3, "grad_accum": 1}}
    run_suite(suite, base, tmp_path / "out", launcher="slurm", cluster="debug")
    assert (tmp_path / "out" / "runs" / "dense" / "seed0" / "result.json").exists()
    assert (tmp_path / "out" / "slurm").is_dir()
