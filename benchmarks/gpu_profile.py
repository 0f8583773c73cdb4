"""Hardware counters of the kernels behind ``benchmarks/gpu_scan.py``'s rows, read with Nsight Compute.

Run from the repository root on a machine with a CUDA GPU and ``ncu`` (Nsight Compute) on ``PATH``:
``python benchmarks/gpu_profile.py [--csv-dir DIR]``. The script runs itself under ``ncu`` once per
implementation, each time one forward and backward after a warm-up, and prints one table: a row per kernel
launched, with

- its duration (µs; ``ncu --clock-control none``, so at the clocks the benchmark runs at);
- registers per thread, and the theoretical and achieved occupancy (warps resident per multiprocessor, as a
  percentage of the 64 a Hopper multiprocessor holds);
- the DRAM bytes it read and wrote (MB) and its DRAM throughput as a percentage of the peak;
- the SM throughput, and the issue utilisation of the XU pipe (``exp2``, ``log2`` and the other special
  functions) and of the tensor pipe, as percentages of their peaks, where this ``ncu`` reports them.

Implementations (the shapes of ``gpu_scan.py``, bfloat16 inputs): ``selective_scan`` at 8 × 2048 × 2048 on the
``triton`` and ``cuda`` backends; ``ssd_scan`` at 8 × 8192 × 32 on both; the routed linear layer at 65,536 ×
2048 → 4096 (two modalities in runs of 1024) on ``triton``, and one dense ``F.linear`` of the same tokens. The
``cuda`` rows need mamba_ssm (``momkit[cuda]``) and are left out without it. ``--csv-dir`` keeps ``ncu``'s raw
CSV of each implementation there.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from gpu_scan import (SCAN_GRADS, SCAN_SHAPES, SSD_GRADS, SSD_SHAPES, fwd_bwd, routed_linear_inputs, scan_inputs,
                      ssd_inputs)

from momkit.registry import get_registry

IMPLEMENTATIONS = {
    "selective_scan/triton": ("selective_scan", "triton"), "selective_scan/cuda": ("selective_scan", "cuda"),
    "ssd_scan/triton": ("ssd_scan", "triton"), "ssd_scan/cuda": ("ssd_scan", "cuda"),
    "routed_linear/triton": ("routed_linear", "triton"), "routed_linear/dense": ("routed_linear", "dense"),
}
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "ComputeWorkloadAnalysis")
METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
SMALL_US = 20


def workload(op: str, impl: str):
    """The callable of one forward and backward of ``op`` on ``impl``, its inputs built."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    if op == "routed_linear":
        routed, dense, dout = routed_linear_inputs(gen)
        if impl == "dense":
            inputs, grads, fn = dense, ("input", "weight", "bias"), F.linear
        else:
            inputs, grads, fn = routed, ("x", "weight", "bias"), get_registry().scan_backends[impl].routed_linear
    else:
        make, shape, grads = ((scan_inputs, SCAN_SHAPES[0], SCAN_GRADS) if op == "selective_scan"
                              else (ssd_inputs, SSD_SHAPES[1], SSD_GRADS))
        inputs, fn = make(*shape, gen), getattr(get_registry().scan_backends[impl], op)
        with torch.no_grad():
            dout = torch.randn(fn(**inputs).shape, generator=gen, device="cuda").to(torch.bfloat16)
    return lambda: fwd_bwd(fn, inputs, grads, dout)


def profiled_run(name: str) -> None:
    """The child under ``ncu``: a warm-up, then one forward and backward between profiler start and stop."""
    step = workload(*IMPLEMENTATIONS[name])
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    step()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def read_raw(text: str) -> list[dict]:
    """The kernels of ``ncu --csv --page raw``'s output: a header row, a units row, a row per kernel."""
    start = text.find('"ID"')
    if start < 0:
        raise RuntimeError(f"ncu printed no kernel table:\n{text[-2000:]}")
    rows = list(csv.DictReader(io.StringIO(text[start:])))
    return rows[1:]


def number(row: dict, key: str) -> float | None:
    value = row.get(key, "").replace(",", "")
    try:
        return float(value)
    except ValueError:
        return None


def summary(name: str, row: dict) -> list[str]:
    def fmt(value, scale=1.0, digits=0):
        return "-" if value is None else f"{value * scale:.{digits}f}"

    read, write = number(row, "dram__bytes_read.sum"), number(row, "dram__bytes_write.sum")
    kernel = row["Kernel Name"].split("(")[0].split("<")[0].removeprefix("void ")[:48]
    return [name, f"`{kernel}`", fmt(number(row, "gpu__time_duration.sum"), 1e-3, 1),
            fmt(number(row, "launch__registers_per_thread")),
            fmt(number(row, "sm__maximum_warps_per_active_cycle_pct")),
            fmt(number(row, "sm__warps_active.avg.pct_of_peak_sustained_active")),
            fmt(None if read is None else read + write, 1e-6, 1),
            fmt(number(row, "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")),
            fmt(number(row, "sm__throughput.avg.pct_of_peak_sustained_elapsed")),
            fmt(number(row, "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active")),
            fmt(number(row, "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"))]


def duration_us(row: dict) -> float:
    return (number(row, "gpu__time_duration.sum") or 0.0) * 1e-3


def print_rows(name: str, rows: list[dict]) -> None:
    """A line per kernel of at least ``SMALL_US``, then one for the smaller kernels together."""
    for row in rows:
        if duration_us(row) >= SMALL_US:
            print("| " + " | ".join(summary(name, row)) + " |", flush=True)
    small = [duration_us(row) for row in rows if duration_us(row) < SMALL_US]
    if small:
        print(f"| {name} | {len(small)} kernels under {SMALL_US} µs each (PyTorch's element-wise and reduction "
              f"kernels, casts) | {sum(small):.1f} | | | | | | | | |", flush=True)


def profile(ncu: str, name: str) -> str:
    """``ncu``'s raw CSV of one forward and backward of implementation ``name``."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report")
        command = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
                   *[a for s in SECTIONS for a in ("--section", s)], "--metrics", ",".join(METRICS),
                   "-o", report, sys.executable, os.path.abspath(__file__), "--profiled", name]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"ncu failed on {name} (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return subprocess.run([ncu, "--import", report + ".ncu-rep", "--csv", "--page", "raw", "--print-units",
                               "base"], capture_output=True, text=True, check=True).stdout


def csv_name(name: str) -> str:
    return name.replace("/", "-") + ".csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv-dir", help="keep ncu's raw CSV of each implementation in this folder")
    parser.add_argument("--from-csv", metavar="DIR",
                        help="print the table from the CSV files an earlier run kept with --csv-dir, running nothing")
    parser.add_argument("--profiled", choices=sorted(IMPLEMENTATIONS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profiled:
        profiled_run(args.profiled)
        return
    if args.from_csv:
        names = [n for n in IMPLEMENTATIONS if os.path.exists(os.path.join(args.from_csv, csv_name(n)))]
        if not names:
            sys.exit(f"no CSV of gpu_profile.py in {args.from_csv!r}; expected files such as "
                     f"{[csv_name(n) for n in IMPLEMENTATIONS]}")
        title = f"from {args.from_csv}"
    else:
        ncu = shutil.which("ncu") or next((p for p in ("/usr/local/cuda/bin/ncu",) if os.path.exists(p)), None)
        if ncu is None or not torch.cuda.is_available():
            sys.exit("gpu_profile.py needs a CUDA GPU and Nsight Compute's ncu on PATH")
        names = [n for n in IMPLEMENTATIONS
                 if not n.endswith("/cuda") or get_registry().scan_backends["cuda"].is_available()]
        title = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    print(f"# momkit kernel profile ({title})\n")
    print("| implementation | kernel | µs | registers | occupancy % (theoretical) | achieved % | DRAM MB | "
          "DRAM % peak | SM % peak | XU pipe % | tensor pipe % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in names:
        if args.from_csv:
            with open(os.path.join(args.from_csv, csv_name(name))) as f:
                raw = f.read()
        else:
            raw = profile(ncu, name)
            if args.csv_dir:
                os.makedirs(args.csv_dir, exist_ok=True)
                with open(os.path.join(args.csv_dir, csv_name(name)), "w") as f:
                    f.write(raw)
        print_rows(name, read_raw(raw))


if __name__ == "__main__":
    main()
