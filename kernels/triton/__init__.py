"""The Triton backend for CUDA GPUs: both scans, the routed linear layer and the decoding state updates.

``selective_scan.py`` and ``ssd.py`` hold the scan kernels and their autograd functions,
``routed_linear.py`` the grouped matmul of the routed projection, ``conv.py`` the causal convolution,
``decode.py`` the single-position updates;
the PyTorch references in ``momkit.kernels.reference`` are what they are tested against.

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
from momkit.descriptors import ScanBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or _interpreting()


def _selective_scan(**kwargs):
    """:func:`momkit.ops.selective_scan` through the Triton kernels (imported on first call, as below)."""
    from momkit.kernels.triton.selective_scan import selective_scan

    return selective_scan(**kwargs)


def _ssd_scan(**kwargs):
    from momkit.kernels.triton.ssd import ssd_scan

    return ssd_scan(**kwargs)


def _routed_linear(*, x, weight, bias, modality, order=None):
    from momkit.kernels.triton.routed_linear import routed_linear

    flat = routed_linear(x.reshape(-1, x.shape[-1]), weight, bias, modality.reshape(-1), order=order)
    return flat.view(*x.shape[:-1], weight.shape[1])


def _causal_conv1d(**kwargs):
    from momkit.kernels.triton.conv import causal_conv1d

    return causal_conv1d(**kwargs)


def _selective_state_update(**kwargs):
    from momkit.kernels.triton.decode import selective_state_update

    return selective_state_update(**kwargs)


def _conv_state_update(**kwargs):
    from momkit.kernels.triton.decode import conv_state_update

    return conv_state_update(**kwargs)


@hookimpl
def momkit_scan_backends():
    return [ScanBackend(
        name="triton",
        description="Triton kernels for CUDA GPUs: both scans, routed linear, causal convolution, decoding "
                    "updates; in float32",
        selective_scan=_selective_scan,
        ssd_scan=_ssd_scan,
        routed_linear=_routed_linear,
        causal_conv1d=_causal_conv1d,
        selective_state_update=_selective_state_update,
        conv_state_update=_conv_state_update,
        devices=("cuda", "cpu") if _interpreting() else ("cuda",),
        priority=10,
        extensions=frozenset({"modality", "seq_idx", "initial_state", "order"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        is_available=_available,
    )]
