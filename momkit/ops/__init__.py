"""Scan front doors: one call per scan, the argument check, and the choice of backend.

:func:`selective_scan` takes the arguments and shapes of mamba_ssm's ``selective_scan_fn`` and
:func:`ssd_scan` those of ``mamba_chunk_scan_combined``, so either can replace the peer's call without
reshaping a tensor. Every argument is checked here, before any backend runs.
"""

from __future__ import annotations

import torch

from momkit.ops.backend import ScanBackend
from momkit.ops.checks import check_selective_scan, check_ssd_scan

__all__ = ["ScanBackend", "available_backends", "resolve_backend", "selective_scan", "ssd_scan"]


def available_backends() -> list[str]:
    """Names of the registered scan backends that can run in this process, in registry order."""
    from momkit.registry import get_registry

    return [b.name for b in get_registry().scan_backends.values() if b.is_available()]


def resolve_backend(name: str, device: torch.device | str, op: str, extensions=frozenset()) -> ScanBackend:
    """The backend ``name`` (or, for ``"auto"``, the best one) that runs ``op`` on ``device``.

    ``extensions`` are the front-door extensions the call uses (see :class:`ScanBackend`).

    Raises:
        ValueError: ``name`` is not registered, cannot run here, or lacks ``op``, the device or an extension;
            the message lists the backends that would do.
    """
    from momkit.registry import get_registry

    device_type = torch.device(device).type
    backends = get_registry().scan_backends

    def fits(b: ScanBackend) -> bool:
        return (getattr(b, op) is not None and device_type in b.devices and extensions <= b.extensions
                and b.is_available())

    suitable = sorted((b for b in backends.values() if fits(b)), key=lambda b: -b.priority)
    need = f"{op} on {device_type}" + "".join(f" with {e}" for e in sorted(extensions))
    if name == "auto":
        if not suitable:
            raise ValueError(f"no scan backend runs {need}; registered backends: {sorted(backends)}")
        return suitable[0]
    if name not in backends:
        raise ValueError(f"unknown scan backend {name!r}; registered backends: {sorted(backends)} or 'auto'")
    if not fits(backends[name]):
        raise ValueError(f"scan backend {name!r} cannot run {need} in this process; "
                         f"backends that can: {[b.name for b in suitable] or 'none'}")
    return backends[name]


def _extensions(**used) -> frozenset[str]:
    return frozenset(name for name, value in used.items() if value is not None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, modality=None, seq_idx=None, backend="auto"):
    """Mamba-1 selective scan with the interface of mamba_ssm's ``selective_scan_fn``, plus two extensions.

    ``h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t`` and ``out_t = (C_t h_t + D u_t) silu(z_t)``, with
    ``delta`` first shifted by ``delta_bias`` and passed through softplus when ``delta_softplus``.

    Args:
        u: ``(b, d, l)`` input.
        delta: ``(b, d, l)`` step sizes.
        A: ``(d, n)`` real state matrix; or ``(M, d, n)``, one per modality, with ``modality``.
        B: ``(b, n, l)``, or ``(b, g, n, l)`` shared by ``d / g`` channels each.
        C: same shape as ``B``.
        D: optional ``(d,)`` skip connection.
        z: optional ``(b, d, l)`` gate.
        delta_bias: optional ``(d,)``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        return_last_state: also return the state after the last position, ``(b, d, n)``.
        modality: ``(b, l)`` int64 modality of each position, only with a per-modality ``A``.
        seq_idx: optional ``(b, l)`` integer document index of each position for packed sequences: the state
            restarts from zero where it changes (as in :func:`ssd_scan`; mamba_ssm's selective scan lacks it).
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out`` ``(b, d, l)`` in ``u``'s dtype, and the last state in float32 (float64 for float64 inputs)
        when ``return_last_state``.
    """
    check_selective_scan(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx)
    impl = resolve_backend(backend, u.device, "selective_scan", _extensions(modality=modality, seq_idx=seq_idx))
    return impl.selective_scan(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                               delta_softplus=delta_softplus, return_last_state=return_last_state,
                               modality=modality, seq_idx=seq_idx)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
             dt_softplus=False, return_final_states=False, *, modality=None, backend="auto"):
    """Mamba-2 state-space duality scan with the interface of mamba_ssm's ``mamba_chunk_scan_combined``.

    ``s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T`` and ``out_t = (s_t C_t + D x_t) silu(z_t)``, per head,
    with ``dt`` first shifted by ``dt_bias`` and passed through softplus when ``dt_softplus``.

    Args:
        x: ``(b, l, h, p)`` input.
        dt: ``(b, l, h)`` step sizes.
        A: ``(h,)`` one decay rate per head; or ``(M, h)``, one per modality, with ``modality``.
        B: ``(b, l, g, n)``, each group shared by ``h / g`` heads.
        C: same shape as ``B``.
        chunk_size: the chunk length of the algorithm; the result does not depend on it.
        D: optional ``(h,)`` or ``(h, p)`` skip connection.
        z: optional ``(b, l, h, p)`` gate.
        dt_bias: optional ``(h,)``.
        initial_states: optional ``(b, h, p, n)`` state before the first position.
        seq_idx: optional ``(b, l)`` integer document index of each position for packed sequences: the state
            restarts from zero where it changes and never crosses from one document to the next.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        return_final_states: also return the state after the last position, ``(b, h, p, n)``.
        modality: ``(b, l)`` int64 modality of each position, only with a per-modality ``A``.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out`` ``(b, l, h, p)`` in ``x``'s dtype, and the final states in float32 (float64 for float64
        inputs) when ``return_final_states``.
    """
    check_ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, modality)
    impl = resolve_backend(backend, x.device, "ssd_scan", _extensions(modality=modality))
    return impl.ssd_scan(x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
                         initial_states=initial_states, seq_idx=seq_idx, dt_softplus=dt_softplus,
                         return_final_states=return_final_states, modality=modality)
