"""Kernel front doors: one call per operation, the argument check, and the choice of backend.

:func:`selective_scan` takes the arguments and shapes of mamba_ssm's ``selective_scan_fn`` and
:func:`ssd_scan` those of ``mamba_chunk_scan_combined``, so either can replace the peer's call without
reshaping a tensor; likewise :func:`causal_conv1d` (causal-conv1d's ``causal_conv1d_fn``) for training, and
:func:`selective_state_update` (mamba_ssm's function of that name) and :func:`conv_state_update` (causal-conv1d's
``causal_conv1d_update``) for decoding one position.
:func:`routed_linear` is the routed projection; :func:`router_logits` is a learned router's logits,
:func:`expert_slots` where its choices go (their order grouped by expert, the capacity's mask, the counts), and
:func:`gated_residual` and :func:`gated_mix` mix its experts' outputs into the residual stream. Every argument is
checked here, before any backend runs.

Each front door takes ``backend=``: a registered backend name or ``"auto"``, which picks, per operation, the
available backend that ranks highest for it (:meth:`momkit.descriptors.ScanBackend.rank`) among those that
run the call (its device, dtype and extensions). A named backend runs every operation it implements; an
operation it does not implement at all runs on the ``"auto"`` choice, so one name (a spec's
``scan_backend``) can be passed to every operation of a block. ``backend=`` may also map operation names to
backends (``{"selective_scan": "cuda", "default": "auto"}``), so a spec can choose per operation.

Inside :func:`unchecked` the front doors skip their argument checks, for loops of calls already checked once.
"""

from __future__ import annotations

import torch

from momkit.errors import SpecError
from momkit.ops import dispatch, library
from momkit.ops.checks import SIXTEEN_BIT, check_conv_state_update, check_selective_state_update, unchecked
from momkit.ops.dispatch import _extensions, backend_name, resolve_backend
from momkit.registry import get_registry

__all__ = ["available_backends", "causal_conv1d", "conv_state_update", "expert_slots", "gated_mix", "gated_residual",
           "resolve_backend", "routed_linear", "router_logits", "selective_scan", "selective_state_update", "ssd_scan",
           "unchecked"]


def available_backends() -> list[str]:
    """Names of the registered scan backends that can run in this process, in registry order."""
    return [b.name for b in get_registry().scan_backends.values() if b.is_available()]


def _traceable(op: str, **unsupported) -> None:
    """Refuse, while ``torch.compile`` traces, the arguments its operator of ``op`` does not take."""
    asked = [name for name, value in unsupported.items() if value]
    if asked:
        raise SpecError(f"{op} with {', '.join(asked)} is not available under torch.compile; call it eagerly")


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, *, modality=None, seq_idx=None, initial_state=None, backend="auto"):
    """Mamba-1 selective scan with the interface of mamba_ssm's ``selective_scan_fn``, plus three extensions.

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
        initial_state: optional ``(b, d, n)`` state before the first position (the decoding state a prefill
            starts from), differentiable; mamba_ssm's selective scan lacks it (state-spaces/mamba#175).
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out`` ``(b, d, l)`` in ``u``'s dtype, and the last state in float32 (float64 for float64 inputs)
        when ``return_last_state``.
    """
    if torch.compiler.is_compiling():
        _traceable("selective_scan", return_last_state=return_last_state, initial_state=initial_state is not None)
        return library.selective_scan(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus,
                                      backend_name(backend, "selective_scan"))
    return dispatch.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                   modality, seq_idx, backend, initial_state)


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
    if torch.compiler.is_compiling():
        _traceable("ssd_scan", return_final_states=return_final_states)
        return library.ssd_scan(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, modality, chunk_size,
                                dt_softplus, backend_name(backend, "ssd_scan"))
    return dispatch.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                             return_final_states, modality, backend)


def routed_linear(x, weight, bias, modality, *, order=None, groups=None, backend="auto"):
    """``y = x W_m^T + b_m`` with each position's own modality ``m``: the routed projection.

    Args:
        x: ``(..., in)``.
        weight: ``(M, out, in)``, one matrix per modality, in ``x``'s dtype, or in float32 with a bfloat16 or
            float16 ``x`` (master weights: rounded to ``x``'s dtype for the products, their gradient in float32).
        bias: optional ``(M, out)``, in ``weight``'s dtype.
        modality: ``x``'s leading shape ``(...)``, int64 ids in ``0..M-1``.
        order: optional ``(positions,)`` int64 permutation of the flattened positions that groups them by id
            (``torch.argsort(modality.reshape(-1), stable=True)``), for ids in no order such as a router's expert
            choices: a backend that takes it (the ``triton`` one) forms its tiles in that order without moving a
            position. A hint: the result does not depend on it, and a backend that does not take it runs
            without it. Checked to be a permutation on the CPU only.
        groups: optional ``(M,)`` integer tensor, for positions that already lie grouped by id in id order (the
            flattened ``modality`` non-decreasing): ``groups[i]`` is where id ``i``'s positions end, the
            cumulative count of ids up to ``i``. A hint as ``order`` is: a backend that takes it (the ``reference``
            and ``triton`` ones) multiplies each id's rows where they lie, without sorting them; the ``triton``
            one, for bfloat16 ``x`` on a GPU of compute capability 9.0 or later, through PyTorch's grouped GEMM
            (``torch.nn.functional.grouped_mm``). Checked against ``modality`` on the CPU only; not with ``order``.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``(..., out)`` in ``x``'s dtype. A modality absent from ``modality`` gets exactly zero gradient.
        Under autocast, ``x`` is first cast to the autocast dtype, and ``weight`` and ``bias`` too unless they
        are float32: then they are master weights as above, which a backend with the ``"float32_weights"``
        extension (the ``triton`` one) receives as they are and others receive cast. Either way the products
        are those of ``torch.nn.functional.linear`` under autocast.
    """
    if isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and \
            torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x = x.to(dtype)
        wide = weight.dtype == torch.float32 and dtype in SIXTEEN_BIT
        weight = weight if wide else weight.to(dtype)
        bias = None if bias is None else bias.to(weight.dtype)
    if torch.compiler.is_compiling():
        return library.routed_linear(x, weight, bias, modality, order, groups,
                                     backend_name(backend, "routed_linear"))
    return dispatch.routed_linear(x, weight, bias, modality, backend, order, groups)


def router_logits(x, weight, modality=None, *, eps=1e-6, backend="auto"):
    """The logits of a learned router: ``rms(x) W^T`` (``rms`` the RMS normalisation without a gain), computed
    in float32 at least, also under autocast (Switch Transformer's selective precision).

    Args:
        x: ``(..., d)`` the tokens.
        weight: ``(e, d)``, or ``(M, e, d)``: one router per modality, each position using its modality's;
            in ``x``'s dtype or float32.
        modality: ``x``'s leading shape ``(...)``, int64 ids in ``0..M-1``; needed with a ``(M, e, d)`` weight.
        eps: added to the mean square before its square root.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``(..., e)`` in the wider of ``x``'s and ``weight``'s dtypes and float32.
    """
    if torch.compiler.is_compiling():
        return library.router_logits(x, weight, modality, float(eps), backend_name(backend, "router_logits"))
    return dispatch.router_logits(x, weight, modality, eps, backend)


def expert_slots(ids, modality, n_ids, n_modalities, *, n_experts, capacity_factor=None, backend="auto"):
    """Where the token slots of a learned router's choice go: ``ids (N, top_k)`` holds slot ``j`` of token ``n``,
    and the slots are taken slot-major (slot 0 of every token, then slot 1), tokens in order.

    Expert ids ``0..n_ids-1`` come in router sets of ``n_experts`` (set ``s`` holds ids ``s * n_experts`` to ``(s
    + 1) * n_experts - 1``: one set, or one per modality). With a ``capacity_factor``, id ``i`` of set ``s`` keeps
    its first ``ceil(capacity_factor * top_k * tokens_s / n_experts)`` slots in that order, ``tokens_s`` the tokens
    whose slots chose set ``s``'s ids (their picks over ``top_k``); it is computed in float64, as Python's
    arithmetic is. Nothing is read on the host.

    Args:
        ids: ``(N, top_k)`` integer expert ids.
        modality: ``(N,)`` integer modality ids in ``0..n_modalities-1``, for the counts.
        n_ids: how many expert ids there are (a multiple of ``n_experts``).
        n_modalities: ``M``.
        n_experts: ids per router set.
        capacity_factor: a positive number, or ``None`` (every slot kept).
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``order (N * top_k,)`` int64, the stable argsort of ``ids.t()`` flattened (with ``top_k = 1`` the order
        that groups the tokens by expert, :func:`routed_linear`'s ``order``); ``keep (N, top_k)`` bool, the slots
        the capacity keeps; ``picks (n_ids,)`` int64, the slots that chose each id; ``counts (M, n_ids)`` int64,
        the kept slots per modality and id; ``dropped`` a 0-d int64 tensor, the slots not kept.
    """
    if torch.compiler.is_compiling():
        return library.expert_slots(ids, modality, n_ids, n_modalities, n_experts,
                                    None if capacity_factor is None else float(capacity_factor),
                                    backend_name(backend, "expert_slots"))
    return dispatch.expert_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor, backend)


def gated_residual(x, branch, gate, *, backend="auto"):
    """``x + gate branch``: a residual branch added with one weight per position, the mix of a block with learned
    experts whose class has a residual branch (:attr:`momkit.Block.residual`, :mod:`momkit.experts`). A backend
    may compute it, and its backward, in one pass each; the input's gradient is the output's.

    Args:
        x: ``(..., d)``, the residual stream.
        branch: ``(..., d)``, of any floating dtype (a 16-bit branch under autocast beside a float32 ``x``).
        gate: ``(..., 1)``, in ``x``'s dtype.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``(..., d)`` in the dtype that ``x + branch`` has (``torch.promote_types``).
    """
    if torch.compiler.is_compiling():
        return library.gated_residual(x, branch, gate, backend_name(backend, "gated_residual"))
    return dispatch.gated_residual(x, branch, gate, backend)


def gated_mix(x, y, gate, *, backend="auto"):
    """``x + gate (y - x)``: ``torch.lerp`` with one weight per position, the mix of a block with learned
    experts (:mod:`momkit.experts`) whose class has no residual branch, and of every block's decoding step;
    a backend may compute its backward in one pass.

    Args:
        x: ``(..., d)``.
        y: ``(..., d)``, in ``x``'s dtype.
        gate: ``(..., 1)``, in ``x``'s dtype.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``(..., d)`` in ``x``'s dtype.
    """
    if torch.compiler.is_compiling():
        return library.gated_mix(x, y, gate, backend_name(backend, "gated_mix"))
    return dispatch.gated_mix(x, y, gate, backend)


def causal_conv1d(x, weight, bias=None, seq_idx=None, *, modality=None, backend="auto"):
    """Depthwise causal convolution over time: causal-conv1d's ``causal_conv1d_fn`` (without an activation),
    plus ``modality``.

    ``out[:, c, t] = bias[c] + sum_j weight[c, j] x[:, c, t - k + 1 + j]``, an input before the row's start or,
    with ``seq_idx``, of another document taken as zero.

    Args:
        x: ``(b, c, l)`` input.
        weight: ``(c, k)``; with ``modality``, optionally ``(M, c, k)``, each output position using its own
            modality's weights.
        bias: optional ``(c,)``; with ``modality``, optionally ``(M, c)``.
        seq_idx: optional ``(b, l)`` integer document index of each position for packed sequences.
        modality: optional ``(b, l)`` int64, picking the rows of every parameter given per modality.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out (b, c, l)`` in ``x``'s dtype (summed in float32 at least).
    """
    if torch.compiler.is_compiling():
        return library.causal_conv1d(x, weight, bias, seq_idx, modality, backend_name(backend, "causal_conv1d"))
    return dispatch.causal_conv1d(x, weight, bias, seq_idx, modality, backend)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, *,
                           modality=None, backend="auto"):
    """One position of the selective scan, updating ``state`` in place; mamba_ssm's interface plus ``modality``.

    ``state = exp(dt A) state + dt x B``, ``out = (state C + D x) silu(z)``, with ``dt`` first shifted by
    ``dt_bias`` and passed through softplus when ``dt_softplus``. Two layouts: Mamba-1's channels ``(d,)``,
    or Mamba-2's heads ``(h, p)`` (whose per-head ``dt``, ``A``, ``D`` and ``dt_bias`` are passed expanded
    over ``p``, as stride-0 views).

    Args:
        state: ``(b, d, n)`` or ``(b, h, p, n)``, float32; updated in place.
        x: ``(b, d)`` or ``(b, h, p)``.
        dt: same shape as ``x``.
        A: ``(d, n)`` or ``(h, p, n)``; with ``modality``, optionally ``(M, d, n)`` or ``(M, h, p, n)``.
        B: ``(b, n)``, or ``(b, g, n)`` for heads, each group shared by ``h / g`` heads.
        C: same shape as ``B``.
        D: optional ``(d,)`` or ``(h, p)``; with ``modality``, optionally one per modality (a leading ``M``).
        z: optional gate, same shape as ``x``.
        dt_bias: optional, shaped as ``D``.
        dt_softplus: apply softplus to ``dt + dt_bias``.
        modality: optional ``(b,)`` int64 modality of each sequence's position, which picks the rows of every
            parameter given per modality.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out``, shaped as ``x``, in ``x``'s dtype.
    """
    check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, modality)
    impl = resolve_backend(backend, state.device, "selective_state_update",
                           _extensions(modality=modality), state.dtype)
    return impl.selective_state_update(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
                                       dt_softplus=dt_softplus, modality=modality)


def conv_state_update(x, conv_state, weight, bias=None, activation=None, *, modality=None, backend="auto"):
    """One position of a depthwise causal convolution: causal-conv1d's ``causal_conv1d_update`` plus ``modality``.

    ``conv_state`` holds the last ``k`` inputs, oldest first; it is shifted by one and ``x`` appended, in
    place, then ``out = sum_j conv_state[:, :, j] weight[:, j] + bias``, optionally through silu.

    Args:
        x: ``(b, c)`` the new input.
        conv_state: ``(b, c, k)``; updated in place.
        weight: ``(c, k)``; with ``modality``, optionally ``(M, c, k)``.
        bias: optional ``(c,)``; with ``modality``, optionally ``(M, c)``.
        activation: ``None`` or ``"silu"``.
        modality: optional ``(b,)`` int64, picking the rows of every parameter given per modality.
        backend: a registered backend name, or ``"auto"``.

    Returns:
        ``out (b, c)`` in ``x``'s dtype.
    """
    check_conv_state_update(x, conv_state, weight, bias, activation, modality)
    impl = resolve_backend(backend, x.device, "conv_state_update", _extensions(modality=modality), x.dtype)
    return impl.conv_state_update(x=x, conv_state=conv_state, weight=weight, bias=bias, activation=activation,
                                  modality=modality)
