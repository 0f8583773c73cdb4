"""Where the experts layer's time goes: wall time, GPU time and kernels per forward and backward pass.

Run from the repository root on a machine with a CUDA GPU: ``python benchmarks/experts_time.py``. The layers
are those of ``benchmarks/gpu_scan.py``'s experts row: an ``ffn`` layer at d_model 1024 whose ``w1``, ``w2`` and
``w3`` hold 8 experts (top 1, capacity factor 1.25), beside the dense ``ffn`` layer of the same active size, on
8 × 2048 float32 inputs under bfloat16 autocast with float32 parameters, each pass one forward and the gradients
of the input and every parameter. Per pass, after five passes of warm-up:

- wall time: the mean over 20 passes, synchronised at the end;
- host time: the mean time the same 20 passes took to launch, read before that synchronisation;
- GPU time: the sum of the kernels' times over 10 passes under ``torch.profiler``, divided by 10;
- kernels: how many kernels one pass launches.

When the host time exceeds the GPU time, the host (Python, the launches) sets the pace, not the device, and the
wall time is about the host time.
"""

from __future__ import annotations

import time

import torch
from gpu_scan import layer_spec, randn, runs_of
from torch.profiler import ProfilerActivity, profile

from momkit import build_block

EXPERTS = {"sublayers": ["w1", "w2", "w3"], "n_experts": 8, "top_k": 1, "capacity_factor": 1.25}


def main():
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = randn(gen, 8, 2048, 1024, dtype=torch.float32)
    modality = runs_of(8, 2048, 1024)
    dout = randn(gen, 8, 2048, 1024, dtype=torch.float32)
    print(f"# experts layer time per pass ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    print("| layer | wall (ms) | host (ms) | GPU (ms) | kernels |\n|---|---|---|---|---|")
    for name, routing in (("dense `ffn`", {"specific": "dense"}),
                          ("experts `ffn` (8, top 1)", {"specific": "dense", "experts": EXPERTS})):
        block = build_block(layer_spec({"kind": "ffn"}, routing)).cuda()

        def step():
            leaf = x.detach().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = block(leaf, modality)
            torch.autograd.grad(y, [leaf, *block.parameters()], dout)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            step()
        host = (time.perf_counter() - start) / 20 * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / 20 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        gpu = sum(e.device_time for e in kernels) / 10 / 1e3
        print(f"| {name} | {wall:.3f} | {host:.3f} | {gpu:.3f} | {len(kernels) / 10:.0f} |", flush=True)


if __name__ == "__main__":
    main()
