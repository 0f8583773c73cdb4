"""torch.compile against eager, side by side in one run: one layer's forward and backward.

Run from the repository root: ``python benchmarks/compile.py`` (the GPU when there is one, else the CPU;
``--device cpu`` forces the CPU). Layers: a Mixture-of-Mamba layer (``mamba``, preset ``mom``), a
Mixture-of-Mamba-2 layer (``mamba2``, preset ``mom``), a Mixture-of-Transformers layer (``transformer``,
preset ``mot``), and the dense and experts ``ffn`` layers of ``benchmarks/gpu_scan.py``'s experts row (``w1``,
``w2``, ``w3`` with 8 experts, top 1, capacity factor 1.25); two modalities in runs of half the length; on the
GPU batch 8 x 2048 at d_model 1024 in bfloat16 autocast on the ``triton`` backend, on the CPU batch 2 x 512 at
d_model 128 in float32 on ``reference``. Compiled is ``torch.compile(block)`` with the default (inductor)
backend; the kernel front doors are opaque operators inside its graph (:mod:`momkit.ops.library`), so the
compiler fuses the work around them. Times: median of repeated fwd+bwd (forward, then ``torch.autograd.grad``
of every input and parameter with a fixed output gradient), after a warm-up that includes compiling.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from contextlib import nullcontext

import torch

from momkit import build_block

EXPERTS = {"sublayers": ["w1", "w2", "w3"], "n_experts": 8, "top_k": 1, "capacity_factor": 1.25}
LAYERS = {
    "MoM (`mamba`, `mom`)": ({"kind": "mamba", "d_state": 16}, {"specific": "mom"}),
    "MoM-2 (`mamba2`, `mom`)": ({"kind": "mamba2"}, {"specific": "mom"}),
    "MoT (`transformer`, `mot`)": ({"kind": "transformer", "n_heads": 8}, {"specific": "mot"}),
    "dense `ffn`": ({"kind": "ffn"}, {"specific": "dense"}),
    "experts `ffn` (8, top 1, capacity 1.25)": ({"kind": "ffn"}, {"specific": "dense", "experts": EXPERTS}),
}


def median_ms(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    gpu = device.type == "cuda"
    batch, length, d = (8, 2048, 1024) if gpu else (2, 512, 128)
    backend, repeats = ("triton", 20) if gpu else ("reference", 5)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else nullcontext
    print(f"# torch.compile against eager\n\n- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- device: {torch.cuda.get_device_name() if gpu else 'CPU'}; torch {torch.__version__}; "
          f"batch {batch} x {length}, d_model {d}, backend {backend}\n")
    print("| layer | eager fwd+bwd (ms) | compiled fwd+bwd (ms) | compiled / eager | output rel. diff |")
    print("|---|---|---|---|---|")
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, length, d, generator=gen, device=device)
    modality = (torch.arange(length, device=device) // (length // 2) % 2).repeat(batch, 1)
    dout = torch.randn(batch, length, d, generator=gen, device=device)
    for name, (backbone, routing) in LAYERS.items():
        torch.manual_seed(0)
        block = build_block({"modalities": ["text", "image"], "backbone": {**backbone, "d_model": d},
                             "routing": routing, "scan_backend": backend}).to(device)
        compiled = torch.compile(block)
        outputs = {}

        def step(run, key):
            leaf = x.detach().requires_grad_(True)
            with autocast():
                y = run(leaf, modality)
            torch.autograd.grad(y, [leaf, *block.parameters()], dout)
            outputs[key] = y.detach().float()

        for run, key in ((block, "eager"), (compiled, "compiled")):
            for _ in range(2):
                step(run, key)
        eager = median_ms(lambda: step(block, "eager"), device, repeats)
        fast = median_ms(lambda: step(compiled, "compiled"), device, repeats)
        diff = float((outputs["compiled"] - outputs["eager"]).norm() / outputs["eager"].norm())
        print(f"| {name} | {eager:.2f} | {fast:.2f} | {fast / eager:.2f} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
