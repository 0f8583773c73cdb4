"""Argument checks of the front doors: every error names the argument, what it got and what is valid.

Shapes, dtypes and devices are checked for every call. The values of an index tensor (``modality``) are
checked on the CPU only: on a GPU, reading them would make the host wait for the device at every layer. There
the model checks a batch's ids once per call (:meth:`momkit.Model.check`).

Inside :func:`unchecked`, the front doors skip these checks: for a loop that repeats calls whose arguments were
checked once, such as the steps of eager decoding after the first.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from momkit.errors import SpecError

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SIXTEEN_BIT = (torch.float16, torch.bfloat16)
_UNCHECKED = contextvars.ContextVar("momkit_unchecked", default=False)


@contextlib.contextmanager
def unchecked():
    """Inside, the kernel front doors do not check their arguments (the choice of backend is unchanged).

    For a loop whose calls repeat the shapes, dtypes and devices of calls already checked: there the checks are
    Python run again for nothing, about 15% of an eagerly decoded step's host time. A wrong argument inside is not
    reported: it fails in a backend, or silently gives a wrong result.
    """
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)


def _front_door(check):
    """``check``, skipped inside :func:`unchecked`."""
    @functools.wraps(check)
    def run(*args) -> None:
        if not _UNCHECKED.get():
            check(*args)
    return run


def _fmt(shape) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def expect_tensor(name: str, value, shapes: dict[str, tuple], device: torch.device, floating: bool = True):
    """Check that ``value`` is a tensor on ``device`` with one of ``shapes`` (labelled by their einops form).

    ``None`` entries in a shape accept any size (one not yet known).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device != device:
        raise SpecError(f"{name} is on {value.device} but the other inputs are on {device}; "
                        f"move every input to one device")
    if floating and value.dtype not in FLOATS:
        raise SpecError(f"{name} has dtype {value.dtype}; expected one of {[str(d) for d in FLOATS]}")
    if not floating and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise SpecError(f"{name} has dtype {value.dtype}; expected an integer dtype (int32 or int64)")
    for shape in shapes.values():
        if value.dim() == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape)):
            return
    wanted = " or ".join(f"{label} = {_fmt(s)}" for label, s in shapes.items())
    raise SpecError(f"{name} has shape {_fmt(value.shape)}; expected {wanted}")


def _check_A(A, modality, labels: tuple[str, str], shape: tuple, batch: int, length: int, device):
    """``A`` of ``shape``; or, with ``modality``, per modality: a leading ``M`` that ``modality`` indexes.

    ``labels`` are the einops forms of the two cases, for the error message.
    """
    if modality is None:
        expect_tensor("A", A, {labels[0]: shape}, device)
        return
    expect_tensor("A", A, {labels[1]: (None, *shape)}, device)
    expect_tensor("modality", modality, {"(b, l)": (batch, length)}, device, floating=False)
    check_ids(modality, A.shape[0], "A")


def check_ids(modality: torch.Tensor, count: int, holder: str | None = None, names=None, label: str = "modality",
              cpu_only: bool = True) -> None:
    """Check that every id of ``modality`` indexes one of ``count`` modalities (those of ``holder``, or named
    ``names`` in id order, for the message); with ``cpu_only``, only for a tensor on the CPU; not while
    ``torch.compile`` traces (the traced operators check their ids when the graph runs)."""
    if (cpu_only and modality.device.type != "cpu") or not modality.numel() or torch.compiler.is_compiling():
        return
    low, high = int(modality.min()), int(modality.max())
    if low < 0 or high >= count:
        owner = "" if holder is None else f" but {holder} has {count} modalities"
        valid = ", ".join(f"{i} = {name}" for i, name in enumerate(names)) if names else f"0..{count - 1}"
        raise SpecError(f"{label} holds ids in [{low}, {high}]{owner}; valid ids: {valid}")


@_front_door
def check_selective_scan(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, initial_state=None) -> None:
    """Check the arguments of :func:`momkit.ops.selective_scan`."""
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"u must be a torch.Tensor, got {type(u).__name__}")
    expect_tensor("u", u, {"(b, d, l)": (None, None, None)}, u.device)
    batch, dim, length = u.shape
    dev = u.device
    expect_tensor("delta", delta, {"(b, d, l)": (batch, dim, length)}, dev)
    state = A.shape[-1] if isinstance(A, torch.Tensor) and A.dim() >= 2 else None
    _check_A(A, modality, ("(d, n)", "(M, d, n)"), (dim, None), batch, length, dev)
    expect_tensor("B", B, {"(b, n, l)": (batch, state, length), "(b, g, n, l)": (batch, None, state, length)},
                  dev)
    expect_tensor("C", C, {"same as B": tuple(B.shape)}, dev)
    if B.dim() == 4 and dim % B.shape[1]:
        raise SpecError(f"B has {B.shape[1]} groups, which does not divide d = {dim}; "
                        f"valid group counts divide {dim}")
    if D is not None:
        expect_tensor("D", D, {"(d,)": (dim,)}, dev)
    if z is not None:
        expect_tensor("z", z, {"(b, d, l)": (batch, dim, length)}, dev)
    if delta_bias is not None:
        expect_tensor("delta_bias", delta_bias, {"(d,)": (dim,)}, dev)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, {"(b, l)": (batch, length)}, dev, floating=False)
    if initial_state is not None:
        expect_tensor("initial_state", initial_state, {"(b, d, n)": (batch, dim, state)}, dev)


@_front_door
def check_ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, modality) -> None:
    """Check the arguments of :func:`momkit.ops.ssd_scan`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    expect_tensor("x", x, {"(b, l, h, p)": (None, None, None, None)}, x.device)
    batch, length, heads, headdim = x.shape
    dev = x.device
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise SpecError(f"chunk_size must be a positive int, got {chunk_size!r}")
    expect_tensor("dt", dt, {"(b, l, h)": (batch, length, heads)}, dev)
    _check_A(A, modality, ("(h,)", "(M, h)"), (heads,), batch, length, dev)
    expect_tensor("B", B, {"(b, l, g, n)": (batch, length, None, None)}, dev)
    expect_tensor("C", C, {"same as B": tuple(B.shape)}, dev)
    if heads % B.shape[2]:
        raise SpecError(f"B has {B.shape[2]} groups, which does not divide h = {heads}; "
                        f"valid group counts divide {heads}")
    if D is not None:
        expect_tensor("D", D, {"(h,)": (heads,), "(h, p)": (heads, headdim)}, dev)
    if z is not None:
        expect_tensor("z", z, {"(b, l, h, p)": (batch, length, heads, headdim)}, dev)
    if dt_bias is not None:
        expect_tensor("dt_bias", dt_bias, {"(h,)": (heads,)}, dev)
    if initial_states is not None:
        expect_tensor("initial_states", initial_states, {"(b, h, p, n)": (batch, heads, headdim, B.shape[3])},
                      dev)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, {"(b, l)": (batch, length)}, dev, floating=False)


def _head(values: torch.Tensor) -> str:
    """The first eight of ``values``, for an error message."""
    return f"{values.tolist()[:8]}{' ...' if len(values) > 8 else ''}"


def _expect_features(x, label: str) -> None:
    """``x`` a tensor of at least one dimension, whose last is named ``label`` in the error."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor of shape (..., {label}), got "
                        f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")


@_front_door
def check_routed_linear(x, weight, bias, modality, order=None, groups=None) -> None:
    """Check the arguments of :func:`momkit.ops.routed_linear`; ``order`` is a permutation of the positions, and
    ``groups`` the ends of sorted ids' groups, only checked on the CPU (on a GPU that would wait for the
    device)."""
    _expect_features(x, "in_features")
    expect_tensor("weight", weight, {"(M, out, in)": (None, None, x.shape[-1])}, x.device)
    if weight.dtype != x.dtype and not (weight.dtype == torch.float32 and x.dtype in SIXTEEN_BIT):
        raise SpecError(f"weight has dtype {weight.dtype} but x has {x.dtype}; pass weight in x's dtype, or in "
                        f"torch.float32 with a bfloat16 or float16 x")
    if bias is not None:
        expect_tensor("bias", bias, {"(M, out)": tuple(weight.shape[:2])}, x.device)
        if bias.dtype != weight.dtype:
            raise SpecError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; pass both in one dtype")
    expect_tensor("modality", modality, {"x's leading shape": tuple(x.shape[:-1])}, x.device, floating=False)
    check_ids(modality, weight.shape[0], "weight")
    if order is not None:
        expect_tensor("order", order, {"(positions,)": (modality.numel(),)}, x.device, floating=False)
        if order.device.type == "cpu" and not torch.compiler.is_compiling() and \
                not torch.equal(torch.sort(order).values, torch.arange(len(order), dtype=order.dtype)):
            raise SpecError(f"order must be a permutation of 0..{len(order) - 1} (an argsort of the flattened "
                            f"modality), got {_head(order)}")
    if groups is not None:
        if order is not None:
            raise SpecError("pass order (positions in any order) or groups (positions sorted by id), not both")
        expect_tensor("groups", groups, {"(M,)": (weight.shape[0],)}, x.device, floating=False)
        if groups.device.type == "cpu" and not torch.compiler.is_compiling():
            flat = modality.reshape(-1)
            falls = (flat[1:] < flat[:-1]).nonzero()
            if len(falls):
                raise SpecError(f"groups needs the positions sorted by id, but modality falls from "
                                f"{int(flat[falls[0, 0]])} to {int(flat[falls[0, 0] + 1])} at position "
                                f"{int(falls[0, 0]) + 1}; sort them, or pass order instead")
            ends = torch.bincount(flat, minlength=weight.shape[0]).cumsum(0)
            if not torch.equal(groups.long(), ends):
                raise SpecError(f"groups must hold where each id's positions end, {_head(ends)}; got "
                                f"{_head(groups)}")


@_front_door
def check_router_logits(x, weight, modality, eps) -> None:
    """Check the arguments of :func:`momkit.ops.router_logits`."""
    _expect_features(x, "d")
    expect_tensor("x", x, {"(..., d)": (None,) * x.dim()}, x.device)
    expect_tensor("weight", weight, {"(e, d)": (None, x.shape[-1]), "(M, e, d)": (None, None, x.shape[-1])},
                  x.device)
    if weight.dtype not in (x.dtype, torch.float32):
        raise SpecError(f"weight has dtype {weight.dtype} but x has {x.dtype}; pass weight in x's dtype or in "
                        f"torch.float32")
    if weight.dim() == 3:
        if modality is None:
            raise SpecError("weight (M, e, d) holds one router per modality; pass modality (...) to pick each "
                            "position's")
        expect_tensor("modality", modality, {"x's leading shape": tuple(x.shape[:-1])}, x.device, floating=False)
        check_ids(modality, weight.shape[0], "weight")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise SpecError(f"eps must be a positive number, got {eps!r}")


@_front_door
def check_expert_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor) -> None:
    """Check the arguments of :func:`momkit.ops.expert_slots`."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor of shape (N, top_k), got {type(ids).__name__}")
    expect_tensor("ids", ids, {"(N, top_k)": (None, None)}, ids.device, floating=False)
    expect_tensor("modality", modality, {"(N,)": (ids.shape[0],)}, ids.device, floating=False)
    for name, value in (("n_ids", n_ids), ("n_modalities", n_modalities), ("n_experts", n_experts)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SpecError(f"{name} must be a positive int, got {value!r}")
    if n_ids % n_experts:
        raise SpecError(f"n_ids ({n_ids}) must be a multiple of n_experts ({n_experts}): the ids of router set s "
                        f"are s * n_experts .. (s + 1) * n_experts - 1")
    if capacity_factor is not None and (not isinstance(capacity_factor, (int, float)) or
                                        isinstance(capacity_factor, bool) or not capacity_factor > 0):
        raise SpecError(f"capacity_factor must be a positive number, or None for no capacity, got "
                        f"{capacity_factor!r}")
    check_ids(ids, n_ids, label="ids")
    check_ids(modality, n_modalities)


def _expect_gated(x, name: str, other, gate) -> None:
    """The shapes and devices of a gated mix's ``x (..., d)``, its ``other`` input (named ``name``) of ``x``'s shape,
    and ``gate (..., 1)``; their dtypes are the caller's to check."""
    _expect_features(x, "d")
    expect_tensor("x", x, {"(..., d)": (None,) * x.dim()}, x.device)
    expect_tensor(name, other, {"x's shape": tuple(x.shape)}, x.device)
    expect_tensor("gate", gate, {"(..., 1)": (*x.shape[:-1], 1)}, x.device)


@_front_door
def check_gated_mix(x, y, gate) -> None:
    """Check the arguments of :func:`momkit.ops.gated_mix`."""
    _expect_gated(x, "y", y, gate)
    for name, t in (("y", y), ("gate", gate)):
        if t.dtype != x.dtype:
            raise SpecError(f"{name} has dtype {t.dtype} but x has {x.dtype}; pass x, y and gate in one dtype")


@_front_door
def check_gated_residual(x, branch, gate) -> None:
    """Check the arguments of :func:`momkit.ops.gated_residual`."""
    _expect_gated(x, "branch", branch, gate)
    if gate.dtype != x.dtype:
        raise SpecError(f"gate has dtype {gate.dtype} but x has {x.dtype}; pass gate in x's dtype")


def _routable(name, value, shape: tuple, labels: str, modality, device) -> None:
    """``value`` of ``shape``, or with ``modality`` optionally one per modality (a leading ``M``)."""
    shapes = {labels: shape}
    if modality is not None:
        shapes[f"(M, {labels.strip('(,)')})"] = (None, *shape)
    expect_tensor(name, value, shapes, device)
    if value.dim() > len(shape):
        check_ids(modality, value.shape[0], name)


@_front_door
def check_selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, modality) -> None:
    """Check the arguments of :func:`momkit.ops.selective_state_update`."""
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"state must be a torch.Tensor, got {type(state).__name__}")
    dev = state.device
    expect_tensor("state", state, {"(b, d, n)": (None, None, None), "(b, h, p, n)": (None,) * 4}, dev)
    heads = state.dim() == 4
    batch, n = state.shape[0], state.shape[-1]
    channels = tuple(state.shape[1:-1])
    form = "(b, h, p)" if heads else "(b, d)"
    per_channel = "(h, p)" if heads else "(d,)"
    expect_tensor("x", x, {form: (batch, *channels)}, dev)
    expect_tensor("dt", dt, {form: (batch, *channels)}, dev)
    if modality is not None:
        expect_tensor("modality", modality, {"(b,)": (batch,)}, dev, floating=False)
    _routable("A", A, (*channels, n), "(h, p, n)" if heads else "(d, n)", modality, dev)
    bc = {"(b, g, n)": (batch, None, n)} if heads else {"(b, n)": (batch, n)}
    expect_tensor("B", B, bc, dev)
    expect_tensor("C", C, {"same as B": tuple(B.shape)}, dev)
    if heads and channels[0] % B.shape[1]:
        raise SpecError(f"B has {B.shape[1]} groups, which does not divide h = {channels[0]}; "
                        f"valid group counts divide {channels[0]}")
    for name, value in (("D", D), ("dt_bias", dt_bias)):
        if value is not None:
            _routable(name, value, channels, per_channel, modality, dev)
    if z is not None:
        expect_tensor("z", z, {form: (batch, *channels)}, dev)
    if state.dtype not in (torch.float32, torch.float64):
        raise SpecError(f"state has dtype {state.dtype}; expected torch.float32 (or torch.float64)")


@_front_door
def check_conv_state_update(x, conv_state, weight, bias, activation, modality) -> None:
    """Check the arguments of :func:`momkit.ops.conv_state_update`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    expect_tensor("x", x, {"(b, c)": (None, None)}, x.device)
    batch, channels = x.shape
    expect_tensor("conv_state", conv_state, {"(b, c, k)": (batch, channels, None)}, x.device)
    if modality is not None:
        expect_tensor("modality", modality, {"(b,)": (batch,)}, x.device, floating=False)
    _routable("weight", weight, (channels, conv_state.shape[-1]), "(c, k)", modality, x.device)
    if bias is not None:
        _routable("bias", bias, (channels,), "(c,)", modality, x.device)
    if activation not in (None, "silu"):
        raise SpecError(f"activation must be None or 'silu', got {activation!r}")


@_front_door
def check_causal_conv1d(x, weight, bias, seq_idx, modality) -> None:
    """Check the arguments of :func:`momkit.ops.causal_conv1d`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    expect_tensor("x", x, {"(b, c, l)": (None, None, None)}, x.device)
    batch, channels, length = x.shape
    if modality is not None:
        expect_tensor("modality", modality, {"(b, l)": (batch, length)}, x.device, floating=False)
    _routable("weight", weight, (channels, None), "(c, k)", modality, x.device)
    if bias is not None:
        _routable("bias", bias, (channels,), "(c,)", modality, x.device)
    if seq_idx is not None:
        expect_tensor("seq_idx", seq_idx, {"(b, l)": (batch, length)}, x.device, floating=False)
