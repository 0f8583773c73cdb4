"""CPU benchmark of momkit's reference scans against pure-PyTorch peers, fp32.

Run from the repository root: ``python benchmarks/cpu_scan.py`` (a few minutes on two cores), or with
``--quick`` for small shapes that only check that everything runs.

What runs:

- ``selective_scan`` (Mamba-1), b 1, d 1536, n 16, with ``D``, ``z``, ``delta_bias`` and
  ``delta_softplus=True``, at lengths 1024 and 4096:
  momkit's reference backend ``momkit.kernels.reference.selective_scan.selective_scan``; the peer mambapy
  (``mambapy.pscan.pscan``, a Blelloch parallel scan over ``(b, l, d, n)`` tensors), wrapped here with the
  same semantics (``delta = softplus(delta + delta_bias)``, ``y = hs C + D u``, ``out = y silu(z)``) and
  given its inputs already in its own ``(b, l, d)`` layout; and, forward only under ``torch.no_grad`` at
  length 1024, the per-token loop ``naive_selective_scan``.
- ``ssd_scan`` (Mamba-2), b 1, 24 heads of 64, 1 group, chunk 64, at (length 2048, n 64) and
  (length 4096, n 128): momkit's ``momkit.kernels.reference.ssd.ssd_scan`` against the baseline, the
  minimal chunked SSD listing of the Mamba-2 paper (Dao & Gu 2024, "Transformers are SSMs", the
  ``ssd_minimal_discrete`` listing with ``segsum``), written out below. The listing only takes
  ``X = x dt``, ``A dt`` and per-head ``B``, ``C``, with no ``D``, ``z``, ``dt_bias`` or softplus, so both are
  timed on that feature set from the same leaf tensors ``x, dt, A, B, C`` (the baseline's ``x dt``,
  ``dt A`` and the broadcast of ``B``, ``C`` over heads are part of its timed call) and both return the
  final state, which enters the loss. One more momkit row, with ``D``, ``z``, ``dt_bias``, softplus and an
  initial state, shows what the full feature set costs; it has no baseline counterpart.

How it is measured:

- time: wall clock, best of 3 calls after one warm-up call. *forward* runs under ``torch.no_grad`` (what
  inference runs); *fwd+bwd* is the forward with autograd plus ``torch.autograd.grad`` of a fixed random
  linear function of every output with respect to every floating-point input.
- peak memory: the most bytes of tensors that PyTorch's CPU allocator holds at once during one call, above
  what was live when the call started, replayed from the allocation and free events that
  ``torch.profiler`` records with ``profile_memory=True`` (one separate profiled call, so profiling does
  not slow the timed ones). It counts every tensor the call allocates, autograd's saved tensors and
  gradients included, and nothing else: not the inputs, not allocator slack, BLAS workspaces or Python
  objects.
- agreement: the largest difference of each implementation's forward output from momkit's, relative to
  the largest entry of momkit's, so that the rows compare equal work.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from mambapy.pscan import pscan
from torch.profiler import ProfilerActivity, profile

from momkit.kernels.reference.naive import naive_selective_scan
from momkit.kernels.reference.selective_scan import selective_scan
from momkit.kernels.reference.ssd import ssd_scan

HEADER = ("| shape | implementation | forward (ms) | fwd+bwd (ms) | peak fwd (MiB) | peak fwd+bwd (MiB) "
          "| max rel. diff |")
RATIO_HEADER = "| shape | peer | time peer / momkit, fwd | fwd+bwd | peak momkit / peer, fwd | fwd+bwd |"
REPEATS = 3


def segsum(x):
    """The paper's segment sum: ``exp(segsum(a))`` is the ``T x T`` decay matrix of a scalar SSM."""
    T = x.size(-1)
    x_cumsum = torch.cumsum(x, dim=-1)
    x_segsum = x_cumsum[..., :, None] - x_cumsum[..., None, :]
    mask = torch.tril(torch.ones(T, T, device=x.device, dtype=bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """The minimal chunked SSD listing of the Mamba-2 paper.

    ``X: (b, l, h, p)``, ``A: (b, l, h)``, ``B, C: (b, l, h, n)``; returns ``Y (b, l, h, p)`` and the final
    state ``(b, h, p, n)``.
    """
    X, A, B, C = [rearrange(x, "b (c l) ... -> b c l ...", l=block_len) for x in (X, A, B, C)]
    A = rearrange(A, "b c l h -> b h c l")
    A_cumsum = torch.cumsum(A, dim=-1)
    # 1. intra-chunk output (diagonal blocks)
    L = torch.exp(segsum(A))
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, L, X)
    # 2. state of each chunk
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_states, X)
    # 3. inter-chunk recurrence
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output per chunk
    state_decay_out = torch.exp(A_cumsum)
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, state_decay_out)
    return rearrange(Y_diag + Y_off, "b c l h p -> b (c l) h p"), final_state


def mambapy_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Selective scan through ``mambapy.pscan``, in mambapy's layout: ``u, delta, z: (b, l, d)``,
    ``B, C: (b, l, n)``; ``delta_softplus`` always on."""
    delta = F.softplus(delta + delta_bias)
    hs = pscan(torch.exp(delta[..., None] * A), (delta * u)[..., None] * B[:, :, None])
    y = (hs @ C[..., None]).squeeze(-1) + D * u
    return y * F.silu(z)


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2, where the profiler's C++ side logs every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Case:
    """One implementation at one shape: ``leaves`` (the tensors gradients are taken for) and ``call``,
    which returns a tuple of output tensors; ``backward``: also time the backward pass; ``same_inputs``:
    computes what the shape's first case computes, so their outputs are compared."""

    def __init__(self, name, leaves, call, backward=True, same_inputs=True):
        self.name, self.leaves, self.call = name, leaves, call
        self.backward, self.same_inputs = backward, same_inputs
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            self.weights = [torch.randn(o.shape, generator=gen) for o in call()]

    def run(self, backward):
        if not backward:
            with torch.no_grad():
                return self.call()
        loss = sum((o * w).sum() for o, w in zip(self.call(), self.weights))
        return torch.autograd.grad(loss, self.leaves)

    def seconds(self, backward):
        self.run(backward)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            self.run(backward)
            times.append(time.perf_counter() - start)
        return min(times)

    def peak_bytes(self, backward):
        with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.run(backward)
        events = sorted(((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                         if e.name() == "[memory]"), key=lambda e: e[0])
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak

    def measure(self):
        modes = (False, True) if self.backward else (False,)
        return {mode: (self.seconds(mode), self.peak_bytes(mode)) for mode in modes}


def leaf(t):
    return t.contiguous().requires_grad_(True)


def selective_cases(length, dim, state, naive):
    torch.manual_seed(0)
    u, delta, z = torch.randn(1, dim, length), 0.5 * torch.randn(1, dim, length) - 1.0, torch.randn(1, dim, length)
    A = -torch.exp(0.5 * torch.randn(dim, state))
    B, C = torch.randn(1, state, length), torch.randn(1, state, length)
    D, bias = torch.randn(dim), 0.3 * torch.randn(dim)

    mk = [leaf(t) for t in (u, delta, A, B, C, D, z, bias)]

    def momkit_call():
        u_, delta_, A_, B_, C_, D_, z_, bias_ = mk
        return (selective_scan(u=u_, delta=delta_, A=A_, B=B_, C=C_, D=D_, z=z_, delta_bias=bias_,
                               delta_softplus=True, return_last_state=False, modality=None),)

    peer = [leaf(t) for t in (u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2),
                              D, z.transpose(1, 2), bias)]

    def mambapy_call():
        return (mambapy_selective_scan(*peer).transpose(1, 2),)

    cases = [Case("momkit reference", mk, momkit_call), Case("mambapy pscan", peer, mambapy_call)]
    if naive:
        def naive_call():
            return (naive_selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True),)

        cases.append(Case("per-token loop (naive)", [], naive_call, backward=False))
    return cases


def ssd_cases(length, heads, headdim, state, chunk):
    torch.manual_seed(0)
    x = torch.randn(1, length, heads, headdim)
    dt_raw = 0.5 * torch.randn(1, length, heads) - 1.0
    A = -torch.exp(0.5 * torch.randn(heads))
    B, C = torch.randn(1, length, 1, state), torch.randn(1, length, 1, state)

    mk = [leaf(t) for t in (x, F.softplus(dt_raw), A, B, C)]

    def momkit_call():
        x_, dt_, A_, B_, C_ = mk
        return ssd_scan(x=x_, dt=dt_, A=A_, B=B_, C=C_, chunk_size=chunk, D=None, z=None, dt_bias=None,
                        initial_states=None, seq_idx=None, dt_softplus=False, return_final_states=True,
                        modality=None)

    base = [leaf(t) for t in (x, F.softplus(dt_raw), A, B, C)]

    def minimal_call():
        x_, dt_, A_, B_, C_ = base
        per_head = (1, length, heads, state)
        return ssd_minimal_discrete(x_ * dt_[..., None], dt_ * A_, B_.expand(per_head), C_.expand(per_head), chunk)

    full = [leaf(t) for t in (x, dt_raw, A, B, C, torch.randn(heads), torch.randn(1, length, heads, headdim),
                              0.3 * torch.randn(heads), torch.randn(1, heads, headdim, state))]

    def full_call():
        x_, dt_, A_, B_, C_, D_, z_, bias_, s0_ = full
        return ssd_scan(x=x_, dt=dt_, A=A_, B=B_, C=C_, chunk_size=chunk, D=D_, z=z_, dt_bias=bias_,
                        initial_states=s0_, seq_idx=None, dt_softplus=True, return_final_states=True,
                        modality=None)

    return [Case("momkit ssd_scan", mk, momkit_call), Case("minimal SSD (paper listing)", base, minimal_call),
            Case("momkit ssd_scan, all features", full, full_call, same_inputs=False)]


def rel_diff(case, reference):
    with torch.no_grad():
        out, ref = case.call()[0], reference.call()[0]
    return ((out - ref).abs().max() / ref.abs().max()).item()


def table(title, shapes, build, comparable):
    """Measure every case of every shape; print one results table and one ratio table."""
    print(f"\n### {title}\n")
    print(HEADER)
    print("|" + "---|" * HEADER.count(" |"))
    ratios = []
    for label, args in shapes:
        cases = build(*args)
        results = {case.name: case.measure() for case in cases}
        for case in cases:
            res = results[case.name]
            cells = [f"{res[m][0] * 1e3:.1f}" if m in res else "-" for m in (False, True)]
            cells += [f"{res[m][1] / 2**20:.1f}" if m in res else "-" for m in (False, True)]
            if case is cases[0]:
                diff = "0 (reference)"
            else:
                diff = f"{rel_diff(case, cases[0]):.1e}" if case.same_inputs else "- (other inputs)"
            print(f"| {label} | {case.name} | " + " | ".join(cells) + f" | {diff} |")
        mk = results[cases[0].name]
        for case in cases[1:]:
            if case.name in comparable:
                peer = results[case.name]
                ratios.append(f"| {label} | {case.name} | "
                              + " | ".join(f"{peer[m][0] / mk[m][0]:.2f}x" for m in (False, True)) + " | "
                              + " | ".join(f"{mk[m][1] / peer[m][1]:.2f}" for m in (False, True)) + " |")
    print(f"\n{RATIO_HEADER}\n|" + "---|" * RATIO_HEADER.count(" |"))
    print("\n".join(ratios))


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, to check that the script runs")
    quick = parser.parse_args().quick

    print(f"# momkit CPU scan benchmark{' (--quick shapes)' if quick else ''}\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}")
    print(f"- fp32; time: best of {REPEATS} after one warm-up; peak: tensor bytes held at once during one call "
          "above those live at its start (torch.profiler memory events); max rel. diff: forward output "
          "against the first row of its shape")

    dim, state = (64, 8) if quick else (1536, 16)
    lengths = (64, 128) if quick else (1024, 4096)
    table(f"selective_scan (Mamba-1): b 1, d {dim}, n {state}, D, z, delta_bias, delta_softplus",
          [(f"l {length}", (length, dim, state, length == lengths[0])) for length in lengths],
          selective_cases, comparable={"mambapy pscan"})

    heads, headdim, chunk = (4, 16, 32) if quick else (24, 64, 64)
    shapes = ((128, 16), (256, 32)) if quick else ((2048, 64), (4096, 128))
    table(f"ssd_scan (Mamba-2): b 1, {heads} heads of {headdim}, 1 group, chunk {chunk}; "
          "momkit and the minimal SSD both on x, dt, A, B, C (the listing's features: no D, z, dt_bias, "
          "softplus), both returning the final state",
          [(f"l {length}, n {n}", (length, heads, headdim, n, chunk)) for length, n in shapes],
          ssd_cases, comparable={"minimal SSD (paper listing)"})


if __name__ == "__main__":
    main()
