"""GPU benchmark of the Triton selective scan (Mamba-1) at the shapes of ``shared/BENCHMARKS.md``.

Run from the repository root on a machine with a CUDA GPU: ``python benchmarks/gpu_scan.py``; add
``--sweep`` to time every tiling of :data:`SWEEP` first (for choosing ``default_tiling``).

What runs, per shape ``b x d x l`` (n = 16; ``u, delta, z, B, C`` bfloat16 and ``A, D, delta_bias`` float32;
``delta_softplus``; ``z`` given), all through ``momkit.kernels.triton.selective_scan``:

- forward: no autograd; fwd+bwd: the forward with every input requiring a gradient, then
  ``torch.autograd.grad`` of the output with a fixed random output gradient. Each time is the median of
  ``triton.testing.do_bench`` (25 ms warm-up, 100 ms of repeats), as in BENCHMARKS.md.
- bytes moved per second, counted as BENCHMARKS.md counts them: ``u, delta, z, out`` as ``(b, d, l)`` and
  ``B, C`` as ``(b, n, l)``, bfloat16, each once, over the forward time.
- the ratio of each time to mamba_ssm 2.3.2's ``selective_scan_fn`` (its CUDA kernel) as BENCHMARKS.md
  gives it. Those figures were measured on an NVIDIA H200 on 2026-11-22, not in this run (mamba_ssm cannot be
  built here in the time); the device of this run is printed above the table.
- the floor of the forward (METHOD.md's two numbers): the larger of the bytes over the 4.27 TB/s copy rate
  BENCHMARKS.md measured and one ``exp`` per state update at 16 per multiprocessor per clock at 1.98 GHz.

Below the table: the reference backend's forward at the first shape; the relative error
``|x - ref| / |ref|`` of the output and of every gradient at the first shape against the reference backend
run in float64 on the same bfloat16-rounded inputs; and whether every output and gradient is finite at
length 65536.
"""

from __future__ import annotations

import argparse
import datetime

import torch
import triton
from triton.testing import do_bench

from momkit.kernels.reference.selective_scan import selective_scan as reference_scan
from momkit.kernels.triton.selective_scan import Tiling, default_tiling
from momkit.kernels.triton.selective_scan import selective_scan as triton_scan

STATE = 16
SHAPES = [(8, 2048, 2048), (8, 2048, 8192), (1, 4096, 65536)]
MAMBA_SSM_H200_MS = {(8, 2048, 2048): (0.590, 3.04), (8, 2048, 8192): (2.52, 12.3), (1, 4096, 65536): (5.85, 26.9)}
COPY_BYTES_PER_S = 4.27e12
EXP_PER_S = 16 * 132 * 1.98e9
GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SWEEP = [Tiling(256, 4, 1, 4, 1, 2, 1), Tiling(256, 4, 1, 4, 1, 2, 2), Tiling(128, 4, 1, 2, 1, 4, 2),
         Tiling(128, 4, 2, 2, 1, 4, 1), Tiling(256, 4, 2, 4, 2, 2, 2), Tiling(256, 4, 4, 4, 4, 2, 1),
         Tiling(64, 8, 4, 2, 1, 2, 1), Tiling(256, 2, 1, 2, 1, 4, 2), Tiling(128, 8, 4, 4, 1, 2, 1),
         Tiling(256, 8, 2, 8, 1, 2, 2)]


def make_inputs(batch, dim, length, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda").to(dtype)

    delta = 0.5 * randn(batch, dim, length, dtype=torch.float32) - 1.0
    return dict(u=randn(batch, dim, length), delta=delta.bfloat16(), A=-torch.exp(0.5 * randn(dim, STATE)).float(),
                B=randn(batch, STATE, length), C=randn(batch, STATE, length), D=randn(dim, dtype=torch.float32),
                z=randn(batch, dim, length), delta_bias=0.3 * randn(dim, dtype=torch.float32),
                delta_softplus=True, modality=None, seq_idx=None)


def forward(scan, inputs, **extra):
    with torch.no_grad():
        return scan(**inputs, return_last_state=False, **extra)


def forward_backward(scan, inputs, dout, **extra):
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in GRADS}
    out = scan(**{**inputs, **leaves}, return_last_state=False, **extra)
    return out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout)))


def median_ms(fn, **kwargs):
    return do_bench(fn, warmup=25, rep=100, return_mode="median", **kwargs)


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def sweep():
    print("| b × d × l | tiling | forward (ms) | fwd+bwd (ms) |\n|---|---|---|---|")
    for shape in SHAPES:
        inputs = make_inputs(*shape)
        dout = torch.randn_like(inputs["u"])
        for tiling in SWEEP:
            fwd = median_ms(lambda: forward(triton_scan, inputs, tiling=tiling))
            both = median_ms(lambda: forward_backward(triton_scan, inputs, dout, tiling=tiling))
            print(f"| {' × '.join(map(str, shape))} | {tiling} | {fwd:.3f} | {both:.3f} |", flush=True)
        del inputs, dout
        torch.cuda.empty_cache()
    print()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time every tiling of SWEEP first")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print("# momkit GPU selective-scan benchmark\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- device: {props.name}, {props.multi_processor_count} multiprocessors; torch {torch.__version__}, "
          f"Triton {triton.__version__}")
    print("- mamba_ssm columns: this run's time over mamba_ssm 2.3.2's `selective_scan_fn` as measured on an "
          "NVIDIA H200 (BENCHMARKS.md, 2026-11-22), not in this run\n")
    if args.sweep:
        sweep()
    rows, notes = [], []
    for shape in SHAPES:
        batch, dim, length = shape
        inputs = make_inputs(*shape)
        dout = torch.randn_like(inputs["u"])
        tiling = default_tiling(dim, length)
        fwd = median_ms(lambda: forward(triton_scan, inputs))
        both = median_ms(lambda: forward_backward(triton_scan, inputs, dout))
        nbytes = 2 * (4 * batch * dim * length + 2 * batch * STATE * length)
        floor = max(nbytes / COPY_BYTES_PER_S, batch * dim * length * STATE / EXP_PER_S) * 1e3
        peer_fwd, peer_both = MAMBA_SSM_H200_MS[shape]
        rows.append(f"| {' × '.join(map(str, shape))} | {fwd:.3f} | {both:.3f} | {nbytes / fwd / 1e9:.2f} | "
                    f"{fwd / floor:.1f}× | {fwd / peer_fwd:.2f} | {both / peer_both:.2f} | {tiling.chunk}, "
                    f"{tiling.block_d}/{tiling.block_d_bwd}, {tiling.warps}/{tiling.warps_bwd}, "
                    f"{tiling.unroll}/{tiling.unroll_bwd} |")
        if shape == SHAPES[0]:
            ref_fwd = do_bench(lambda: forward(reference_scan, inputs), warmup=1, rep=1, return_mode="median")
            notes.append(f"- reference backend (chunked PyTorch, float32 arithmetic) forward at "
                         f"{' × '.join(map(str, shape))}: {ref_fwd:.1f} ms ({ref_fwd / fwd:.0f}× the Triton "
                         f"forward)")
            out, grads = forward_backward(triton_scan, inputs, dout)
            wide = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
            ref_out, ref_grads = forward_backward(reference_scan, wide, dout.double())
            errors = ", ".join(f"d{k} {rel(grads[k], ref_grads[k]):.1e}" for k in GRADS)
            notes.append(f"- relative error against float64 at {' × '.join(map(str, shape))}: out "
                         f"{rel(out, ref_out):.1e}, {errors}")
            del out, grads, wide, ref_out, ref_grads
        if length == 65536:
            out, grads = forward_backward(triton_scan, inputs, dout)
            finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads.values())
            notes.append(f"- no NaN or inf at length 65536 ({' × '.join(map(str, shape))}), output and every "
                         f"gradient: {'yes' if finite else 'NO'}")
            del out, grads
        del inputs, dout
        torch.cuda.empty_cache()
    print("| b × d × l | forward (ms) | fwd+bwd (ms) | fwd bytes / time (TB/s) | fwd / floor "
          "| fwd / mamba_ssm (H200) | fwd+bwd / mamba_ssm (H200) | chunk, channels, warps, unroll (fwd/bwd) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
