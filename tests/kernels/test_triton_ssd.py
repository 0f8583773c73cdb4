"""The Triton SSD scan against the per-token float64 recurrence, forward and backward.

Two tiers. Small odd shapes run under Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set
(about a minute on two cores: ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_ssd.py``), otherwise on a
CUDA GPU. Larger shapes, each at several tilings (block sizes, warps, pipeline stages, heads per program), run
only on a CUDA GPU: there the compiled kernels are tested, not the interpreter's NumPy, and compilers have been
seen to miscompile some block sizes only. Without Triton, or with neither a GPU nor the interpreter, they skip.

Each comparison is ``|x - ref| / |ref|`` (Frobenius norms; ``|x|`` where ``ref`` is zero) of the output, the
final state and the gradient of every input, for a random linear loss of the output and the final state,
against the per-token recurrence in float64 on the same (rounded) inputs: at most 1e-4 for float32 inputs and
1e-2 for bfloat16 ones.
"""

import pytest
import torch

from momkit.kernels.reference.naive import naive_ssd_scan
from tests.kernels.conftest import DEVICE, SSD_GRADS, as_float64, assert_close, linear_loss_grads, ssd_inputs

LOW = ("x", "dt", "B", "C", "z")

KERNELS = "momkit.kernels.triton.ssd"


def documents(gen, batch, length):
    """``(b, l)`` int32 document index with random boundaries, including one-position documents and an id that
    comes back (a change of ``seq_idx`` starts a document whatever the id)."""
    starts = torch.rand(batch, length, generator=gen) < 0.15
    starts[:, 0] = False
    if length > 3:
        starts[0, length - 1] = starts[0, length - 2] = True
    ids = starts.cumsum(1)
    return torch.where(ids % 3 == 2, 0, ids).to(torch.int32)


def make_inputs(gen, batch, length, heads, headdim, groups, state, *, dtype=torch.float32, n_modalities=None,
                packed=False, **options):
    """The reference tests' random inputs (``options``: ``D``, ``z``, ``bias``, ``softplus``, ``initial``) on
    ``DEVICE``: ``x, dt, B, C, z`` in ``dtype``; ``A, D, dt_bias, initial_states`` in float32."""
    seq_idx = documents(gen, batch, length) if packed else None
    inputs = ssd_inputs(gen, batch, length, heads, headdim, groups, state, modalities=n_modalities,
                              seq_idx=seq_idx, **options)
    return {k: v.to(DEVICE, dtype if k in LOW else torch.float32) if torch.is_tensor(v) and v.is_floating_point()
            else v.to(DEVICE) if torch.is_tensor(v) else v for k, v in inputs.items()}


def run(fn, inputs, gen, **extra):
    return linear_loss_grads(fn, inputs, SSD_GRADS, gen, "final", **extra)


def reference(inputs, seed):
    return run(naive_ssd_scan, as_float64(inputs), torch.Generator().manual_seed(seed))


def split(case):
    """``(input arguments, chunk_size)`` of a case."""
    return {k: v for k, v in case.items() if k != "chunk"}, case["chunk"]


SMALL = [
    dict(batch=2, length=37, heads=4, headdim=3, groups=2, state=5, chunk=16),
    dict(batch=1, length=5, heads=2, headdim=4, groups=1, state=3, chunk=8, D="h"),
    dict(batch=2, length=29, heads=4, headdim=2, groups=4, state=3, chunk=10, D=None, z=False, initial=False),
    dict(batch=2, length=1, heads=2, headdim=3, groups=2, state=4, chunk=16, bias=False),
    dict(batch=1, length=23, heads=4, headdim=3, groups=2, state=4, chunk=7, softplus=False, bias=False, D="h"),
    dict(batch=2, length=41, heads=6, headdim=5, groups=2, state=4, chunk=20, n_modalities=3),
    dict(batch=2, length=45, heads=4, headdim=3, groups=2, state=5, chunk=10, packed=True),
    dict(batch=2, length=31, heads=4, headdim=3, groups=1, state=4, chunk=12, n_modalities=2, packed=True, z=False),
    dict(batch=2, length=53, heads=2, headdim=17, groups=1, state=33, chunk=40, packed=True, D="h"),
]


def case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items() if k != "dtype")


def small_tilings(kernels):
    """Blocks of 16 (several row and column blocks per chunk, several state tiles, heads split across programs)
    and unequal row and column blocks with one head per program; both under the default warps and stages."""
    T = kernels.Tiling
    return [T(block_h=2, state_p=16, state_n=16, state_t=16, cb_m=16, cb_k=32, out_m=16, out_k=16, dx_m=16, dx_k=16,
              dcb_m=16, dcb_k=32, dcb_heads=3, dbc_m=32, dbc_k=16, dbc_heads=1),
            T(block_h=4, state_p=16, state_n=32, state_t=32, cb_m=32, cb_k=16, out_m=32, out_k=16, dx_m=16, dx_k=32,
              dcb_m=32, dcb_k=16, dcb_heads=1, dbc_m=16, dbc_k=32, dbc_heads=2)]


@pytest.mark.parametrize("case", SMALL, ids=case_id)
def test_small_shapes_float32(kernels, gen, case):
    args, chunk = split(case)
    inputs = make_inputs(gen, **args)
    ref = reference(inputs, 7)
    for tiling in small_tilings(kernels):
        got = run(kernels.ssd_scan, inputs, torch.Generator().manual_seed(7), chunk_size=chunk, tiling=tiling)
        assert_close(got, ref, torch.float32, f"{tiling}")


def test_small_shapes_bfloat16(kernels, gen):
    args, chunk = split(dict(batch=2, length=37, heads=4, headdim=3, groups=2, state=5, chunk=16, n_modalities=2,
                             packed=True))
    inputs = make_inputs(gen, **args, dtype=torch.bfloat16)
    ref = reference(inputs, 3)
    for tiling in (kernels.Tiling(), small_tilings(kernels)[0]):
        got = run(kernels.ssd_scan, inputs, torch.Generator().manual_seed(3), chunk_size=chunk, tiling=tiling)
        assert got["out"].dtype == got["dx"].dtype == got["ddt"].dtype == got["dB"].dtype == torch.bfloat16
        assert got["final"].dtype == got["dA"].dtype == got["dinitial_states"].dtype == torch.float32
        assert_close(got, ref, torch.bfloat16, f"bfloat16 {tiling}")


def test_forward_without_gradients(kernels, gen):
    inputs = make_inputs(gen, 2, 37, 4, 3, 2, 5, n_modalities=2, packed=True)
    out, final = kernels.ssd_scan(**inputs, chunk_size=16, return_final_states=True)
    ref_out, ref_final = naive_ssd_scan(**as_float64(inputs), return_final_states=True)
    assert_close({"out": out, "final": final}, {"out": ref_out, "final": ref_final}, torch.float32, "no grad")
    alone = kernels.ssd_scan(**inputs, chunk_size=16)
    assert torch.is_tensor(alone) and torch.equal(alone, out)


def test_result_does_not_depend_on_chunk_size(kernels, gen):
    inputs = make_inputs(gen, 1, 37, 2, 3, 1, 4, packed=True)
    ref_out, ref_final = naive_ssd_scan(**as_float64(inputs), return_final_states=True)
    for chunk in (5, 16, 37, 1000):
        out, final = kernels.ssd_scan(**inputs, chunk_size=chunk, return_final_states=True)
        assert_close({"out": out, "final": final}, {"out": ref_out, "final": ref_final}, torch.float32,
                     f"chunk {chunk}")


def test_gradient_of_output_alone_and_of_final_state_alone(kernels, gen):
    inputs = make_inputs(gen, 2, 29, 4, 3, 2, 4, packed=True)
    x = inputs["x"].clone().requires_grad_(True)
    init = inputs["initial_states"].clone().requires_grad_(True)
    for pick in (0, 1):
        got = kernels.ssd_scan(**{**inputs, "x": x, "initial_states": init}, chunk_size=8, return_final_states=True)
        ref = naive_ssd_scan(**as_float64({**inputs, "x": x, "initial_states": init}), return_final_states=True)
        w = torch.randn(got[pick].shape, generator=gen, dtype=torch.float64)
        grads = torch.autograd.grad((got[pick] * w.to(DEVICE, got[pick].dtype)).sum(), [x, init])
        ref_grads = torch.autograd.grad((ref[pick] * w.to(DEVICE)).sum(), [x, init])
        assert_close({"dx": grads[0], "dinit": grads[1]}, {"dx": ref_grads[0], "dinit": ref_grads[1]},
                     torch.float32, ("out", "final state")[pick])


def test_refuses_float64(kernels, gen):
    inputs = as_float64(make_inputs(gen, 1, 8, 2, 3, 1, 2))
    with pytest.raises(ValueError, match="float64"):
        kernels.ssd_scan(**inputs, chunk_size=4)


def test_tiling_refuses_bad_blocks(kernels):
    with pytest.raises(ValueError, match="power of two"):
        kernels.Tiling(out_m=48)
    with pytest.raises(ValueError, match="at least 16"):
        kernels.Tiling(dx_k=8)
    with pytest.raises(ValueError, match="at least 1"):
        kernels.Tiling(dcb_heads=0)


LARGE = [
    dict(batch=2, length=1000, heads=8, headdim=64, groups=1, state=128, chunk=256, dtype=torch.bfloat16),
    dict(batch=2, length=1001, heads=4, headdim=64, groups=2, state=128, chunk=256, dtype=torch.float32),
    dict(batch=1, length=1500, heads=6, headdim=64, groups=2, state=64, chunk=128, n_modalities=3, packed=True,
         dtype=torch.bfloat16),
    dict(batch=2, length=777, heads=4, headdim=64, groups=1, state=16, chunk=64, D="h", packed=True,
         dtype=torch.float32),
    dict(batch=3, length=300, heads=4, headdim=48, groups=4, state=50, chunk=100, D=None, bias=False, softplus=False,
         z=False, initial=False, dtype=torch.float32),
]


def large_tilings(kernels):
    """The default and tilings over every block size, warps, stages and heads per program."""
    T = kernels.Tiling
    return [None,
            T(block_h=8, state_p=32, state_n=128, state_t=32, state_warps=8, cb_m=128, cb_k=32, cb_warps=8,
              out_m=128, out_k=32, out_warps=8, dx_m=32, dx_k=64, dcb_m=128, dcb_k=32, dcb_warps=8, dcb_heads=1,
              dbc_m=128, dbc_k=32, dbc_warps=8, dbc_heads=3),
            T(block_h=32, state_p=64, state_n=32, state_t=128, state_warps=2, state_stages=3, cb_m=32, cb_k=128,
              out_m=32, out_k=128, out_stages=3, dx_m=128, dx_k=32, dx_warps=8, dcb_m=32, dcb_k=64, dcb_heads=5,
              dbc_m=32, dbc_k=64, dbc_heads=2, dx_stages=3, dcb_stages=3, dbc_stages=1),
            T(block_h=4, state_p=16, state_n=16, state_t=16, state_warps=1, state_stages=1, cb_m=16, cb_k=16,
              cb_warps=1, out_m=16, out_k=16, out_warps=1, out_stages=1, dx_m=16, dx_k=16, dx_warps=1, dcb_m=16,
              dcb_k=16, dcb_warps=1, dcb_heads=2, dbc_m=16, dbc_k=16, dbc_warps=2, dbc_heads=1, dx_stages=1,
              dcb_stages=1, dbc_stages=1),
            T(state_p=128, state_n=64, state_t=64, cb_m=64, cb_k=128, out_m=64, out_k=64, out_warps=8, dx_m=64,
              dx_k=128, dx_warps=8, dcb_m=64, dcb_k=128, dcb_warps=8, dbc_m=64, dbc_k=128, dbc_warps=8,
              dx_stages=1, dcb_stages=2, dbc_stages=1)]


@pytest.mark.parametrize("case", LARGE, ids=lambda c: case_id(c) + f"-{str(c['dtype'])[6:]}")
def test_large_shapes_at_several_tilings(cuda_kernels, gen, case):
    args, chunk = split(case)
    inputs = make_inputs(gen, **args)
    ref = reference(inputs, 11)
    for tiling in large_tilings(cuda_kernels):
        got = run(cuda_kernels.ssd_scan, inputs, torch.Generator().manual_seed(11), chunk_size=chunk, tiling=tiling)
        assert_close(got, ref, case["dtype"], f"{tiling}")


def test_long_sequence_stays_finite(cuda_kernels, gen):
    inputs = make_inputs(gen, 1, 65536, 8, 64, 1, 128, dtype=torch.bfloat16, packed=True)
    got = run(cuda_kernels.ssd_scan, inputs, torch.Generator().manual_seed(5), chunk_size=256)
    for name, x in got.items():
        assert torch.isfinite(x).all(), name
