"""GPU benchmark of the Triton backend against its peers, measured side by side in one run.

Run from the repository root on a machine with a CUDA GPU: ``python benchmarks/gpu_scan.py`` (about three
minutes on an H200). Where mamba_ssm is installed (``momkit[cuda]``), its kernels, called through momkit's
``cuda`` backend, are the peer of both scans in the same run; elsewhere the peer columns quote the H200
figures of BENCHMARKS.md (2026-11-22), marked "(quoted)".

One table, a row per operation and shape; times are medians of ``triton.testing.do_bench`` (25 ms warm-up,
100 ms of repeats) of each backend's callable, called directly (no front-door checks in the timing):

- ``selective_scan`` (Mamba-1) at ``b x d x l``, n = 16; ``u, delta, z, B, C`` bfloat16, ``A, D,
  delta_bias`` float32, ``delta_softplus``; peer: mamba_ssm's ``selective_scan_fn`` (CUDA).
- ``ssd_scan`` (Mamba-2) at ``b x l x h``, chunk 256, one group, n = 128, p = 64; ``x, dt, B, C`` bfloat16,
  ``A, D, dt_bias`` float32, ``dt_softplus``; peer: mamba_ssm's ``mamba_chunk_scan_combined`` (Triton).
- below the table, ``ssd_scan``'s forward against fla's ``chunk_simple_gla`` (fla-core, where installed:
  ``device_setup.sh peers fla``), which computes the same recurrence with a scalar decay per head: ``q = C`` and
  ``k = B`` (the one group expanded to every head, a view), ``v = dt x``, ``g = dt A``, scale 1, plus ``D x``
  outside it. fla's kernel is timed on those prepared inputs, and again with the preparation (``softplus(dt +
  dt_bias)``, ``dt x``, ``dt A``) in PyTorch, as a model calling it would run it; its output with ``D x`` is
  compared with ``ssd_scan``'s. fla's gated backward is not run: on Hopper with Triton 3.4 to 3.7 it is refused
  (BENCHMARKS.md).
- routed linear: 65,536 tokens, 2048 -> 4096, bfloat16, 2 modalities in runs of 1024; peer: one dense
  ``F.linear`` of all tokens (the floor: routing adds no FLOPs).
- a Mixture-of-Mamba layer (``mamba`` backbone, preset ``mom``) against the dense Mamba layer of the same
  shape: batch 8, length 2048, d_model 1024, bfloat16 autocast as in training, two modalities in runs of
  1024; both on the ``triton`` backend.
- an experts layer (``ffn`` backbone, ``w1``, ``w2``, ``w3`` with 8 experts, top 1, capacity factor 1.25, in
  training mode) against the dense ``ffn`` layer of the same active size, same shape and settings. Both are
  also timed as replays of a CUDA graph of the step (``triton.testing.do_bench_cudagraph``, median), a note
  below the table: the table's times are eager, so a host slower than the GPU sets them, while a replay runs
  the same kernels without the host.
- MoM layers (``mamba`` and ``mamba2``) over rows packing documents of 512 positions (``seq_idx``, as every
  packed training batch has) against the same layers over one document per row.
- MoM layers (``mamba`` and ``mamba2``) with the image modality bidirectional (a backward scan over each span
  of 1024 image tokens, half the tokens) against the causal MoM layer, same shape and settings.

``--only`` runs some parts: ``scans``, ``routed_linear``, ``layers`` (the MoM, experts, packed and
bidirectional layer rows), ``decode``.

Columns: forward and forward+backward (fwd+bwd: every input requiring a gradient, then
``torch.autograd.grad`` of the output with a fixed random output gradient); the reference backend's forward
(``-`` where it has no such row); forward bytes over forward time, each input and output counted once; the
peer's times and momkit's time over the peer's. Below it: relative errors against float64 at the first shape of
each scan, finiteness at length 65,536, and decoding speed (24-layer d_model 1024 MoM and dense models,
batch 1: ``Model.generate`` with its step in one CUDA graph, the default on a GPU, and eager; mamba_ssm's dense
``MambaLMHeadModel.generate`` with and without CUDA graphs where it is installed, with the vocabulary of its
language models, and each rate over the peer's in the same mode: eager rates depend on the host's speed, so only
the ratio compares across machines).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from momkit import Batch, build_block, build_model
from momkit.registry import get_registry

SCAN_SHAPES = [(8, 2048, 2048), (8, 2048, 8192), (1, 4096, 65536)]
SSD_SHAPES = [(8, 2048, 32), (8, 8192, 32), (1, 65536, 64)]
QUOTED = {  # BENCHMARKS.md, H200, 2026-11-22: (forward ms, fwd+bwd ms)
    ("selective_scan", (8, 2048, 2048)): (0.590, 3.04), ("selective_scan", (8, 2048, 8192)): (2.52, 12.3),
    ("selective_scan", (1, 4096, 65536)): (5.85, 26.9), ("ssd_scan", (8, 2048, 32)): (0.464, 3.84),
    ("ssd_scan", (8, 8192, 32)): (1.24, 5.46), ("ssd_scan", (1, 65536, 64)): (2.53, 10.6),
}
SCAN_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SSD_GRADS = ("x", "dt", "A", "B", "C", "D", "dt_bias")


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def once_ms(fn):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def randn(gen, *shape, dtype=torch.bfloat16, scale=1.0, shift=0.0):
    return (scale * torch.randn(*shape, generator=gen, device="cuda") + shift).to(dtype)


def scan_inputs(batch, dim, length, gen):
    n = 16
    return dict(u=randn(gen, batch, dim, length), delta=randn(gen, batch, dim, length, scale=0.5, shift=-1.0),
                A=-torch.exp(randn(gen, dim, n, dtype=torch.float32, scale=0.5)),
                B=randn(gen, batch, n, length), C=randn(gen, batch, n, length),
                D=randn(gen, dim, dtype=torch.float32), z=randn(gen, batch, dim, length),
                delta_bias=randn(gen, dim, dtype=torch.float32, scale=0.3), delta_softplus=True,
                return_last_state=False, modality=None, seq_idx=None)


def ssd_inputs(batch, length, heads, gen):
    p, n = 64, 128
    return dict(x=randn(gen, batch, length, heads, p), dt=randn(gen, batch, length, heads, scale=0.5, shift=-1.0),
                A=-torch.exp(randn(gen, heads, dtype=torch.float32, scale=0.5)),
                B=randn(gen, batch, length, 1, n), C=randn(gen, batch, length, 1, n), chunk_size=256,
                D=randn(gen, heads, dtype=torch.float32), z=None,
                dt_bias=randn(gen, heads, dtype=torch.float32, scale=0.3), initial_states=None, seq_idx=None,
                dt_softplus=True, return_final_states=False, modality=None)


def fwd_bwd(fn, inputs, grads, dout):
    leaves = {k: inputs[k].detach().requires_grad_(True) for k in grads}
    out = fn(**{**inputs, **leaves})
    return out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), dout)))


def forward(fn, inputs):
    with torch.no_grad():
        return fn(**inputs)


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def as_float64(inputs):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def scan_rows(op, shapes, make, grads, nbytes, backends, peer, notes):
    rows = []
    triton_fn, reference_fn = getattr(backends["triton"], op), getattr(backends["reference"], op)
    peer_fn = getattr(peer, op) if peer is not None else None
    for index, shape in enumerate(shapes):
        gen = torch.Generator(device="cuda").manual_seed(index)
        inputs = make(*shape, gen)
        probe = forward(triton_fn, inputs)
        dout = torch.randn(probe.shape, generator=gen, device="cuda").to(probe.dtype)
        fwd = median_ms(lambda: forward(triton_fn, inputs))
        both = median_ms(lambda: fwd_bwd(triton_fn, inputs, grads, dout))
        ref = once_ms(lambda: forward(reference_fn, inputs)) if index < 2 else None
        if peer_fn is not None:
            peer_fwd = median_ms(lambda: forward(peer_fn, inputs))
            peer_both = median_ms(lambda: fwd_bwd(peer_fn, inputs, grads, dout))
            peer_name = f"{peer.name} backend (this run)"
        else:
            (peer_fwd, peer_both), peer_name = QUOTED[(op, shape)], "mamba_ssm, H200 (quoted)"
        rows.append((f"`{op}`", " × ".join(map(str, shape)), fwd, both, ref, nbytes(*shape) / fwd / 1e9, peer_name,
                     peer_fwd, peer_both))
        if index == 0:
            out, got = fwd_bwd(triton_fn, inputs, grads, dout)
            ref_out, ref_grads = fwd_bwd(reference_fn, as_float64(inputs), grads, dout.double())
            errors = ", ".join(f"d{k} {rel(got[k], ref_grads[k]):.1e}" for k in grads)
            notes.append(f"- `{op}` relative error against float64 at {rows[-1][1]} (bfloat16 inputs): out "
                         f"{rel(out, ref_out):.1e}, {errors}")
            del out, got, ref_out, ref_grads
        if 65536 in shape:
            out, got = fwd_bwd(triton_fn, inputs, grads, dout)
            finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in got.values())
            notes.append(f"- `{op}` at length 65,536 ({rows[-1][1]}): output and every gradient finite: "
                         f"{'yes' if finite else 'NO'}")
            del out, got
        del inputs, dout, probe
        torch.cuda.empty_cache()
    return rows


def simple_gla_inputs(x, dt, A, B, C, dt_bias, **_):
    """The arguments of fla's ``chunk_simple_gla`` for ``ssd_scan``'s (one group, ``dt_softplus``), whose output
    plus ``D x`` is ``ssd_scan``'s: ``q = C`` and ``k = B`` expanded to every head, ``v = dt x``, the log decay
    ``g = dt A``, scale 1."""
    step = F.softplus(dt.to(torch.promote_types(dt.dtype, torch.float32)) + dt_bias)
    heads = x.shape[2]
    return dict(q=C.expand(-1, -1, heads, -1).contiguous(), k=B.expand(-1, -1, heads, -1).contiguous(),
                v=(x * step[..., None]).to(x.dtype), g=step * A, scale=1.0)


def fla_notes(ssd_fn, notes):
    """``ssd_scan``'s forward against fla's ``chunk_simple_gla`` at the SSD shapes (see the module docstring)."""
    try:
        import fla
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError:
        notes.append("- fla is not installed (`bash benchmarks/device_setup.sh peers fla`): no `chunk_simple_gla` "
                     "comparison")
        return

    def prepared_and_run(**inputs):
        return chunk_simple_gla(**simple_gla_inputs(**inputs))[0] + inputs["D"][:, None] * inputs["x"]

    notes.append("\n`ssd_scan` forward against fla's `chunk_simple_gla` (fla-core "
                 f"{fla.__version__}, this run; ms)\n")
    notes.append("| shape | `ssd_scan` fwd | fla kernel fwd, prepared inputs | fla fwd with its preparation | "
                 "fwd / fla kernel | fwd / fla with preparation | output relative difference |\n"
                 "|---|---|---|---|---|---|---|")
    for index, shape in enumerate(SSD_SHAPES):
        inputs = ssd_inputs(*shape, torch.Generator(device="cuda").manual_seed(index))
        ours = median_ms(lambda: forward(ssd_fn, inputs))
        prepared = simple_gla_inputs(**inputs)
        kernel = median_ms(lambda: forward(chunk_simple_gla, prepared))
        whole = median_ms(lambda: forward(prepared_and_run, inputs))
        with torch.no_grad():
            diff = rel(prepared_and_run(**inputs).float(), ssd_fn(**inputs).double())
        notes.append(f"| {' × '.join(map(str, shape))} | {ours:.3f} | {kernel:.3f} | {whole:.3f} | "
                     f"{ours / kernel:.2f} | {ours / whole:.2f} | {diff:.1e} |")
        del inputs, prepared
        torch.cuda.empty_cache()


def runs_of(batch, length, run, n_modalities=2):
    return (torch.arange(length, device="cuda") // run % n_modalities).repeat(batch, 1)


def routed_linear_inputs(gen):
    """The routed linear layer's arguments (65,536 tokens, 2048 -> 4096, two modalities in runs of 1024), those
    of one dense ``F.linear`` of the same tokens, and an output gradient."""
    tokens, k, o, m = 65536, 2048, 4096, 2
    x = randn(gen, tokens, k)
    weight = randn(gen, m, o, k, scale=k ** -0.5)
    bias = randn(gen, m, o, scale=0.1)
    modality = runs_of(1, tokens, 1024).view(-1)
    return (dict(x=x, weight=weight, bias=bias, modality=modality), dict(input=x, weight=weight[0], bias=bias[0]),
            randn(gen, tokens, o))


def routed_linear_row(backends):
    inputs, dense, dout = routed_linear_inputs(torch.Generator(device="cuda").manual_seed(7))
    tokens, k = inputs["x"].shape
    m, o = inputs["bias"].shape
    routed = backends["triton"].routed_linear
    fwd = median_ms(lambda: forward(routed, inputs))
    both = median_ms(lambda: fwd_bwd(routed, inputs, ("x", "weight", "bias"), dout))
    ref = median_ms(lambda: forward(backends["reference"].routed_linear, inputs))
    peer_fwd = median_ms(lambda: forward(F.linear, dense))
    peer_both = median_ms(lambda: fwd_bwd(F.linear, dense, ("input", "weight", "bias"), dout))
    nbytes = 2 * (tokens * k + m * o * k + tokens * o)
    return ("routed linear", f"{tokens} × {k} → {o}, 2 modalities", fwd, both, ref, nbytes / fwd / 1e9,
            "one dense `F.linear` (this run)", peer_fwd, peer_both)


def layer_spec(backbone, routing):
    return {"modalities": ["text", "image"], "backbone": {"d_model": 1024, **backbone}, "routing": routing,
            "scan_backend": "triton"}


def block_times(specs, documents=None, graphed=False):
    """``{name: (forward ms, fwd+bwd ms)}`` of a block of each spec at batch 8, length 2048, d_model 1024; with
    ``documents``, each row packs documents of that many positions (``seq_idx``); ``graphed`` adds a third time,
    the median fwd+bwd of replays of a CUDA graph of the step (the GPU's time, which the host's speed does not
    set)."""
    batch, length, d = 8, 2048, 1024
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = randn(gen, batch, length, d, dtype=torch.float32)
    seq_idx = None if documents is None else (torch.arange(length, device="cuda") // documents).repeat(batch, 1)
    modality = runs_of(batch, length, 1024)
    dout = randn(gen, batch, length, d, dtype=torch.float32)
    times = {}
    for name, spec in specs.items():
        block = build_block(spec).cuda()

        def step(block=block):
            leaf = x.detach().requires_grad_(True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = block(leaf, modality, seq_idx)
            torch.autograd.grad(y, [leaf, *block.parameters()], dout)

        def fwd(block=block):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                block(x, modality, seq_idx)

        times[name] = (median_ms(fwd), median_ms(step))
        if graphed:
            times[name] += (do_bench_cudagraph(step, rep=100, return_mode="median"),)
        del block
    return times


def layer_row():
    mamba = {"kind": "mamba", "d_state": 16}
    times = block_times({"mom": layer_spec(mamba, {"specific": "mom"}),
                         "dense": layer_spec(mamba, {"specific": "dense"})})
    return ("MoM layer (`mamba`, preset `mom`)", "8 × 2048, d_model 1024", *times["mom"], None, None,
            "dense Mamba layer (this run)", *times["dense"])


def packed_rows():
    """MoM layers over rows that pack documents of 512 positions (``seq_idx``) against the same layers without."""
    rows = []
    for kind, options in (("mamba", {"d_state": 16}), ("mamba2", {})):
        spec = {"mom": layer_spec({"kind": kind, **options}, {"specific": "mom"})}
        packed, whole = block_times(spec, documents=512)["mom"], block_times(spec)["mom"]
        rows.append((f"MoM layer (`{kind}`), packed documents of 512", "8 × 2048, d_model 1024", *packed, None,
                     None, "the same layer, one document per row (this run)", *whole))
    return rows


def bidirectional_rows():
    """MoM layers bidirectional over the image spans (modality 1, half the tokens) against the causal ones."""
    rows = []
    for kind, options in (("mamba", {"d_state": 16}), ("mamba2", {})):
        spec = layer_spec({"kind": kind, **options}, {"specific": "mom"})
        times = block_times({"bidirectional": {**spec, "bidirectional": ["image"]}, "causal": spec})
        rows.append((f"bidirectional MoM layer (`{kind}`, image spans of 1024)", "8 × 2048, d_model 1024",
                     *times["bidirectional"], None, None, "the causal MoM layer (this run)", *times["causal"]))
    return rows


def experts_row(notes):
    """The experts layer against the dense one; ``notes`` gets both passes replayed from CUDA graphs."""
    experts = {"sublayers": ["w1", "w2", "w3"], "n_experts": 8, "top_k": 1, "capacity_factor": 1.25}
    times = block_times({"experts": layer_spec({"kind": "ffn"}, {"specific": "dense", "experts": experts}),
                         "dense": layer_spec({"kind": "ffn"}, {"specific": "dense"})}, graphed=True)
    (fwd, both, graphed), (dense_fwd, dense_both, dense_graphed) = times["experts"], times["dense"]
    notes.append(f"experts layer fwd+bwd replayed from a CUDA graph: {graphed:.3f} ms against {dense_graphed:.3f} "
                 f"ms for the dense `ffn` layer, {graphed / dense_graphed:.2f}x")
    return ("experts layer (`ffn`, 8 experts, top 1, capacity 1.25)", "8 × 2048, d_model 1024", fwd, both, None,
            None, "dense `ffn` layer of the same active size (this run)", dense_fwd, dense_both)


def _tokens_per_second(generate, new_tokens: int) -> float:
    """Best of three timed calls of ``generate(n)`` after a warm-up call (which also captures graphs)."""
    generate(new_tokens)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(new_tokens)
        torch.cuda.synchronize()
        best = max(best, new_tokens / (time.perf_counter() - start))
    return best


def decode_notes(notes):
    new_tokens, vocab = 512, 50277
    prompt = Batch(modality=torch.zeros(1, 16, dtype=torch.int64, device="cuda"),
                   tokens=torch.randint(0, vocab, (1, 16), device="cuda"))
    rates = {}
    for routing in ("mom", "dense"):
        spec = {"name": "decode", "modalities": [{"kind": "text", "vocab_size": vocab}, "image"],
                "backbone": {"kind": "mamba", "d_model": 1024, "n_layers": 24, "d_state": 16},
                "routing": {"specific": routing}, "scan_backend": "auto"}
        model = build_model(spec).cuda().to(torch.bfloat16).eval()
        for graphed, n in ((True, new_tokens), (False, 128)):
            rates[routing, graphed] = _tokens_per_second(
                lambda n: model.generate(prompt, n, temperature=0, cuda_graph=graphed), n)
        del model
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        MambaLMHeadModel = None
    if MambaLMHeadModel is not None:
        peer = MambaLMHeadModel(MambaConfig(d_model=1024, n_layer=24, vocab_size=vocab, ssm_cfg={"layer": "Mamba1"}),
                                device="cuda", dtype=torch.bfloat16).eval()
        ids = prompt.tokens
        for graphed, n in ((True, new_tokens), (False, 128)):
            rates["mamba_ssm", graphed] = _tokens_per_second(
                lambda n: peer.generate(ids, max_length=16 + n, cg=graphed), n)
        try:
            import causal_conv1d  # noqa: F401
            conv = "with causal-conv1d"
        except ImportError:
            conv = "without causal-conv1d (its convolution step in PyTorch: a weakened peer)"
        peer_name = f"mamba_ssm `MambaLMHeadModel.generate`, dense Mamba-1, this run, {conv}"
    else:
        rates["mamba_ssm", True], rates["mamba_ssm", False] = 1059.0, 68.0
        peer_name = "mamba_ssm `MambaLMHeadModel.generate`, dense Mamba-1 (quoted from BENCHMARKS.md)"
    notes.append(f"decoding: 24 layers, d_model 1024, vocabulary {vocab}, bfloat16, batch 1, prompt 16, "
                 f"{new_tokens} new tokens with CUDA graphs, 128 eager, greedy, best of 3 (tokens/s)\n")
    notes.append("| model | CUDA graph | eager | graph / peer's graph | eager / peer's eager |\n|---|---|---|---|---|")
    for key, name in (("mom", "momkit `Model.generate`, MoM (`mamba`, preset `mom`)"),
                      ("dense", "momkit `Model.generate`, dense `mamba`"), ("mamba_ssm", peer_name)):
        notes.append(f"| {name} | {rates[key, True]:.0f} | {rates[key, False]:.0f} | "
                     f"{rates[key, True] / rates['mamba_ssm', True]:.2f} | "
                     f"{rates[key, False] / rates['mamba_ssm', False]:.2f} |")


PARTS = ("scans", "routed_linear", "layers", "decode")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS,
                        help="parts to run: the scans' rows, the routed linear row, the layer rows (MoM, experts, "
                             "bidirectional), the decoding notes (default: all)")
    parts = parser.parse_args().only
    props = torch.cuda.get_device_properties(0)
    print("# momkit GPU benchmark\n")
    print(f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"- device: {props.name}, {props.multi_processor_count} multiprocessors; torch {torch.__version__}, "
          f"Triton {triton.__version__}\n", flush=True)
    backends = get_registry().scan_backends
    peer = backends["cuda"] if backends["cuda"].is_available() else None
    notes, rows = [], []
    if "scans" in parts:
        rows += scan_rows("selective_scan", SCAN_SHAPES, scan_inputs, SCAN_GRADS,
                          lambda b, d, l: 2 * (4 * b * d * l + 2 * b * 16 * l), backends, peer, notes)
        rows += scan_rows("ssd_scan", SSD_SHAPES, ssd_inputs, SSD_GRADS,
                          lambda b, l, h: 2 * (2 * b * l * h * 64 + b * l * h + 2 * b * l * 128), backends, peer,
                          notes)
        fla_notes(backends["triton"].ssd_scan, notes)
    if "routed_linear" in parts:
        rows.append(routed_linear_row(backends))
    if "layers" in parts:
        rows += [layer_row(), experts_row(notes), *packed_rows(), *bidirectional_rows()]
    if "decode" in parts:
        decode_notes(notes)
    if rows:
        print("| operation | shape | forward (ms) | fwd+bwd (ms) | reference fwd (ms) | fwd TB/s | peer "
              "| peer fwd (ms) | peer fwd+bwd (ms) | fwd / peer | fwd+bwd / peer |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for op, shape, fwd, both, ref, rate, peer_name, peer_fwd, peer_both in rows:
        print(f"| {op} | {shape} | {fwd:.3f} | {both:.3f} | {'-' if ref is None else f'{ref:.1f}'} | "
              f"{'-' if rate is None else f'{rate:.2f}'} | {peer_name} | {peer_fwd:.3f} | {peer_both:.3f} | "
              f"{fwd / peer_fwd:.2f} | {both / peer_both:.2f} |")
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
