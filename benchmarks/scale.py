"""Data-parallel scaling of ``momkit train`` on the GPUs of one host: DDP and FSDP2 on 1 and 2 GPUs.

Run from the repository root on a machine with two GPUs: ``python benchmarks/scale.py``. For each strategy
and GPU count it launches ``torchrun --nproc-per-node N`` on this same script in worker mode, which trains a
Mixture-of-Mamba model (bf16 autocast, the same global batch whatever N: ``grad_accum`` micro-batches shared
by the ranks) on the ``synthetic`` dataset, then prints one table:

- tokens/s: training tokens over the wall-clock time between the end of step ``--warmup`` and the last step,
  read from the run's ``metrics.jsonl`` (evaluation and checkpoint time excluded: both happen at the end);
- scaling: tokens/s on N GPUs over tokens/s on 1 GPU with the same strategy;
- peak memory: the largest ``torch.cuda.max_memory_allocated()`` over the ranks.
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


def spec(args: argparse.Namespace, strategy: str) -> dict:
    return {
        "name": f"scale-{strategy}",
        "modalities": ["text", {"kind": "image", "vocab_size": 1024}],
        "backbone": {"kind": "mamba", "d_model": args.d_model, "n_layers": args.layers, "d_state": 16},
        "routing": {"specific": "mom"},
        "scan_backend": args.scan_backend,
        "parallel": {"strategy": strategy},
        "data": {"kind": "synthetic", "seed": 0},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": 2, "seq_len": args.seq_len,
                  "eval_every": args.steps, "eval_batches": 2, "checkpoint_every": args.steps,
                  "warmup_steps": 2},
    }


def worker(args: argparse.Namespace) -> None:
    from momkit.spec import ModelSpec
    from momkit.train import train

    out = Path(args.out)
    train(ModelSpec.model_validate(spec(args, args.strategy)), out, progress=False)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"memory{rank}.json").write_text(json.dumps(torch.cuda.max_memory_allocated()))


def measure(args: argparse.Namespace, strategy: str, gpus: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"scale-{strategy}-{gpus}-"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(gpus),
               "--master-port", str(29500 + gpus), __file__, "--worker", "--strategy", strategy, "--out", str(out)]
    command += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("steps", "warmup", "batch_size", "seq_len", "d_model", "layers", "scan_backend")]
    subprocess.run(command, check=True)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["split"] == "train"]
    first, last = steps[args.warmup - 1], steps[-1]
    memory = max(json.loads(p.read_text()) for p in out.glob("memory*.json"))
    return {"tokens_per_s": (last["tokens"] - first["tokens"]) / (last["time"] - first["time"]), "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--scan-backend", default="auto")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"# momkit data-parallel scaling\n\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}"
          f"\n- torch {torch.__version__}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
          f"\n- MoM Mamba, d_model {args.d_model}, {args.layers} layers, bf16 autocast, scan backend "
          f"{args.scan_backend}; global batch 2 x {args.batch_size} x {args.seq_len} tokens; {args.steps} steps, "
          f"the first {args.warmup} untimed\n")
    rows = {(s, g): measure(args, s, g) for s in ("ddp", "fsdp") for g in (1, 2)}
    print("| strategy | GPUs | tokens/s | scaling vs 1 GPU | peak memory per GPU (GiB) |")
    print("|---|---|---|---|---|")
    for (strategy, gpus), r in rows.items():
        scaling = r["tokens_per_s"] / rows[(strategy, 1)]["tokens_per_s"]
        print(f"| {strategy} | {gpus} | {r['tokens_per_s']:,.0f} | {scaling:.2f}x | {r['memory'] / 2**30:.2f} |")
    ratio = rows[("fsdp", 2)]["memory"] / rows[("ddp", 2)]["memory"]
    print(f"\nFSDP2 / DDP peak memory per GPU on 2 GPUs: {ratio:.2f}")


if __name__ == "__main__":
    main()
