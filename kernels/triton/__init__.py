"""The Triton backend for CUDA GPUs: both scans, the routed linear layer, the decoding state updates and the
learned experts' router logits, token slots and gated mix.

``selective_scan.py`` and ``ssd.py`` hold the scan kernels and their autograd functions,
``routed_linear.py`` the grouped matmul of the routed projection, ``conv.py`` the causal convolution,
``decode.py`` the single-position updates, ``experts.py`` the learned experts' router logits, slots and mixes;
the PyTorch references in ``momkit.kernels.reference`` are what they are tested against.

This module imports without Triton: the kernels are imported on first call, and the backend reports itself
unavailable when Triton does not import or no CUDA device is present. Under Triton's interpreter
(``TRITON_INTERPRET=1``, for tests on machines without a GPU) the kernels run on CPU tensors, so the backend
then also lists ``"cpu"`` among its devices; it does not otherwise, so that ``backend="auto"`` on a CPU keeps
choosing the reference backend.
"""

from __future__ import annotations

import functools
import importlib
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


@functools.cache
def _kernels(name: str):
    """The kernel module ``name``, imported on first call: an import statement in every call would cost a
    decoding step's launch a few microseconds of the host's time."""
    return importlib.import_module(f"momkit.kernels.triton.{name}")


def _selective_scan(**kwargs):
    """:func:`momkit.ops.selective_scan` through the Triton kernels (imported on first call, as below)."""
    return _kernels("selective_scan").selective_scan(**kwargs)


def _ssd_scan(**kwargs):
    return _kernels("ssd").ssd_scan(**kwargs)


def _routed_linear(*, x, weight, bias, modality, order=None, groups=None):
    """:func:`momkit.ops.routed_linear` over the flattened positions (a decoding step's ``(b, in)`` as it is)."""
    routed_linear = _kernels("routed_linear").routed_linear
    if x.dim() == 2:
        return routed_linear(x, weight, bias, modality, order=order, groups=groups)
    flat = routed_linear(x.reshape(-1, x.shape[-1]), weight, bias, modality.reshape(-1), order=order,
                         groups=groups)
    return flat.view(*x.shape[:-1], weight.shape[1])


def _causal_conv1d(**kwargs):
    return _kernels("conv").causal_conv1d(**kwargs)


def _router_logits(**kwargs):
    return _kernels("experts").router_logits(**kwargs)


def _expert_slots(**kwargs):
    return _kernels("experts").expert_slots(**kwargs)


def _gated_residual(**kwargs):
    return _kernels("experts").gated_residual(**kwargs)


def _gated_mix(**kwargs):
    return _kernels("experts").gated_mix(**kwargs)


def _selective_state_update(**kwargs):
    return _kernels("decode").selective_state_update(**kwargs)


def _conv_state_update(**kwargs):
    return _kernels("decode").conv_state_update(**kwargs)


@hookimpl
def momkit_scan_backends():
    return [ScanBackend(
        name="triton",
        description="Triton kernels for CUDA GPUs: both scans, routed linear, causal convolution, decoding "
                    "updates, router logits, expert slots, gated residual and mix; in float32",
        selective_scan=_selective_scan,
        ssd_scan=_ssd_scan,
        routed_linear=_routed_linear,
        causal_conv1d=_causal_conv1d,
        selective_state_update=_selective_state_update,
        conv_state_update=_conv_state_update,
        router_logits=_router_logits,
        expert_slots=_expert_slots,
        gated_residual=_gated_residual,
        gated_mix=_gated_mix,
        devices=("cuda", "cpu") if _interpreting() else ("cuda",),
        priority=10,
        extensions=frozenset({"modality", "seq_idx", "initial_state", "order", "groups", "float32_weights"}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        is_available=_available,
    )]
