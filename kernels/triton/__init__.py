"""The Triton scan backend: Mamba-1 ``selective_scan`` on CUDA GPUs (``ssd_scan`` is not implemented here).

``selective_scan.py`` holds the kernels and their autograd function; the chunked PyTorch reference in
``momkit.kernels.reference`` is what they are tested against.

This module imports without Triton: the kernels are imported on first call, and the backend reports itself
unavailable when Triton does not import or no CUDA device is present. Under Triton's interpreter
(``TRITON_INTERPRET=1``, for tests on machines without a GPU) the kernels run on CPU tensors, so the backend
then also lists ``"cpu"`` among its devices; it does not otherwise, so that ``backend="auto"`` on a CPU keeps
choosing the reference backend.
"""

from __future__ import annotations

import os

import torch

from momkit import hookimpl
from momkit.ops import ScanBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def _selective_scan(**kwargs):
    """:func:`momkit.ops.selective_scan` through the Triton kernels (imported on first call)."""
    from momkit.kernels.triton.selective_scan import selective_scan as scan

    return scan(**kwargs)


@hookimpl
def momkit_scan_backends():
    return [ScanBackend(
        name="triton",
        description="Triton kernels for CUDA GPUs: Mamba-1 selective scan, forward and backward, in float32",
        selective_scan=_selective_scan,
        ssd_scan=None,
        devices=("cuda", "cpu") if _interpreting() else ("cuda",),
        priority=10,
        extensions=frozenset({"modality", "seq_idx"}),
        is_available=_available,
    )]
