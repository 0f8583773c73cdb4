"""The learned experts' memory-bound operations in Triton: the router's logits, the places of its token slots and
the two mixes of their outputs.

:func:`router_logits` (``rms(x) W_m^T``, :func:`momkit.ops.router_logits`) reads ``x`` once: a program per block
of rows sums, a block of columns at a time, both the squares of its rows and their products with the weights
(of every router set, each row keeping its own set's), and scales the products by ``rsqrt(mean square + eps)``
at the end, so the normalised input is never stored. Its backward has a program per group of rows and block of
columns. With ``r`` the rows' ``rsqrt``, ``l`` the logits and ``g`` their gradient, the input's gradient is
``r (g W_m) - x r^2 (g . l) / d`` (the second term the normalisation's), which needs only the block of columns,
and the program sums the weight gradient ``(r g)^T x`` of its rows, one set at a time. A sum over the groups
completes it, so the result does not depend on the order of atomic additions.

:func:`expert_slots` (:func:`momkit.ops.expert_slots`) is a counting sort of the slot-major ids in three launches,
where the reference takes about twenty torch operations (a radix sort, a search and scatters). Each program of the
first counts its block of slots per id (a one-hot sum over a ``BLOCK x IDS`` tile, ``IDS`` the ids rounded up to a
power of two); one program then turns those rows into each id's slots in the blocks before, and each id's first
place in the order and capacity (in float64, from its router set's picks); each program of the third ranks its
slots among their id's (the one-hot's running sum down the block) and writes each slot's place in the order, its
mask, and its kept and dropped slots with integer atomic additions, whose sums do not depend on their order. The
blocks shrink as the ids grow (``BLOCK x IDS`` stays 8,192 elements); above ``MOST_SLOT_IDS`` ids the torch
operations of :func:`momkit.experts.sort_slots` run.

:func:`gated_residual` (``x + gate branch``, :func:`momkit.ops.gated_residual`) and :func:`gated_mix` (``x + gate
(y - x)``, :func:`momkit.ops.gated_mix`) take a program per block of rows, forward and backward; each backward
computes its gradients in one pass, the gate's as a row sum. The residual's input gradient is the output's, so its
backward reads the output's gradient and the branch and writes the branch's and the gate's gradients only.
Everything is computed in float32 and stored in the inputs' dtypes. The router's products need float32's
precision, since its choices follow its logits' last bits; one TF32 product keeps 11 bits of each operand, so
each is three TF32 products (``input_precision="tf32x3"``), which also round the operands' remainders. At 16,384
x 1,024 inputs and 8 experts on an H200, the forward came within 2.2e-7 of float64 in 39 µs (5.7e-7 in 64 µs at
the best tiling with the products in full float32 on the CUDA cores, ``"ieee"``).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from momkit.experts import sort_slots
from momkit.kernels.triton.launch import Launcher
from momkit.kernels.triton.tiling import cdiv, refuse_float64

ROUTER_ROWS, ROUTER_COLUMNS = 64, 64
BACKWARD_ROWS, BACKWARD_COLUMNS = 32, 128
ROUTER_GROUPS = 32
MIX_ELEMENTS = 4096
SLOT_TILE = 8192
MOST_SLOT_IDS = 1024


@triton.jit
def _router_kernel(x_ptr, w_ptr, sets_ptr, out_ptr, rstd_ptr, n_rows, d, e, eps,
                   SETS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    expert_in = experts < e
    if SETS > 1:
        sets = tl.load(sets_ptr + rows, mask=row_in, other=0)
    squares = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_in = cols < d
        x = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=row_in[:, None] & col_in[None, :],
                    other=0.0).to(tl.float32)
        squares += tl.sum(x * x, 1)
        for s in tl.static_range(SETS):
            w = tl.load(w_ptr + (s * e + experts[:, None]) * d + cols[None, :],
                        mask=expert_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
            part = tl.dot(x, tl.trans(w), input_precision="tf32x3")
            if SETS > 1:
                part = tl.where((sets == s)[:, None], part, 0.0)
            acc += part
    rstd = tl.math.rsqrt(squares / d + eps)
    tl.store(out_ptr + rows[:, None] * e + experts[None, :], acc * rstd[:, None],
             mask=row_in[:, None] & expert_in[None, :])
    tl.store(rstd_ptr + rows, rstd, mask=row_in)


@triton.jit
def _router_backward_kernel(x_ptr, w_ptr, sets_ptr, rstd_ptr, logits_ptr, grad_ptr, dx_ptr, dw_ptr,
                            n_rows, d, e, group_rows,
                            SETS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_E: tl.constexpr):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_in = cols < d
    experts = tl.arange(0, BLOCK_E)
    expert_in = experts < e
    first = group * group_rows
    last = tl.minimum(first + group_rows, n_rows)
    for s in tl.static_range(SETS):
        w = tl.load(w_ptr + (s * e + experts[:, None]) * d + cols[None, :],
                    mask=expert_in[:, None] & col_in[None, :], other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK_E, BLOCK_D), tl.float32)
        for start in range(first, last, BLOCK_N):
            rows = start + tl.arange(0, BLOCK_N)
            mine = rows < last
            rows = rows.to(tl.int64)
            if SETS > 1:
                mine = mine & (tl.load(sets_ptr + rows, mask=mine, other=-1) == s)
            held = mine[:, None] & expert_in[None, :]
            grad = tl.load(grad_ptr + rows[:, None] * e + experts[None, :], mask=held, other=0.0).to(tl.float32)
            logits = tl.load(logits_ptr + rows[:, None] * e + experts[None, :], mask=held, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=mine, other=0.0)
            norm_term = rstd * rstd * tl.sum(grad * logits, 1) / d
            scaled = grad * rstd[:, None]
            tile = mine[:, None] & col_in[None, :]
            x = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=tile, other=0.0).to(tl.float32)
            dx = tl.dot(scaled, w, input_precision="tf32x3") - x * norm_term[:, None]
            tl.store(dx_ptr + rows[:, None] * d + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=tile)
            dw += tl.dot(tl.trans(scaled), x, input_precision="tf32x3")
        tl.store(dw_ptr + ((group * SETS + s) * e + experts[:, None]) * d + cols[None, :], dw,
                 mask=expert_in[:, None] & col_in[None, :])


@triton.jit
def _mix_kernel(x_ptr, y_ptr, gate_ptr, out_ptr, n_rows, d, RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """``out = x + gate y`` with ``RESIDUAL`` (``y`` a residual branch), else ``x + gate (y - x)``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    gate = tl.load(gate_ptr + rows, mask=row_in, other=0.0).to(tl.float32)[:, None]
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tile = row_in[:, None] & (cols < d)[None, :]
        at = rows[:, None] * d + cols[None, :]
        x = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + at, mask=tile, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (x + gate * (y if RESIDUAL else y - x)).to(out_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _mix_backward_kernel(x_ptr, y_ptr, gate_ptr, grad_ptr, dx_ptr, dy_ptr, dgate_ptr, n_rows, d,
                         RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradients of :func:`_mix_kernel`'s ``y`` and ``gate``, and without ``RESIDUAL`` of ``x`` (with it, the
    output's gradient is ``x``'s, and ``x`` is neither read nor written)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    rows = rows.to(tl.int64)
    gate = tl.load(gate_ptr + rows, mask=row_in, other=0.0).to(tl.float32)[:, None]
    dgate = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, d, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        tile = row_in[:, None] & (cols < d)[None, :]
        at = rows[:, None] * d + cols[None, :]
        grad = tl.load(grad_ptr + at, mask=tile, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + at, mask=tile, other=0.0).to(tl.float32)
        dy = grad * gate
        tl.store(dy_ptr + at, dy.to(dy_ptr.dtype.element_ty), mask=tile)
        if RESIDUAL:
            dgate += tl.sum(grad * y, 1)
        else:
            x = tl.load(x_ptr + at, mask=tile, other=0.0).to(tl.float32)
            tl.store(dx_ptr + at, (grad - dy).to(dx_ptr.dtype.element_ty), mask=tile)
            dgate += tl.sum(grad * (y - x), 1)
    tl.store(dgate_ptr + rows, dgate.to(dgate_ptr.dtype.element_ty), mask=row_in)


@triton.jit
def _slot_count_kernel(ids_ptr, table_ptr, n, k, slots, BLOCK: tl.constexpr, IDS: tl.constexpr):
    """Program ``p`` counts the slots ``p * BLOCK`` to ``(p + 1) * BLOCK - 1`` of each id into row ``p`` of the
    table; slot ``s`` (slot-major) is slot ``s // n`` of token ``s % n``."""
    at = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + (at % n) * k + at // n, mask=at < slots, other=-1)
    hits = (ids[:, None] == tl.arange(0, IDS)[None, :]).to(tl.int32)
    tl.store(table_ptr + tl.program_id(0) * IDS + tl.arange(0, IDS), tl.sum(hits, 0))


@triton.jit
def _slot_scan_kernel(table_ptr, picks_ptr, counts_ptr, dropped_ptr, programs, slots, n_ids, n_experts, k, n_counts,
                      FACTOR_BITS: tl.constexpr, ROWS: tl.constexpr, IDS: tl.constexpr):
    """One program: turns the table's rows into the slots of each id in the rows before (in place), stores each
    id's first place in the order (row ``programs``), its capacity (row ``programs + 1``) and picks, and zeroes
    the counts and the dropped slots. ``FACTOR_BITS`` holds the float64 bits of ``capacity_factor * k`` (0: no
    capacity)."""
    cols = tl.arange(0, IDS)
    carry = tl.zeros((IDS,), tl.int32)
    for first in range(0, programs, ROWS):
        rows = first + tl.arange(0, ROWS)
        inside = (rows < programs)[:, None]
        at = table_ptr + rows[:, None] * IDS + cols[None, :]
        part = tl.load(at, mask=inside, other=0)
        tl.store(at, tl.cumsum(part, 0) - part + carry[None, :], mask=inside)
        carry += tl.sum(part, 0)
    tl.store(table_ptr + programs * IDS + cols, tl.cumsum(carry, 0) - carry)
    tl.store(picks_ptr + cols, carry.to(tl.int64), mask=cols < n_ids)
    if FACTOR_BITS != 0:
        same_set = cols[:, None] // n_experts == cols[None, :] // n_experts
        tokens = tl.sum(tl.where(same_set, carry[None, :], 0), 1) // k
        factor = tl.full((IDS,), FACTOR_BITS, tl.int64).to(tl.float64, bitcast=True)
        capacity = tl.minimum(tl.math.ceil(factor * tokens.to(tl.float64) / n_experts), slots)
        tl.store(table_ptr + (programs + 1) * IDS + cols, capacity.to(tl.int32))
    for first in range(0, n_counts, IDS):
        tl.store(counts_ptr + first + cols, tl.zeros((IDS,), tl.int64), mask=first + cols < n_counts)
    tl.store(dropped_ptr, tl.zeros((), tl.int64))


@triton.jit
def _slot_place_kernel(ids_ptr, modality_ptr, table_ptr, order_ptr, keep_ptr, counts_ptr, dropped_ptr, n, k, slots,
                       programs, n_ids, n_modalities, CAPACITY: tl.constexpr, BLOCK: tl.constexpr,
                       IDS: tl.constexpr):
    """Program ``p`` places its slots: a slot's rank among its id's is the id's slots in the rows before plus
    those before it in the block; its place in the order is the id's first place plus that rank, and the capacity
    keeps it while the rank is below the id's. Adds the kept slots to the counts per modality and id, and the
    others to the dropped slots."""
    p = tl.program_id(0)
    at = p * BLOCK + tl.arange(0, BLOCK)
    live = at < slots
    token, slot = at % n, at // n
    ids = tl.load(ids_ptr + token * k + slot, mask=live, other=-1)
    cols = tl.arange(0, IDS)
    hits = (ids[:, None] == cols[None, :]).to(tl.int32)
    before = tl.load(table_ptr + p * IDS + cols)
    first = tl.load(table_ptr + programs * IDS + cols)
    rank = tl.sum(hits * (tl.cumsum(hits, 0) - 1 + before[None, :]), 1)
    tl.store(order_ptr + tl.sum(hits * first[None, :], 1) + rank, at.to(tl.int64), mask=live)
    kept = live
    if CAPACITY:
        capacity = tl.load(table_ptr + (programs + 1) * IDS + cols)
        kept = live & (rank < tl.sum(hits * capacity[None, :], 1))
    tl.store(keep_ptr + token * k + slot, kept, mask=live)
    modality = tl.load(modality_ptr + token, mask=live, other=-1)
    kept_hits = tl.where(kept[:, None], hits, 0)
    for m in range(0, n_modalities):
        per_id = tl.sum(tl.where((modality == m)[:, None], kept_hits, 0), 0).to(tl.int64)
        tl.atomic_add(counts_ptr + m * n_ids + cols, per_id, mask=(cols < n_ids) & (per_id > 0), sem="relaxed")
    tl.atomic_add(dropped_ptr, tl.sum((live & ~kept).to(tl.int64)), sem="relaxed")


_ROUTER = Launcher(_router_kernel, pointers=5)
_ROUTER_BACKWARD = Launcher(_router_backward_kernel, pointers=8)
_MIX = Launcher(_mix_kernel, pointers=4)
_MIX_BACKWARD = Launcher(_mix_backward_kernel, pointers=7)
_SLOT_COUNT = Launcher(_slot_count_kernel, pointers=2)
_SLOT_SCAN = Launcher(_slot_scan_kernel, pointers=4)
_SLOT_PLACE = Launcher(_slot_place_kernel, pointers=7)


def _padded(e: int) -> int:
    """The experts' (or expert ids') block: a power of two, at least the 16 that a product's dimension needs."""
    return max(16, triton.next_power_of_2(e))


class RouterLogitsFn(torch.autograd.Function):
    """Autograd node of :func:`router_logits`: saves the input, the weights, each row's ``rsqrt`` and the logits."""

    @staticmethod
    def forward(ctx, x, weight, sets, eps):
        n, d = x.shape
        e = weight.shape[-2]
        logits = torch.empty(n, e, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n, dtype=torch.float32, device=x.device)
        n_sets = 1 if sets is None else weight.shape[0]
        if n:
            _ROUTER((cdiv(n, ROUTER_ROWS),), x, weight, sets, logits, rstd, n, d, e, eps, num_warps=4,
                    num_stages=3, SETS=n_sets, BLOCK_N=ROUTER_ROWS, BLOCK_D=ROUTER_COLUMNS, BLOCK_E=_padded(e))
        ctx.save_for_backward(x, weight, sets, rstd, logits)
        return logits

    @staticmethod
    def backward(ctx, grad):
        x, weight, sets, rstd, logits = ctx.saved_tensors
        n, d = x.shape
        e = weight.shape[-2]
        n_sets = 1 if sets is None else weight.shape[0]
        group_rows = cdiv(cdiv(n, ROUTER_GROUPS), BACKWARD_ROWS) * BACKWARD_ROWS
        groups = cdiv(n, group_rows) if n else 1
        dx = torch.empty_like(x)
        partial = torch.zeros(groups, n_sets, e, d, dtype=torch.float32, device=x.device)
        if n:
            _ROUTER_BACKWARD((groups, cdiv(d, BACKWARD_COLUMNS)), x, weight, sets, rstd, logits,
                             grad.contiguous(), dx, partial, n, d, e, group_rows, num_warps=4, SETS=n_sets,
                             BLOCK_N=BACKWARD_ROWS, BLOCK_D=BACKWARD_COLUMNS, BLOCK_E=_padded(e))
        return dx, partial.sum(0).view(weight.shape).to(weight.dtype), None, None


class GatedMixFn(torch.autograd.Function):
    """Autograd node of :func:`gated_mix`, and with ``residual`` of :func:`gated_residual` (``y`` the branch)."""

    @staticmethod
    def forward(ctx, x, y, gate, residual):
        n, d = x.shape
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, y.dtype))
        if n:
            blocks = _mix_blocks(d)
            _MIX((cdiv(n, blocks["BLOCK_N"]),), x, y, gate, out, n, d, num_warps=4, RESIDUAL=residual, **blocks)
        ctx.save_for_backward(None if residual else x, y, gate)
        ctx.residual, ctx.x_dtype = residual, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x, y, gate = ctx.saved_tensors
        n, d = y.shape
        dx = grad.to(ctx.x_dtype) if ctx.residual else torch.empty_like(x)
        dy, dgate = torch.empty_like(y), torch.empty_like(gate)
        if n:
            blocks = _mix_blocks(d)
            _MIX_BACKWARD((cdiv(n, blocks["BLOCK_N"]),), x, y, gate, grad.contiguous(),
                          None if ctx.residual else dx, dy, dgate, n, d, num_warps=4, RESIDUAL=ctx.residual, **blocks)
        return dx, dy, dgate, None


def _mix_blocks(d: int) -> dict:
    block_d = min(triton.next_power_of_2(d), MIX_ELEMENTS)
    return dict(BLOCK_N=MIX_ELEMENTS // block_d, BLOCK_D=block_d)


def router_logits(x: torch.Tensor, weight: torch.Tensor, modality: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``rms(x) W^T`` in float32 for ``x (..., d)`` and ``weight (e, d)``, or ``weight (M, e, d)`` with
    ``modality (...)`` picking each row's; see the module docstring. Differentiable in ``x`` and ``weight``."""
    refuse_float64("router logits", x=x, weight=weight)
    d, e = x.shape[-1], weight.shape[-2]
    sets = None if weight.dim() == 2 else modality.reshape(-1).contiguous()
    logits = RouterLogitsFn.apply(x.reshape(-1, d).contiguous(), weight.contiguous(), sets, float(eps))
    return logits.view(*x.shape[:-1], e)


def expert_slots(*, ids: torch.Tensor, modality: torch.Tensor, n_ids: int, n_modalities: int, n_experts: int,
                 capacity_factor: float | None) -> tuple[torch.Tensor, ...]:
    """:func:`momkit.ops.expert_slots` by a counting sort in three launches; see the module docstring. More than
    ``MOST_SLOT_IDS`` ids, or no slots, go to :func:`momkit.experts.sort_slots`."""
    n, k = ids.shape
    slots = n * k
    if not slots or n_ids > MOST_SLOT_IDS:
        return sort_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor)
    columns = _padded(n_ids)
    block = max(16, min(1024, SLOT_TILE // columns))
    programs = cdiv(slots, block)
    ids, modality = ids.contiguous(), modality.contiguous()
    table = torch.empty(programs + 2, columns, dtype=torch.int32, device=ids.device)
    picks = torch.empty(n_ids, dtype=torch.int64, device=ids.device)
    counts = torch.empty(n_modalities, n_ids, dtype=torch.int64, device=ids.device)
    dropped = torch.empty((), dtype=torch.int64, device=ids.device)
    order = torch.empty(slots, dtype=torch.int64, device=ids.device)
    keep = torch.empty(n, k, dtype=torch.bool, device=ids.device)
    factor_bits = 0 if capacity_factor is None else _float64_bits(capacity_factor * k)
    _SLOT_COUNT((programs,), ids, table, n, k, slots, num_warps=4, BLOCK=block, IDS=columns)
    _SLOT_SCAN((1,), table, picks, counts, dropped, programs, slots, n_ids, n_experts, k, counts.numel(),
               num_warps=4, FACTOR_BITS=factor_bits, ROWS=max(1, SLOT_TILE // columns), IDS=columns)
    _SLOT_PLACE((programs,), ids, modality, table, order, keep, counts, dropped, n, k, slots, programs, n_ids,
                n_modalities, num_warps=4, CAPACITY=capacity_factor is not None, BLOCK=block, IDS=columns)
    return order, keep, picks, counts, dropped


def _float64_bits(value: float) -> int:
    """The bits of ``value`` as a float64, as a signed int64."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def gated_residual(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate branch`` for ``x, branch (..., d)`` and ``gate (..., 1)`` in ``x``'s dtype, in float32, stored in
    the dtype of ``x + branch``; differentiable in all three."""
    refuse_float64("gated residual", x=x, branch=branch, gate=gate)
    return _gated(x, branch, gate, True)


def gated_mix(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + gate (y - x)`` for ``x, y (..., d)`` and ``gate (..., 1)``, all of one dtype; differentiable in all
    three."""
    refuse_float64("gated mix", x=x, y=y, gate=gate)
    return _gated(x, y, gate, False)


def _gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, residual: bool) -> torch.Tensor:
    flat = [t.reshape(-1, t.shape[-1]).contiguous() for t in (x, y, gate)]
    return GatedMixFn.apply(flat[0], flat[1], flat[2].view(-1), residual).view(x.shape)
