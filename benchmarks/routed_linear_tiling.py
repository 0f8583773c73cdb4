"""The measurements behind the Triton routed linear layer's forward defaults, for re-tuning on another GPU.

Run from the repository root on a machine with a CUDA GPU: ``python benchmarks/routed_linear_tiling.py``
(about a minute). Times are medians of ``triton.testing.do_bench`` (10 ms warm-up, 40 ms of repeats) of the
forward alone, bfloat16, two modalities; the defaults they set are ``Tiling.copy_rows``, ``Tiling.tma_rows``,
``FEW_ROWS_BLOCK_O`` and ``FEW_ROWS_BLOCK_K`` in ``kernels/triton/routed_linear.py``.

1. ``copy_rows`` and ``tma_rows``: the forward at 2048 -> 4096 for several token counts (modalities in runs of
   1024), its tiles loaded through pointers (``tma=False``) from a transposed copy of the weight made for the call
   (``copy_rows=0``) or from the weight in place, and through tensor descriptors at every token count
   (``tma_rows=0``, on a GPU with bulk tensor copies), launched directly (``launch.Launcher``) and through Triton's
   launcher, beside one dense ``F.linear`` of the same tokens. Where few tokens make the call's time the host's,
   the descriptors' columns show what building, encoding and launching them costs.
2. Few tokens (decoding): 1 and 16 tokens at the shapes of a d_model 1024 Mamba block's input and output
   projections, at the default tiling of many tokens (with and without the copy) and at 16-token tiles of each
   candidate output and reduction width; the fastest six, beside one dense ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gpu_scan import randn, runs_of
from triton.testing import do_bench

import momkit.kernels.triton.routed_linear as rl


def forward_us(fn) -> float:
    with torch.no_grad():
        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def copy_rows_table(gen):
    print("| tokens | copy (µs) | in place (µs) | tensor descriptors (µs) | descriptors, Triton's launcher (µs) | "
          "dense `F.linear` (µs) |\n|---|---|---|---|---|---|")
    weight, bias = randn(gen, 2, 4096, 2048, scale=2048 ** -0.5), randn(gen, 2, 4096)
    default = rl.default_tiling(torch.bfloat16)
    tilings = (rl.replace(default, tma=False, copy_rows=0), rl.replace(default, tma=False, copy_rows=2 ** 62),
               rl.replace(default, tma_rows=0))
    for n in (256, 1024, 4096, 16384, 65536):
        x, modality = randn(gen, n, 2048), runs_of(1, n, 1024).view(-1)
        times = [forward_us(lambda t=t: rl.routed_linear(x, weight, bias, modality, t)) for t in tilings]
        direct, rl._ROUTED_MM.direct = rl._ROUTED_MM.direct, False
        try:
            times.append(forward_us(lambda: rl.routed_linear(x, weight, bias, modality, tilings[-1])))
        finally:
            rl._ROUTED_MM.direct = direct
        print(f"| {n} | {' | '.join(f'{t:.1f}' for t in times)} | "
              f"{forward_us(lambda: F.linear(x, weight[0], bias[0])):.1f} |")


def few_rows_table(gen):
    print("\n| K → O | tokens | dense `F.linear` (µs) | many-token tiling, copy (µs) | fastest six (µs) |\n"
          "|---|---|---|---|---|")
    candidates = {"many-token tiling, in place": rl.Tiling(copy_rows=2 ** 62)}
    for block_o in (32, 64, 128):
        for block_k in (128, 256):
            candidates[f"o{block_o} k{block_k}"] = rl.replace(rl.Tiling(), block_n=16, block_o=block_o,
                                                              block_k=block_k, warps=4, stages=3)
    for k, o in ((1024, 4096), (2048, 1024)):
        weight, bias = randn(gen, 2, o, k, scale=k ** -0.5), randn(gen, 2, o)
        for n in (1, 16):
            x, modality = randn(gen, n, k), torch.arange(n, device="cuda") % 2
            copy = forward_us(lambda: rl.routed_linear(x, weight, bias, modality, rl.Tiling(copy_rows=0)))
            times = sorted((forward_us(lambda t=t: rl.routed_linear(x, weight, bias, modality, t)), name)
                           for name, t in candidates.items())
            best = ", ".join(f"{name} {us:.1f}" for us, name in times[:6])
            print(f"| {k} → {o} | {n} | {forward_us(lambda: F.linear(x, weight[0], bias[0])):.1f} | {copy:.1f} | "
                  f"{best} |")


def main():
    print(f"# routed linear forward tiling ({torch.cuda.get_device_name()}, torch {torch.__version__})\n")
    gen = torch.Generator(device="cuda").manual_seed(0)
    copy_rows_table(gen)
    few_rows_table(gen)


if __name__ == "__main__":
    main()
