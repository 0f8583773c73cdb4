"""Data-parallel scaling of ``momkit train`` on the GPUs of one host: DDP and FSDP2 on 2 GPUs against 1.

Run from the repository root on a machine with two GPUs: ``python benchmarks/scale.py``. For each row it
launches ``torchrun --nproc-per-node N`` on this same script in worker mode, which trains a
Mixture-of-Mamba model (bf16 autocast, the same global batch whatever N: ``grad_accum`` micro-batches shared
by the ranks) on the ``synthetic`` dataset, then prints one table:

- tokens/s: training tokens over the wall-clock time between the end of step ``--warmup`` and the last step,
  read from the run's ``metrics.jsonl`` (evaluation and checkpoint time excluded: both happen at the end);
- peak memory: the largest ``torch.cuda.max_memory_allocated()`` over the ranks;

and the scaling of each two-GPU row: its tokens/s over the mean of two one-GPU runs, the first and the last
of the table (on one GPU both strategies run the model unwrapped, so one run serves both; two runs show how
far the machine drifts between them).

``--fsdp OPTIONS`` (repeatable) adds a two-GPU FSDP2 row per set of ``parallel`` options, e.g.
``--fsdp "" --fsdp reshard_after_forward=false,param_dtype=bf16``. ``--profile`` records, on rank 0 of every
row, the ``PROFILED`` steps after the warm-up with the PyTorch profiler (the timing starts one step after
them, past the profile's processing) and prints where a step's GPU time goes: compute kernels, communication
(NCCL) kernels, the part of the communication that no compute kernel overlaps, and the time the GPU runs
nothing; then, for each FSDP2 row, the kernels whose time per step differs most from DDP's.

``--memory`` measures instead whether a model fits: each row runs ``--steps`` training steps (no evaluation,
no checkpoint) and reports the peak memory per GPU, or that a rank ran out of memory. Use it with a model
whose parameters and optimiser state dominate, e.g. ``--memory --d-model 4096 --layers 40 --batch-size 1``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROFILED = 3
SHARED = ("steps", "warmup", "batch_size", "seq_len", "d_model", "layers", "scan_backend")


def options(text: str) -> dict:
    """``key=value,key=value`` as ``parallel`` options (values read as YAML scalars)."""
    import yaml

    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    bad = [item for item in pairs if len(item) != 2]
    if bad:
        raise SystemExit(f"--fsdp takes key=value pairs separated by commas, not {text!r}")
    return {key.strip(): yaml.safe_load(value) for key, value in pairs}


def spec(args: argparse.Namespace, strategy: str, parallel: dict) -> dict:
    return {
        "name": f"scale-{strategy}",
        "modalities": ["text", {"kind": "image", "vocab_size": 1024}],
        "backbone": {"kind": "mamba", "d_model": args.d_model, "n_layers": args.layers, "d_state": 16},
        "routing": {"specific": "mom"},
        "scan_backend": args.scan_backend,
        "parallel": {"strategy": strategy, **parallel},
        "data": {"kind": "synthetic", "seed": 0},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": 2, "seq_len": args.seq_len,
                  "eval_every": args.steps, "eval_batches": 2, "checkpoint_every": args.steps,
                  "warmup_steps": 2},
    }


def gpu_time(events, steps: int) -> dict:
    """Per step, in ms: the union of the compute kernels' and of the communication kernels' intervals, the
    communication no compute kernel overlaps, and the time between the first and last kernel that runs none."""
    from torch.autograd import DeviceType

    def union(spans):
        merged = []
        for start, end in sorted(spans):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return merged

    def length(spans):
        return sum(end - start for start, end in spans)

    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    comm = union([(s, e) for name, s, e in kernels if "nccl" in name.lower()])
    compute = union([(s, e) for name, s, e in kernels if "nccl" not in name.lower()])
    both = union([(s, e) for _, s, e in kernels])
    overlap = length(comm) + length(compute) - length(both)
    window = max(e for _, _, e in kernels) - min(s for _, s, _ in kernels)
    return {"compute": length(compute) / steps / 1e3, "communication": length(comm) / steps / 1e3,
            "exposed communication": (length(comm) - overlap) / steps / 1e3,
            "idle": (window - length(both)) / steps / 1e3}


def kernel_time(events, steps: int) -> dict:
    """Per step, in ms: the time of the GPU's kernels and copies by name (the first 70 characters)."""
    from torch.autograd import DeviceType

    times: dict[str, float] = {}
    for e in events:
        if e.device_type == DeviceType.CUDA:
            name = e.name[:70]
            times[name] = times.get(name, 0.0) + (e.time_range.end - e.time_range.start) / steps / 1e3
    return times


def differences(rows: list[tuple[str, dict]], reference: dict, most: int = 8) -> None:
    """Print, for each row, the ``most`` kernels whose time per step differs most from ``reference``'s."""
    for name, kernels in rows:
        changed = sorted(set(kernels) | set(reference), key=lambda k: -abs(kernels.get(k, 0) - reference.get(k, 0)))
        print(f"\n{name}, against ddp on 2 GPUs (ms per step: this row, ddp, difference):\n")
        for kernel in changed[:most]:
            mine, theirs = kernels.get(kernel, 0.0), reference.get(kernel, 0.0)
            print(f"- `{kernel}`: {mine:.2f}, {theirs:.2f}, {mine - theirs:+.2f}")


def profiler_plugin(first: int, out: Path):
    """A logger that steps a profiler with the run's training steps: steps ``first`` to ``first + PROFILED``
    - 1 are recorded (after one step of profiler warm-up) and summarised into ``out/profile.json``."""
    from momkit import hookimpl
    from momkit.descriptors import Logger

    def ready(profiler):
        events = profiler.events()
        summary = {**gpu_time(events, PROFILED), "kernels": kernel_time(events, PROFILED)}
        (out / "profile.json").write_text(json.dumps(summary))

    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(wait=first - 2, warmup=1, active=PROFILED, repeat=1), on_trace_ready=ready)

    class Sink:
        def __init__(self, context):
            profiler.start()

        def log(self, record):
            if record["split"] == "train":
                profiler.step()

        def close(self):
            profiler.stop()

    class Plugin:
        @hookimpl
        def momkit_loggers(self):
            return [Logger(name="profile", description="the PyTorch profiler over a few steps", open=Sink)]

    return Plugin()


def worker(args: argparse.Namespace) -> None:
    from momkit.registry import get_registry
    from momkit.spec import ModelSpec

    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    config = spec(args, args.strategy, json.loads(args.parallel))
    if args.profile and rank == 0:
        get_registry().register(profiler_plugin(args.warmup + 1, out), distribution="benchmarks")
        config["train"]["loggers"] = ["profile"]
    model_spec = ModelSpec.model_validate(config)
    if args.memory:
        memory_worker(model_spec, out, args.steps, rank)
        return
    from momkit.train import train

    train(model_spec, out, progress=False)
    (out / f"memory{rank}.json").write_text(json.dumps(torch.cuda.max_memory_allocated()))


def memory_worker(model_spec, out: Path, steps: int, rank: int) -> None:
    """``steps`` training steps of ``momkit train``'s trainer, then the peak memory, or the out-of-memory error
    (the rank then fails, which stops the others)."""
    from momkit.train import _device, _Ranks, _Trainer

    device = _device("cuda")
    ranks = _Ranks.start(device)
    try:
        trainer = _Trainer.build(model_spec, device, ranks)
        for step in range(steps):
            trainer.step(step, ranks)
    except torch.OutOfMemoryError:
        (out / f"memory{rank}.json").write_text(json.dumps(None))
        raise
    (out / f"memory{rank}.json").write_text(json.dumps(torch.cuda.max_memory_allocated()))
    ranks.stop()


def measure(args: argparse.Namespace, strategy: str, gpus: int, parallel: dict) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale-{strategy}-{gpus}-"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(gpus),
               "--master-port", str(29500 + gpus), __file__, "--worker", "--strategy", strategy, "--out", str(out),
               "--parallel", json.dumps(parallel)]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in SHARED]
    command += [f"--{flag}" for flag in ("profile", "memory") if getattr(args, flag)]
    finished = subprocess.run(command).returncode == 0
    memory = [json.loads(p.read_text()) for p in out.glob("memory*.json")]
    if args.memory and None in memory:
        return {"memory": None}
    if not finished:
        raise SystemExit(f"the {strategy} run on {gpus} GPUs failed")
    if args.memory:
        return {"memory": max(memory)}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["split"] == "train"]
    first, last = steps[args.warmup - 1 + (PROFILED + 1 if args.profile else 0)], steps[-1]
    profile = out / "profile.json"
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]),
            "memory": max(memory), "profile": json.loads(profile.read_text()) if profile.exists() else None}


def label(parallel: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in parallel.items()) or "defaults"


def scaling_table(args: argparse.Namespace, variants: list[dict]) -> None:
    rows = [("one", 1, {}), ("ddp", 2, {})] + [("fsdp", 2, v) for v in variants] + [("one", 1, {})]
    profiled = ["compute", "communication", "exposed communication", "idle"] if args.profile else []
    print("| strategy | options | GPUs | tokens/s | peak memory per GPU (GiB) |"
          + "".join(f" {key} (ms/step) |" for key in profiled))
    print("|---|---|---|---|---|" + "---|" * len(profiled), flush=True)
    results = []
    for strategy, gpus, parallel in rows:
        r = measure(args, "ddp" if strategy == "one" else strategy, gpus, parallel)
        results.append((strategy, parallel, r["tokens_per_s"], r["profile"]))
        print(f"| {'none' if strategy == 'one' else strategy} | {label(parallel)} | {gpus} | "
              f"{r['tokens_per_s']:,.0f} | {r['memory'] / 2**30:.2f} |"
              + "".join(f" {max(0.0, r['profile'][key]):.1f} |" for key in profiled), flush=True)
    if profiled:
        print(f"\nGPU time of rank 0 over {PROFILED} profiled steps, per step.")
    first, last = results[0][2], results[-1][2]
    one = (first + last) / 2
    print(f"\nOne GPU, run first and last: {first:,.0f} and {last:,.0f} tokens/s. Scaling on two GPUs over "
          f"their mean, {one:,.0f}:")
    for strategy, parallel, rate, _ in results[1:-1]:
        print(f"- {strategy} ({label(parallel)}): {rate / one:.2f}x")
    if profiled:
        differences([(f"fsdp ({label(parallel)})", profile["kernels"]) for _, parallel, _, profile in results[2:-1]],
                    results[1][3]["kernels"])


def memory_table(args: argparse.Namespace, variants: list[dict]) -> None:
    print("| strategy | options | GPUs | peak memory per GPU (GiB) |")
    print("|---|---|---|---|")
    for strategy, parallel in [("ddp", {})] + [("fsdp", v) for v in variants]:
        memory = measure(args, strategy, 2, parallel)["memory"]
        shown = "out of memory" if memory is None else f"{memory / 2**30:.2f}"
        print(f"| {strategy} | {label(parallel)} | 2 | {shown} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scan-backend", default="auto")
    parser.add_argument("--fsdp", action="append", type=options,
                        help="parallel options of a two-GPU FSDP2 row, key=value,...; repeatable (default: one "
                             "row with the defaults)")
    parser.add_argument("--profile", action="store_true", help="profile a few steps of every row")
    parser.add_argument("--memory", action="store_true", help="peak memory or out of memory, per strategy")
    args = parser.parse_args()
    if args.profile and args.warmup < 1:
        parser.error(f"--profile records the steps after the warm-up and needs --warmup of at least 1, not "
                     f"{args.warmup}")
    if args.worker:
        worker(args)
        return
    variants = args.fsdp or [{}]
    print(f"# momkit data-parallel {'memory' if args.memory else 'scaling'}\n\n"
          f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}"
          f"\n- torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
          f"\n- MoM Mamba, d_model {args.d_model}, {args.layers} layers, bf16 autocast, scan backend "
          f"{args.scan_backend}; global batch 2 x {args.batch_size} x {args.seq_len} tokens; {args.steps} steps, "
          f"the first {args.warmup} untimed\n", flush=True)
    (memory_table if args.memory else scaling_table)(args, variants)


if __name__ == "__main__":
    main()
