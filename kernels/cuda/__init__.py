"""The ``cuda`` backend: the scans and the decoding update through mamba_ssm's kernels, for CUDA GPUs.

A thin adapter, not a reimplementation: momkit's front doors take mamba_ssm's own arguments, so each call is
passed on as is, after the front door's checks. ``selective_scan`` runs mamba_ssm's compiled CUDA kernel
(``selective_scan_fn``), ``ssd_scan`` its Triton SSD (``mamba_chunk_scan_combined``) and
``selective_state_update`` its Triton decoding update. It implements none of momkit's extensions (a
per-modality ``A``, ``seq_idx`` in the selective scan), so a routed ``A_log`` or packed documents need the
``triton`` or ``reference`` backend; the front door says so. Two differences from momkit's own kernels, both
mamba_ssm's: ``selective_scan_fn`` does not differentiate its last state (so a call that returns it while an
input requires a gradient is refused here rather than given a silently partial gradient), and the SSD kernels
compute float32 products in tf32 (relative error about 1e-3 against float64, where momkit's reach 1e-6).

Install it with the optional extra ``momkit[cuda]`` (mamba_ssm compiles its CUDA extension at install time).
The backend is listed by :func:`momkit.ops.available_backends` only where mamba_ssm and its compiled kernel
import and a GPU is present. ``backend="auto"`` ranks it by operation, by the H200 measurements of
``benchmarks/RESULTS.md`` (2026-11-23, same run): above ``triton`` for ``selective_scan``, where mamba_ssm's
kernel takes 0.72 to 0.87 of the Triton kernel's time (forward, three shapes), and below it elsewhere: for
``ssd_scan`` the Triton kernels take 0.38 of mamba_ssm's time at 8 x 2048 (forward+backward) and 1.07 to 1.11
at the two longer shapes, and compute in float32 where mamba_ssm's use tf32; for the decoding update there is
no measurement. Choose it by name: ``scan_backend: cuda`` in a spec (or per operation,
``{selective_scan: cuda}``), ``backend="cuda"`` in a call.
"""

from __future__ import annotations

import functools

import torch

from momkit import hookimpl
from momkit.descriptors import ScanBackend
from momkit.errors import SpecError


@functools.cache
def _available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
        import mamba_ssm.ops.triton.selective_state_update  # noqa: F401
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except ImportError:
        return False
    return True


def _selective_scan(*, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, modality,
                    seq_idx, initial_state=None):
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    if return_last_state and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise SpecError("the cuda backend's selective scan (mamba_ssm's selective_scan_fn) does not "
                        "differentiate the last state; call it with return_last_state=False, under "
                        "torch.no_grad(), or with backend='triton' or 'reference'")
    return selective_scan_fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                             return_last_state=return_last_state)


def _ssd_scan(*, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
              return_final_states, modality):
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias,
                                     initial_states=initial_states,
                                     seq_idx=None if seq_idx is None else seq_idx.to(torch.int32),
                                     dt_softplus=dt_softplus, return_final_states=return_final_states)


def _selective_state_update(*, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, modality):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    return selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


@hookimpl
def momkit_scan_backends():
    return [ScanBackend(
        name="cuda",
        description="mamba_ssm's kernels (momkit[cuda]): CUDA selective scan, Triton SSD and decoding update",
        selective_scan=_selective_scan,
        ssd_scan=_ssd_scan,
        selective_state_update=_selective_state_update,
        devices=("cuda",),
        priority={"selective_scan": 15, "default": 5},
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        is_available=_available,
    )]
