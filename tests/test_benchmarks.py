"""The benchmark scripts that run without a GPU: the CPU benchmark on small shapes, and the GPU profile's table
printed from kept CSV files."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_scan_quick_runs():
    pytest.importorskip("mambapy")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_scan.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| shape | implementation | forward (ms) | fwd+bwd (ms) |" in result.stdout
    assert "### selective_scan" in result.stdout and "### ssd_scan" in result.stdout


NCU_RAW = """==PROF== Disconnected
"ID","Kernel Name","gpu__time_duration.sum","launch__registers_per_thread",\
"sm__maximum_warps_per_active_cycle_pct","sm__warps_active.avg.pct_of_peak_sustained_active",\
"dram__bytes_read.sum","dram__bytes_write.sum","gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",\
"sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",\
"sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"
"","","nsecond","register/thread","%","%","byte","byte","%","%","%","%"
"0","_fwd_kernel(float*, int)","1,234,500","96","31.25","28.1","200,000,000","80,200,000","7.2","48.2","21.3","0.4"
"1","void at::vectorized_elementwise_kernel<4>(int)","2,500","16","100","6","0","0","0","0","0","0"
"2","void at::reduce_kernel<128>(int)","3,100","32","100","25","1,000","0","0","0","0","0"
"""


def test_gpu_profile_prints_its_table_from_kept_csv(tmp_path):
    pytest.importorskip("triton")
    script = ROOT / "benchmarks" / "gpu_profile.py"
    (tmp_path / "selective_scan-triton.csv").write_text(NCU_RAW)
    result = subprocess.run([sys.executable, str(script), "--from-csv", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "| selective_scan/triton | `_fwd_kernel` | 1234.5 | 96 | 31 | 28 | 280.2 | 7 | 48 | 21 | 0 |" in lines
    assert "| selective_scan/triton | 2 kernels under 20 µs each" in result.stdout
    assert "| 5.6 |" in result.stdout and "ssd_scan" not in result.stdout

    empty = subprocess.run([sys.executable, str(script), "--from-csv", str(tmp_path / "none")], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "Traceback" not in empty.stderr
    assert "no CSV of gpu_profile.py" in empty.stderr and "selective_scan-triton.csv" in empty.stderr


def test_scale_profile_splits_a_step_into_compute_communication_idle_and_kernels():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def kernel(name, start, end, device=DeviceType.CUDA):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end))

    # two steps, in microseconds: compute 0-400 and 500-900 (two kernels that overlap), an all-gather 300-600
    # of which 400-500 runs alone, a reduce-scatter 950-1000 alone, and a CPU event that must not count
    events = [kernel("gemm", 0, 400), kernel("scan", 500, 800), kernel("norm", 700, 900),
              kernel("ncclDevKernel_AllGather", 300, 600), kernel("ncclDevKernel_ReduceScatter", 950, 1000),
              kernel("aten::mm", -5000, 5000, DeviceType.CPU)]
    assert scale.gpu_time(events, 2) == pytest.approx({
        "compute": 0.4, "communication": 0.175, "exposed communication": 0.075, "idle": 0.025})
    assert scale.kernel_time(events, 2) == pytest.approx({
        "gemm": 0.2, "scan": 0.15, "norm": 0.1, "ncclDevKernel_AllGather": 0.15, "ncclDevKernel_ReduceScatter": 0.025})


def test_gpu_scan_maps_ssd_scan_onto_simple_gla_exactly():
    """The fla comparison's arguments: a simple gated linear attention of them, written out here in float64, plus
    ``D x`` equals the reference ``ssd_scan`` on fresh random inputs."""
    pytest.importorskip("triton")
    import torch

    from momkit.registry import get_registry

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_scan
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def simple_gla(q, k, v, g, scale):
        decay = g.cumsum(1).transpose(1, 2)
        scores = torch.einsum("bthn,bshn->bhts", q, k) * scale * (decay[..., :, None] - decay[..., None, :]).exp()
        causal = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
        return torch.einsum("bhts,bshp->bthp", scores.masked_fill(~causal, 0), v)

    gen = torch.Generator().manual_seed(3)
    b, length, heads, p, n = 2, 40, 3, 5, 4
    inputs = dict(x=torch.randn(b, length, heads, p, generator=gen, dtype=torch.float64),
                  dt=torch.randn(b, length, heads, generator=gen, dtype=torch.float64) * 0.5 - 1,
                  A=-torch.rand(heads, generator=gen, dtype=torch.float64) - 0.5,
                  B=torch.randn(b, length, 1, n, generator=gen, dtype=torch.float64),
                  C=torch.randn(b, length, 1, n, generator=gen, dtype=torch.float64),
                  D=torch.randn(heads, generator=gen, dtype=torch.float64),
                  dt_bias=torch.randn(heads, generator=gen, dtype=torch.float64) * 0.3)
    expected = get_registry().scan_backends["reference"].ssd_scan(
        **inputs, chunk_size=16, z=None, initial_states=None, seq_idx=None, dt_softplus=True,
        return_final_states=False, modality=None)
    got = simple_gla(**gpu_scan.simple_gla_inputs(**inputs)) + inputs["D"][:, None] * inputs["x"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
