"""The eager path of the kernel front doors: the arguments' check, the backend's choice and the call.

:mod:`momkit.ops`'s front doors call these directly, and their ``torch.library`` operators
(:mod:`momkit.ops.library`) call them when a compiled graph runs.
"""

from __future__ import annotations

import functools
from typing import Mapping

import torch

from momkit.descriptors import ScanBackend
from momkit.errors import SpecError
from momkit.ops.checks import (check_causal_conv1d, check_expert_slots, check_gated_mix, check_gated_residual,
                               check_routed_linear, check_router_logits, check_selective_scan, check_ssd_scan)
from momkit.registry import Registry, get_registry


def backend_name(backend: str | Mapping[str, str], op: str) -> str:
    """The backend name ``backend`` gives ``op``: itself, or from a mapping of operation names (and ``default``,
    else ``"auto"``) to names."""
    if isinstance(backend, str) or not isinstance(backend, Mapping):
        return backend
    return backend.get(op, backend.get("default", "auto"))


def resolve_backend(name: str | Mapping[str, str], device: torch.device | str, op: str, extensions=frozenset(),
                    dtype: torch.dtype | None = None) -> ScanBackend:
    """The backend ``name`` (or, for ``"auto"``, the one that ranks highest for ``op``) that runs ``op`` on
    ``device``; for a named backend that does not implement ``op`` at all, the ``"auto"`` choice. ``name`` may
    map operation names to backend names (see :func:`backend_name`).

    ``extensions`` are the front-door extensions the call uses (see :class:`ScanBackend`), ``dtype`` the dtype
    of its main input (any, if ``None``).

    Raises:
        SpecError: ``name`` is not registered or cannot run here (it lacks the device, an extension or the
            dtype), or no backend runs the call; the message lists the backends that would do.
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return _resolve(get_registry(), backend_name(name, op), device_type, op, frozenset(extensions), dtype)


@functools.lru_cache(maxsize=256)
def _resolve(registry: Registry, name: str, device_type: str, op: str, extensions: frozenset[str],
             dtype: torch.dtype | None) -> ScanBackend:
    """:func:`resolve_backend` for one registry, remembered: a registry is fixed once looked up, and decoding
    asks the same question for every layer and position."""
    backends = registry.scan_backends

    def fits(b: ScanBackend) -> bool:
        return (getattr(b, op) is not None and device_type in b.devices and extensions <= b.extensions
                and (dtype is None or b.dtypes is None or dtype in b.dtypes) and b.is_available())

    suitable = sorted((b for b in backends.values() if fits(b)), key=lambda b: -b.rank(op))
    need = (f"{op} on {device_type}" + ("" if dtype is None else f" in {dtype}")
            + "".join(f" with {e}" for e in sorted(extensions)))
    if name in backends and getattr(backends[name], op) is None:
        name = "auto"
    if name == "auto":
        if not suitable:
            raise SpecError(f"no scan backend runs {need}; registered backends: {sorted(backends)}")
        return suitable[0]
    if name not in backends:
        raise SpecError(f"unknown scan backend {name!r}; registered backends: {sorted(backends)} or 'auto'")
    if not fits(backends[name]):
        raise SpecError(f"scan backend {name!r} cannot run {need} in this process; "
                        f"backends that can: {[b.name for b in suitable] or 'none'}")
    return backends[name]


def _extensions(**used) -> frozenset[str]:
    return frozenset(name for name, value in used.items() if value is not None)


def selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, modality, seq_idx,
                   backend, initial_state=None):
    """:func:`momkit.ops.selective_scan`, checked and run on its backend."""
    check_selective_scan(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, initial_state)
    used = _extensions(modality=modality, seq_idx=seq_idx, initial_state=initial_state)
    impl = resolve_backend(backend, u.device, "selective_scan", used, u.dtype)
    return impl.selective_scan(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, return_last_state=return_last_state,
                               modality=modality, seq_idx=seq_idx, initial_state=initial_state)


def ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, return_final_states,
             modality, backend):
    """:func:`momkit.ops.ssd_scan`, checked and run on its backend."""
    check_ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, modality)
    impl = resolve_backend(backend, x.device, "ssd_scan", _extensions(modality=modality), x.dtype)
    return impl.ssd_scan(x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                         initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                         return_final_states=return_final_states, modality=modality)


def routed_linear(x, weight, bias, modality, backend, order=None, groups=None):
    """:func:`momkit.ops.routed_linear` on inputs already in the autocast dtype, checked and run on its
    backend (with ``order`` and ``groups`` if it takes them); float32 ``weight`` and ``bias`` beside a 16-bit
    ``x`` are cast to ``x``'s dtype first for a backend without the ``"float32_weights"`` extension."""
    check_routed_linear(x, weight, bias, modality, order, groups)
    impl = resolve_backend(backend, x.device, "routed_linear", dtype=x.dtype)
    if weight.dtype != x.dtype and "float32_weights" not in impl.extensions:
        weight, bias = weight.to(x.dtype), None if bias is None else bias.to(x.dtype)
    hints = {name: value for name, value in (("order", order), ("groups", groups))
             if value is not None and name in impl.extensions}
    return impl.routed_linear(x=x, weight=weight, bias=bias, modality=modality, **hints)


def causal_conv1d(x, weight, bias, seq_idx, modality, backend):
    """:func:`momkit.ops.causal_conv1d`, checked and run on its backend."""
    check_causal_conv1d(x, weight, bias, seq_idx, modality)
    impl = resolve_backend(backend, x.device, "causal_conv1d", _extensions(modality=modality, seq_idx=seq_idx),
                           x.dtype)
    return impl.causal_conv1d(x=x, weight=weight, bias=bias, seq_idx=seq_idx, modality=modality)


def router_logits(x, weight, modality, eps, backend):
    """:func:`momkit.ops.router_logits`, checked and run on its backend, autocast off."""
    check_router_logits(x, weight, modality, eps)
    impl = resolve_backend(backend, x.device, "router_logits", _extensions(modality=modality), x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return impl.router_logits(x=x, weight=weight, modality=modality, eps=eps)


def expert_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor, backend):
    """:func:`momkit.ops.expert_slots`, checked and run on its backend."""
    check_expert_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor)
    impl = resolve_backend(backend, ids.device, "expert_slots")
    return impl.expert_slots(ids=ids, modality=modality, n_ids=n_ids, n_modalities=n_modalities,
                             n_experts=n_experts, capacity_factor=capacity_factor)


def gated_residual(x, branch, gate, backend):
    """:func:`momkit.ops.gated_residual`, checked and run on its backend."""
    check_gated_residual(x, branch, gate)
    impl = resolve_backend(backend, x.device, "gated_residual", dtype=x.dtype)
    return impl.gated_residual(x=x, branch=branch, gate=gate)


def gated_mix(x, y, gate, backend):
    """:func:`momkit.ops.gated_mix`, checked and run on its backend."""
    check_gated_mix(x, y, gate)
    impl = resolve_backend(backend, x.device, "gated_mix", dtype=x.dtype)
    return impl.gated_mix(x=x, y=y, gate=gate)
