"""The Triton selective scan against the per-token float64 recurrence, forward and backward.

Two tiers. Small odd shapes run under Triton's interpreter on CPU tensors when ``TRITON_INTERPRET=1`` is set
(about a minute on two cores: ``TRITON_INTERPRET=1 pytest tests/kernels/test_triton_selective_scan.py``),
otherwise on a CUDA GPU. Larger shapes, each at several tilings (block sizes, chunk lengths, warps), run only on
a CUDA GPU: there the compiled kernels are tested, not the interpreter's NumPy, and compilers have been seen
to miscompile some block sizes only. Without Triton, or with neither a GPU nor the interpreter, they skip.

Each comparison is ``|x - ref| / |ref|`` (Frobenius norms; ``|x|`` where ``ref`` is zero) of the output, the
last state and the gradient of every input, for a random linear loss of the output and the last state,
against the per-token recurrence in float64 on the same (rounded) inputs: at most 1e-4 for float32 inputs and
1e-2 for bfloat16 ones.
"""

import subprocess
import sys

import pytest
import torch

from momkit.kernels.reference.naive import naive_selective_scan
from tests.kernels.conftest import (DEVICE, INTERPRETING, as_float64, assert_close, selective_device_inputs,
                                    selective_grads, selective_reference)

KERNELS = "momkit.kernels.triton.selective_scan"


SMALL = [
    dict(batch=2, dim=6, state=4, length=37),
    dict(batch=1, dim=8, state=3, length=5, groups=2),
    dict(batch=2, dim=6, state=4, length=29, groups=3, D=False, z=False),
    dict(batch=2, dim=5, state=2, length=1, bias=False),
    dict(batch=1, dim=4, state=4, length=23, softplus=False, bias=False),
    dict(batch=2, dim=6, state=4, length=41, groups=2, n_modalities=3),
    dict(batch=2, dim=6, state=3, length=45, packed=True),
    dict(batch=2, dim=4, state=3, length=31, groups=2, n_modalities=2, packed=True),
    dict(batch=2, dim=6, state=4, length=37, initial=True),
    dict(batch=2, dim=4, state=3, length=31, groups=2, n_modalities=2, packed=True, initial=True),
]


def case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items())


@pytest.mark.parametrize("case", SMALL, ids=case_id)
def test_small_shapes_float32(kernels, gen, case):
    inputs = selective_device_inputs(gen, **case)
    ref = selective_reference(inputs, 7)
    for tiling in (kernels.Tiling(chunk=8, block_d=4, block_d_bwd=2),
                   kernels.Tiling(chunk=16, block_d=2, block_d_bwd=4, warps=2, warps_bwd=1, unroll=4, unroll_bwd=1)):
        got = selective_grads(kernels.selective_scan, inputs, torch.Generator().manual_seed(7), tiling=tiling)
        assert_close(got, ref, torch.float32, f"{tiling}")


@pytest.mark.parametrize("case", [SMALL[0], SMALL[7]], ids=case_id)
def test_small_shapes_bfloat16(kernels, gen, case):
    inputs = selective_device_inputs(gen, **case, dtype=torch.bfloat16)
    got = selective_grads(kernels.selective_scan, inputs, torch.Generator().manual_seed(3),
              tiling=kernels.Tiling(chunk=16, block_d=4, block_d_bwd=4))
    assert got["out"].dtype == got["du"].dtype == got["dB"].dtype == torch.bfloat16
    assert got["last"].dtype == got["dA"].dtype == torch.float32
    assert_close(got, selective_reference(inputs, 3), torch.bfloat16, "bfloat16")


def test_forward_without_gradients(kernels, gen):
    inputs = selective_device_inputs(gen, 2, 6, 4, 37)
    out, last = kernels.selective_scan(**inputs, return_last_state=True)
    ref_out, ref_last = naive_selective_scan(**as_float64(inputs), return_last_state=True)
    assert_close({"out": out, "last": last}, {"out": ref_out, "last": ref_last}, torch.float32, "no grad")


def test_front_door_and_registry(kernels, gen):
    import momkit.kernels.triton as plugin
    from importlib.metadata import entry_points

    from momkit import ops
    from momkit.registry import Registry, use_registry

    registry = Registry.from_entry_points()
    if "momkit.kernels.triton" not in {ep.value for ep in entry_points(group="momkit")}:
        registry.register(plugin, distribution="momkit")
    inputs = selective_device_inputs(gen, 2, 6, 4, 19, n_modalities=2, packed=True)
    with use_registry(registry):
        backend = registry.get("scan_backend", "triton")
        assert backend.is_available()
        assert backend.extensions == {"modality", "seq_idx", "initial_state", "order", "groups", "float32_weights"}
        assert ("cpu" in backend.devices) == INTERPRETING
        for op in ("selective_scan", "ssd_scan", "routed_linear", "causal_conv1d", "selective_state_update",
                   "conv_state_update"):
            assert ops.resolve_backend("auto", DEVICE, op).name == "triton"
        out = ops.selective_scan(**inputs, backend="triton")
    ref = naive_selective_scan(**as_float64(inputs))
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-4


def test_refuses_float64(kernels, gen):
    inputs = as_float64(selective_device_inputs(gen, 1, 4, 2, 8))
    with pytest.raises(ValueError, match="float64"):
        kernels.selective_scan(**inputs, return_last_state=False)


def test_imports_and_reports_unavailable_without_triton(tmp_path):
    code = ("import sys; sys.modules['triton'] = None\n"
            "import momkit.kernels.triton as plugin\n"
            "(backend,) = plugin.momkit_scan_backends()\n"
            "assert backend.name == 'triton' and not backend.is_available()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


LARGE = [
    dict(batch=2, dim=160, state=16, length=1000, dtype=torch.bfloat16),
    dict(batch=2, dim=96, state=16, length=777, groups=2, dtype=torch.float32),
    dict(batch=1, dim=72, state=16, length=1500, groups=3, n_modalities=3, packed=True, dtype=torch.bfloat16),
    dict(batch=3, dim=50, state=5, length=300, D=False, bias=False, softplus=False, dtype=torch.float32),
]


def large_tilings(kernels):
    """The default and tilings over chunk lengths, channel blocks, warps and unrolls, including cross-warp scans
    and reductions (more warps than a tile's rows fill)."""
    T = kernels.Tiling
    return [None, T(128, 8, 4, 4, 1), T(64, 16, 8, 4, 2, 4, 1), T(256, 4, 2, 2, 1, 1, 4), T(32, 32, 16, 8, 4),
            T(16, 8, 2, 2, 1, 4, 2), T(128, 2, 8, 1, 8, 2, 2)]


@pytest.mark.parametrize("case", LARGE, ids=lambda c: case_id({k: v for k, v in c.items() if k != "dtype"})
                         + f"-{str(c['dtype'])[6:]}")
def test_large_shapes_at_several_tilings(cuda_kernels, gen, case):
    inputs = selective_device_inputs(gen, **case)
    ref = selective_reference(inputs, 11)
    for tiling in large_tilings(cuda_kernels):
        got = selective_grads(cuda_kernels.selective_scan, inputs, torch.Generator().manual_seed(11), tiling=tiling)
        assert_close(got, ref, case["dtype"], f"{tiling}")


def test_long_sequence_stays_finite(cuda_kernels, gen):
    inputs = selective_device_inputs(gen, 1, 32, 16, 65536, dtype=torch.bfloat16)
    got = selective_grads(cuda_kernels.selective_scan, inputs, torch.Generator().manual_seed(5))
    for name, x in got.items():
        assert torch.isfinite(x).all(), name
