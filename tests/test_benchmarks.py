"""The CPU benchmark script runs end to end on small shapes."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_scan_quick_runs():
    pytest.importorskip("mambapy")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_scan.py"), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| shape | implementation | forward (ms) | fwd+bwd (ms) |" in result.stdout
    assert "### selective_scan" in result.stdout and "### ssd_scan" in result.stdout
