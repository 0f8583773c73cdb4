"""The routed linear layer in Triton: ``y_i = x_i W_{m_i}^T + b_{m_i}``, forward and backward.

Shapes: ``x (N, K)``, ``weight (M, O, K)``, ``bias (M, O)``, ``modality (N,)`` with ids in ``0..M-1``,
``y (N, O)``. Inputs may be float32, bfloat16 or float16; every product is a ``tl.dot`` accumulated in float32
(with IEEE precision for float32 operands, no tf32), and results are stored in the inputs' dtypes. The weight and
bias may also be float32 beside 16-bit tokens (the master weights of mixed-precision training). The weight is
then cast to the tokens' dtype once per call, and the forward and ``dx`` share that copy; ``dweight`` is stored in
float32 straight from its float32 sums, so it is never rounded to 16 bits and cast back. The bias is rounded as it
is loaded, and so is the weight by the one-product-per-token forward of decoding, which reads it once anyway.
(Rounding the weight tiles of the grouped products as they are loaded instead, with the steps along the reduced
dimension halved to fit the pipeline's float32 tiles in shared memory, made those products twice as slow on an
H200: Hopper's tensor cores read that operand from shared memory, so a tile converted in registers goes back
through it.)

Tokens are never sorted, gathered or scattered: every kernel reads ``x`` and ``dy`` in place, and routing
happens inside the tiles. Tokens whose ids come in no order (a router's expert choices) come with ``order``, a
permutation that groups them by id: the kernels then form their tiles of the rows ``order[p]`` (with ids
``ids[order[p]]``), loading and storing each row in place through it, so that the tiles hold runs of one id as
runs of one modality do, and nothing is moved before or after.

Forward and ``dx``. One kernel computes ``out_i = a_i B_{m_i}`` with ``B (M, R, C)`` read through its strides: ``y =
x W_m^T + b_m`` with ``B = W^T (M, K, O)``, and ``dx = dy W_m`` with ``B = W`` as it is. For many tokens the forward
reads ``W^T`` from a transposed copy made for the call (``M O K`` elements, small beside the activations of many
tokens per weight set; Hopper's tensor cores are fed faster from a weight tile contiguous along the output
dimension); for fewer tokens per weight set, where the copy costs more than it saves (decoding reads each weight
once per token; eight experts share a batch's tokens eight ways), it reads ``W`` in place through its strides;
``Tiling.copy_rows`` sets the bound in tokens per weight set, and ``benchmarks/routed_linear_tiling.py`` measures
both sides of it. On a GPU with bulk tensor copies (Hopper and later; ``Tiling.tma``), tiles of one weight set load
their operands through tensor descriptors instead, when they are 16-bit, ``Tiling.tma_rows`` tokens or more come,
every row is 16-byte aligned and no side of a tile exceeds ``TMA_BLOCK``: the copy engine brings whole tiles of
``a`` and of ``W`` (in place; the forward transposes its tile in shared memory, so it makes no copy) and fills their
parts past the edges with zeros. Rows gathered through ``order`` are not a tile of ``a``: they load through
pointers beside ``W``'s tile through its descriptor (on an H200, 19 to 51 µs less per forward at the experts
layer's shapes, and 1 to 12 µs less per ``dx``; ``benchmarks/RESULTS.md``). Mixed tiles and float32 load
through pointers as described here. (Mixed tiles loaded through descriptors, the other modalities' rows zeroed by
``tl.where``, gave wrong products on an H200 with Triton 3.6 at ``128 x 256`` tiles in eight warps, and right ones
in four warps at ``128 x 128``.) A program owns a ``(token tile, output tile)`` block of ``out`` (grouped along
tokens, ``Tiling.group`` token tiles at a time, so that programs running together share tiles of ``a`` and ``B`` in
L2). It loads its tokens' modality ids first. When they are all one modality ``m``, the common case for runs of
tokens, it runs one plain loop of ``tl.dot`` over the reduced dimension with ``B_m`` and adds ``b_m``. A mixed tile
instead runs that loop once for each modality present between the smallest and largest id of the tile, loading the
rows of the other modalities as zeros, sums the results and gathers the bias per row; so any mix is exact, and only
tiles that straddle a change of modality pay more than one loop. Up to ``Tiling.gemv_rows`` tokens (decoding) the
forward is instead one matrix-vector product per token: a program owns one token and ``Tiling.gemv_block_o``
outputs, reads that token's modality's weight rows in place and sums the products in float32 on the vector units;
with so few rows, reading the weight is the whole cost, and narrow programs spread it over the multiprocessors.

``dweight`` and ``dbias``. ``dW_m = sum over tokens i of modality m of dy_i^T x_i``: a program owns one modality
and one ``(O tile, K tile)`` block of ``dW_m`` and reduces ``tl.dot(tl.trans(dy_tile), x_tile)`` over token tiles
(only loaded tiles are transposed: Triton 3.4 to 3.7 miscompile on Hopper a ``tl.dot`` of the transpose of another
dot's result). Visiting every token tile would cost ``M`` times the work of one matmul, so each program visits only
the tiles that hold a token of its modality. Before it, a small kernel builds those lists, one program per
modality: the list starts with the modality's pure tiles (all of whose tokens are of that modality), then its
mixed ones, each in token order, and two counts give how many of each. The program reads the ids a chunk of
tiles at a time and places each tile by counting (a cumulative sum over the chunk) the tiles of its kind before
it; a first pass counts the pure tiles, so that the mixed ones start after them. (Built from torch operations
instead, the same lists took 29 of them, and a sort several times the host's time of one call.) The program
walks its modality's list in two loops whose bounds it loads from device memory: the pure tiles, read whole, then
the mixed ones, whose rows of other modalities are loaded as zeros. Neither loop has a branch around its loads
(that would stop Triton from software-pipelining them), and each looks up the next tile's rows one step ahead, so
that no load of ``dy`` or ``x`` waits on another load of its own step and the pipeline can run them
``Tiling.dw_stages - 1`` steps ahead. Under the forward's conditions (on ``dy`` and ``x``), the pure tiles load
through tensor descriptors. A modality absent from the batch has empty lists: its programs store exact zeros.
``dbias_m`` is the sum of ``dy``'s rows of modality ``m``: a kernel of its own walks the same lists, each program
``BIAS_BLOCK_O`` outputs over ``BIAS_CHUNK_ROWS`` tokens' tiles, and torch adds the programs' float32 partial sums.
(Summed inside the ``dweight`` kernel by the programs of one ``K`` tile, with the pure tiles loaded through
descriptors, it made the 65,536-token benchmark row's forward and backward 12 to 16% slower.)

Shared between layers. The ids in their order and the tile lists depend on ``modality`` and ``order`` only, and
the layers of a block pass the same ones (the expert sublayers of a block the same choice of experts, the routed
projections of a Mixture-of-Mamba block the same modalities). So they are computed once per pair and kept in a
small cache (``GROUPINGS_KEPT`` pairs) keyed by each tensor's address, shape, strides, dtype and version counter;
an entry holds both tensors, so their memory cannot be reused under its key while it lives, and an in-place change
gives a new version, hence a new entry. Inference tensors (which have no version counter) and calls during CUDA
graph capture (whose results live in the graph's memory) are not cached. For the experts layer of
``benchmarks/gpu_scan.py`` (three expert sublayers), that is one set of tile lists per pass instead of three.

Launches. Every launch (the matrix-vector product of decoding, the grouped products and ``dweight``, through
pointers, an ``order`` or tensor descriptors, and ``dbias``) goes through
:class:`momkit.kernels.triton.launch.Launcher`, which reuses the compiled kernel of a repeated specialisation
instead of Triton's launcher binding and specialising each of the 15 to 20 arguments on every call: the expert
sublayers launch nine such kernels per forward and backward.

Tokens sorted by id. A caller whose tokens already lie sorted by id passes ``groups``, where each id's rows end
(a block of learned experts sorts its tokens once and runs every expert sublayer on them). With bfloat16 tokens on a
GPU of compute capability 9.0 or later, no bias and 16-byte aligned rows, the products then run through
PyTorch's grouped GEMM (``torch.nn.functional.grouped_mm``, CUTLASS kernels) instead of these kernels: on an H200
at the experts layer's shapes (16,384 tokens, 8 experts, 1024 and 2736 features) its nine products of a forward
and backward took 1.45 ms against these kernels' 2.04 ms through an ``order`` (``benchmarks/RESULTS.md``). It
writes in its inputs' dtype, so a float32 master weight's gradient is rounded to bfloat16 there and cast back (as
``F.linear``'s is under autocast): that layer's copies took 0.30 ms per pass, the dense layer's 0.13 ms.
Elsewhere ``groups`` changes nothing: the sorted ids are runs, which these kernels take as they are.

No host synchronisation. Nothing reads a device value on the host (no ``.item()``, ``.tolist()``,
``nonzero()``), and every shape and launch grid follows from ``N``, ``K``, ``O``, ``M`` and the tiling alone;
the data-dependent parts (which modalities a tile holds, the tile lists, their lengths) are decided on the
device, inside the kernels. ``N = 0`` launches nothing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

from momkit.kernels.triton.launch import Launcher
from momkit.kernels.triton.tiling import cdiv, check_tiling, pow2, refuse_float64

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRETED = tl.constexpr(_INTERPRETING)
FEW_ROWS = 16
FEW_ROWS_BLOCK_O = 32
FEW_ROWS_BLOCK_K = 128
BIAS_BLOCK_O = 64
BIAS_CHUNK_ROWS = 1024
TMA_BLOCK = 256
TILE_BLOCKS = ("block_n", "block_o", "block_k", "dx_block_n", "dx_block_k", "dx_block_o", "dw_block_o", "dw_block_k",
               "dw_block_n")


@dataclass(frozen=True)
class Tiling:
    """Block sizes, warps and software-pipeline stages of the three kernels.

    Every block is a power of two of at least 16 (``tl.dot``'s smallest); edges are masked, so no size of the
    problem needs to be a multiple of one. The defaults are for bfloat16 and float16 on an H100 or H200;
    :func:`default_tiling` gives float32 its own, smaller ones.

    Attributes:
        block_n: tokens per program of the forward.
        block_o: outputs (``O``) per program of the forward.
        block_k: inputs (``K``) per step of the forward's loop.
        warps: warps per forward program.
        stages: pipeline stages of the forward's loop.
        dx_block_n: tokens per program of ``dx``.
        dx_block_k: inputs (``K``) per program of ``dx``.
        dx_block_o: outputs (``O``) per step of ``dx``'s loop.
        dx_warps: warps per ``dx`` program.
        dx_stages: pipeline stages of ``dx``'s loop.
        dw_block_o: outputs (``O``) per program of ``dweight``.
        dw_block_k: inputs (``K``) per program of ``dweight``.
        dw_block_n: tokens per step of ``dweight``'s loop: the tiles the tile lists are made of.
        dw_warps: warps per ``dweight`` program.
        dw_stages: pipeline stages of ``dweight``'s loop.
        group: token tiles (forward, ``dx``) or ``O`` tiles (``dweight``) whose programs are launched together
            across all output tiles, for reuse in L2; any positive number.
        copy_rows: where its tiles load through pointers, the forward reads a transposed copy of the weight
            when the call has at least this many tokens per weight set (``N >= copy_rows * M``: the copy's cost
            grows with ``M``, what it saves with ``N``), and the weight in place otherwise; any number from 0
            (always copy).
        gemv_rows: up to this many tokens (decoding), the forward is one matrix-vector product per token on the
            vector units instead of token tiles on the tensor cores; any number from 0 (never).
        gemv_block_o: outputs per program of that product.
        gemv_block_k: inputs (``K``) per step of its loop (taken down to the next power of two of ``K``, and at
            least 16).
        gemv_warps: warps per program of that product.
        tma: whether tiles of one weight set load their 16-bit operands through tensor descriptors (Hopper's
            bulk tensor copies) where the GPU has them and the operands allow (see the module docstring).
        tma_rows: they do from this many tokens on; any number from 0. Below, the descriptors' cost on the host
            exceeds what they save (``benchmarks/routed_linear_tiling.py``).
    """

    block_n: int = 128
    block_o: int = 256
    block_k: int = 64
    warps: int = 8
    stages: int = 4
    dx_block_n: int = 128
    dx_block_k: int = 256
    dx_block_o: int = 64
    dx_warps: int = 8
    dx_stages: int = 4
    dw_block_o: int = 128
    dw_block_k: int = 128
    dw_block_n: int = 64
    dw_warps: int = 4
    dw_stages: int = 3
    group: int = 8
    copy_rows: int = 8192
    gemv_rows: int = 4
    gemv_block_o: int = 8
    gemv_block_k: int = 256
    gemv_warps: int = 4
    tma: bool = True
    tma_rows: int = 4096

    def __post_init__(self):
        check_tiling(self, counts=("stages", "group"), small=("gemv_block_o",),
                     sizes=("copy_rows", "gemv_rows", "tma_rows"))


@functools.lru_cache(maxsize=None)
def default_tiling(dtype: torch.dtype, rows: int | None = None) -> Tiling:
    """The default tiling for ``rows`` tokens (any number when ``None``) of ``dtype``.

    16-bit inputs take :class:`Tiling`'s defaults: ``128 x 256`` output tiles in steps of 64 with four pipeline
    stages in eight warps for the forward and ``dx``; ``128 x 128`` blocks of ``dweight`` in steps of 64 tokens
    with three stages in four warps, small enough in shared memory for two programs to share a multiprocessor.
    float32 operands take twice the shared memory per element and IEEE products do not run on tensor cores, so
    float32 takes smaller tiles and steps. Up to ``FEW_ROWS`` tokens (and more than ``Tiling.gemv_rows``, below
    which each token is one matrix-vector product), the forward takes tiles of 16 tokens by ``FEW_ROWS_BLOCK_O``
    outputs in steps of ``FEW_ROWS_BLOCK_K``: reading the weight is then the whole cost, and narrow output tiles
    spread it over many programs (``benchmarks/routed_linear_tiling.py``).
    """
    if dtype == torch.float32:
        tiling = Tiling(block_n=64, block_o=128, block_k=32, warps=4,
                        dx_block_n=64, dx_block_k=128, dx_block_o=32, dx_warps=4,
                        dw_block_o=64, dw_block_k=128, dw_block_n=32)
    else:
        tiling = Tiling()
    if rows is not None and rows <= FEW_ROWS:
        tiling = replace(tiling, block_n=16, block_o=FEW_ROWS_BLOCK_O, block_k=FEW_ROWS_BLOCK_K, warps=4,
                         stages=3)
    return tiling


@triton.jit
def _round_bf16(v):
    """``v`` rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _cast(v, DT: tl.constexpr):
    """The float32 tile ``v`` rounded to ``DT`` for a store.

    Triton's interpreter rounds to bfloat16 by truncation; there ``v`` is first rounded to nearest, as the
    GPU rounds.
    """
    if _INTERPRETED and DT == tl.bfloat16:
        v = _round_bf16(v)
    return v.to(DT)


@triton.jit
def _narrow(v, DT: tl.constexpr):
    """``v`` in ``DT``: as it is if already, else rounded to nearest (a float32 master bias or, decoding, weight,
    read for 16-bit products)."""
    if v.dtype != DT:
        v = _cast(v, DT)
    return v


@triton.jit
def _dot(a, b, acc):
    """``acc + a @ b`` in float32 with IEEE products.

    Triton's interpreter multiplies bfloat16 operands wrongly; there they are widened to float32 first, which
    is exact and gives the GPU's products.
    """
    if _INTERPRETED and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _grouped(pid, tiles_a, tiles_b, GROUP: tl.constexpr):
    """Program ``pid`` of a ``tiles_a x tiles_b`` grid as ``(i, j)``: runs of ``GROUP`` values of ``i`` go
    through every ``j``, ``i`` fastest."""
    per_group = GROUP * tiles_b
    first = (pid // per_group) * GROUP
    size = tl.minimum(tiles_a - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def _rows_at(perm_ptr, positions, mask, PERM: tl.constexpr):
    """The rows (int64) at tile ``positions``: ``perm[positions]`` with ``PERM``, else the positions."""
    if PERM:
        return tl.load(perm_ptr + positions, mask=mask, other=0).to(tl.int64)
    return positions.to(tl.int64)


@triton.jit
def _reduce_rows(acc, a_ptr, b_ptr, rows, row_mask, cols, col_mask, n_red, stride_r, stride_c,
                 BLOCK_R: tl.constexpr):
    """``acc + a[rows] @ b`` with ``a (n, n_red)`` row-major and ``b (n_red, n_cols)`` of strides
    ``(stride_r, stride_c)``; rows where ``row_mask`` is off are read as zeros. ``rows`` is int64."""
    red = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + rows[:, None] * n_red + red[None, :]
    b_ptrs = b_ptr + red[:, None] * stride_r + cols[None, :] * stride_c
    for start in range(0, n_red, BLOCK_R):
        red_mask = red < n_red - start
        a = tl.load(a_ptrs, mask=row_mask[:, None] & red_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=red_mask[:, None] & col_mask[None, :], other=0.0)
        acc = _dot(a, b, acc)
        a_ptrs += BLOCK_R
        b_ptrs += BLOCK_R * stride_r
    return acc


@triton.jit
def _load_b(b_desc, m, start, col, TRANS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """The ``(BLOCK_R, BLOCK_C)`` tile ``b[m][start:, col:]`` through ``b_desc``: of ``b (M, n_red, C)`` in blocks of
    ``(1, BLOCK_R, BLOCK_C)``, or with ``TRANS_B`` of its transpose ``(M, C, n_red)`` in blocks of ``(1, BLOCK_C,
    BLOCK_R)``. Elements past the tensor's edges load as zeros."""
    if TRANS_B:
        return tl.trans(tl.reshape(b_desc.load([m, col, start]), (BLOCK_C, BLOCK_R)))
    return tl.reshape(b_desc.load([m, start, col]), (BLOCK_R, BLOCK_C))


@triton.jit
def _reduce_tile(acc, a_desc, b_desc, m, row, col, n_red, TRANS_B: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_R: tl.constexpr):
    """``acc + a[row:row + BLOCK_N] @ b[m][:, col:col + BLOCK_C]`` through tensor descriptors: ``a_desc`` of
    ``a (N, n_red)`` in blocks of ``(BLOCK_N, BLOCK_R)``, ``b_desc`` as :func:`_load_b` reads it."""
    for start in range(0, n_red, BLOCK_R):
        acc = _dot(a_desc.load([row, start]), _load_b(b_desc, m, start, col, TRANS_B, BLOCK_C, BLOCK_R), acc)
    return acc


@triton.jit
def _reduce_gathered(acc, a_ptr, b_desc, rows, row_mask, m, col, n_red, TRANS_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """``acc + a[rows] @ b[m][:, col:col + BLOCK_C]``: ``a (N, n_red)`` row-major through pointers (rows where
    ``row_mask`` is off read as zeros; ``rows`` int64), ``b`` through ``b_desc`` as :func:`_load_b` reads it."""
    red = tl.arange(0, BLOCK_R)
    a_ptrs = a_ptr + rows[:, None] * n_red + red[None, :]
    for start in range(0, n_red, BLOCK_R):
        a = tl.load(a_ptrs, mask=row_mask[:, None] & (red < n_red - start)[None, :], other=0.0)
        acc = _dot(a, _load_b(b_desc, m, start, col, TRANS_B, BLOCK_C, BLOCK_R), acc)
        a_ptrs += BLOCK_R
    return acc


@triton.jit
def _routed_mm_kernel(a_ptr, b_ptr, a_desc, b_desc, bias_ptr, mod_ptr, perm_ptr, out_ptr, n_rows, n_red, n_cols,
                      stride_m, stride_r, stride_c, HAS_BIAS: tl.constexpr, PERM: tl.constexpr, TMA: tl.constexpr,
                      TRANS_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
                      GROUP: tl.constexpr):
    """``out[i] = a[i] @ b[m_i] (+ bias[m_i])``: ``a (N, n_red)`` row-major, ``b (M, n_red, n_cols)`` of strides
    ``(stride_m, stride_r, stride_c)``, ``out (N, n_cols)``; with ``PERM``, tile position ``p`` holds row
    ``perm[p]`` and ``mod_ptr`` the ids in that order; with ``TMA``, tiles of one weight set load ``b`` through
    ``b_desc``, and without ``PERM`` ``a`` through ``a_desc`` (:func:`_reduce_tile`). See the module docstring."""
    pid_n, pid_c = _grouped(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), tl.cdiv(n_cols, BLOCK_C), GROUP)
    positions = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = positions < n_rows
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    mods = tl.load(mod_ptr + positions, mask=row_mask, other=-1).to(tl.int32)
    m_hi = tl.max(mods, 0)
    m_lo = tl.min(tl.where(row_mask, mods, m_hi), 0)
    rows = _rows_at(perm_ptr, positions, row_mask, PERM)
    acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    mask = row_mask[:, None] & col_mask[None, :]
    if m_lo == m_hi:
        if TMA and PERM:
            acc = _reduce_gathered(acc, a_ptr, b_desc, rows, row_mask, m_lo, pid_c * BLOCK_C, n_red, TRANS_B, BLOCK_C,
                                   BLOCK_R)
        elif TMA:
            acc = _reduce_tile(acc, a_desc, b_desc, m_lo, pid_n * BLOCK_N, pid_c * BLOCK_C, n_red, TRANS_B, BLOCK_C,
                               BLOCK_R)
        else:
            acc = _reduce_rows(acc, a_ptr, b_ptr + m_lo.to(tl.int64) * stride_m, rows, row_mask, cols, col_mask,
                               n_red, stride_r, stride_c, BLOCK_R)
        if HAS_BIAS:
            bias_row = tl.load(bias_ptr + m_lo * n_cols + cols, mask=col_mask, other=0.0)
            acc += _narrow(bias_row, out_ptr.dtype.element_ty).to(tl.float32)[None, :]
    else:
        for m in range(m_lo, m_hi + 1):
            sel = mods == m
            if tl.max(sel.to(tl.int32), 0) > 0:
                acc = _reduce_rows(acc, a_ptr, b_ptr + tl.cast(m, tl.int64) * stride_m, rows, sel, cols, col_mask,
                                   n_red, stride_r, stride_c, BLOCK_R)
        if HAS_BIAS:
            bias_rows = tl.load(bias_ptr + mods[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
            acc += _narrow(bias_rows, out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * n_cols + cols[None, :], _cast(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _routed_gemv_kernel(x_ptr, w_ptr, bias_ptr, mod_ptr, out_ptr, n_in, n_out, HAS_BIAS: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[i, outs] = W[m_i, outs] @ x[i] (+ bias[m_i, outs])`` for one token ``i`` and one tile of outputs:
    ``x (N, K)`` and ``W (M, O, K)`` row-major; products summed in float32 by the vector units."""
    row, pid_o = tl.program_id(0).to(tl.int64), tl.program_id(1)
    m = tl.load(mod_ptr + row).to(tl.int64)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_out
    ins = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + m * n_out * n_in + outs[:, None].to(tl.int64) * n_in + ins[None, :]
    x_ptrs = x_ptr + row * n_in + ins
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        in_mask = ins < n_in - start
        w = tl.load(w_ptrs, mask=out_mask[:, None] & in_mask[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=in_mask, other=0.0)
        acc += _narrow(w, x_ptr.dtype.element_ty).to(tl.float32) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + m * n_out + outs, mask=out_mask, other=0.0)
        y += _narrow(bias, x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * n_out + outs, _cast(y, out_ptr.dtype.element_ty), mask=out_mask)


_ROUTED_GEMV = Launcher(_routed_gemv_kernel, pointers=5)


def _routed_gemv(x, weight, bias, modality, block_o, block_k, warps):
    """``y[i] = weight[modality[i]] @ x[i] (+ bias[modality[i]])`` token by token: ``x (N, K)``, ``weight (M, O,
    K)``, both contiguous."""
    n_rows, n_in = x.shape
    n_out = weight.shape[1]
    out = x.new_empty((n_rows, n_out))
    _ROUTED_GEMV((n_rows, cdiv(n_out, block_o)), x, weight, bias, modality, out, n_in, n_out,
                 HAS_BIAS=bias is not None, BLOCK_O=block_o, BLOCK_K=block_k, num_warps=warps)
    return out


@triton.jit
def _listed_rows(tiles_ptr, j, last, mod_ptr, perm_ptr, m, n_rows, CHECK: tl.constexpr, PERM: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """The rows (int64) of the token tile listed at ``tiles_ptr[j]`` and which of them to take: those inside the
    batch and, with ``CHECK``, of modality ``m``; none when ``j >= last``."""
    inside = j < last
    positions = tl.load(tiles_ptr + j, mask=inside, other=0) * BLOCK_N + tl.arange(0, BLOCK_N)
    sel = positions < tl.where(inside, n_rows, 0)
    if CHECK:
        sel = tl.load(mod_ptr + positions, mask=sel, other=-1) == m
    return _rows_at(perm_ptr, positions, sel, PERM), sel


@triton.jit
def _weight_grad_steps(acc, dy_ptr, x_ptr, mod_ptr, perm_ptr, tiles_ptr, m, first, last, n_rows, n_in, n_out, outs,
                       out_mask, ins, in_mask, CHECK: tl.constexpr, PERM: tl.constexpr, BLOCK_N: tl.constexpr):
    """``acc + sum_t dy_t^T x_t`` over the token tiles ``t`` listed at ``tiles_ptr[first:last]``. With ``CHECK``
    the rows of other modalities than ``m`` are read as zeros; without, every token of the listed tiles is taken
    to be of modality ``m``.

    The rows of the next tile are looked up one step ahead, so that no load of ``dy`` or ``x`` depends on a
    load of the same step and the software pipeline can run them several steps ahead."""
    rows, sel = _listed_rows(tiles_ptr, first, last, mod_ptr, perm_ptr, m, n_rows, CHECK, PERM, BLOCK_N)
    for j in range(first, last):
        dy = tl.load(dy_ptr + rows[:, None] * n_out + outs[None, :], mask=sel[:, None] & out_mask[None, :],
                     other=0.0)
        x = tl.load(x_ptr + rows[:, None] * n_in + ins[None, :], mask=sel[:, None] & in_mask[None, :], other=0.0)
        acc = _dot(tl.trans(dy), x, acc)
        rows, sel = _listed_rows(tiles_ptr, j + 1, last, mod_ptr, perm_ptr, m, n_rows, CHECK, PERM, BLOCK_N)
    return acc


@triton.jit
def _weight_grad_pure_steps(acc, dy_desc, x_desc, tiles_ptr, last, first_out, first_in, BLOCK_N: tl.constexpr):
    """:func:`_weight_grad_steps` without ``CHECK`` over the tiles listed at ``tiles_ptr[:last]``, loading ``dy`` and
    ``x`` through tensor descriptors in blocks of ``(BLOCK_N, BLOCK_O)`` at output ``first_out`` and ``(BLOCK_N,
    BLOCK_K)`` at input ``first_in``; rows past the batch load as zeros."""
    for j in range(0, last):
        row = tl.load(tiles_ptr + j) * BLOCK_N
        acc = _dot(tl.trans(dy_desc.load([row, first_out])), x_desc.load([row, first_in]), acc)
    return acc


@triton.jit
def _weight_grad_kernel(dy_ptr, x_ptr, dy_desc, x_desc, mod_ptr, perm_ptr, dw_ptr, tiles_ptr, counts_ptr, n_rows,
                        n_in, n_out, n_tiles, PERM: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """``dW_m = sum_{i: m_i = m} dy_i^T x_i``: ``dy (N, O)``, ``x (N, K)``, the tile lists ``(M, n_tiles)`` and their
    lengths ``(M, 2)``; with ``PERM``, tile position ``p`` holds row ``perm[p]`` and ``mod_ptr`` the ids in that
    order; with ``TMA``, the tiles of modality ``m`` alone load through ``dy_desc`` and ``x_desc``. See the module
    docstring."""
    tiles_o = tl.cdiv(n_out, BLOCK_O)
    tiles_k = tl.cdiv(n_in, BLOCK_K)
    pid = tl.program_id(0)
    m = pid // (tiles_o * tiles_k)
    pid_o, pid_k = _grouped(pid % (tiles_o * tiles_k), tiles_o, tiles_k, GROUP)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    ins = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    pure = tl.load(counts_ptr + 2 * m)
    present = tl.load(counts_ptr + 2 * m + 1)
    tiles_ptr += m.to(tl.int64) * n_tiles
    out_mask = outs < n_out
    in_mask = ins < n_in
    acc = tl.zeros((BLOCK_O, BLOCK_K), dtype=tl.float32)
    if TMA:
        acc = _weight_grad_pure_steps(acc, dy_desc, x_desc, tiles_ptr, pure, pid_o * BLOCK_O, pid_k * BLOCK_K,
                                      BLOCK_N)
    else:
        acc = _weight_grad_steps(acc, dy_ptr, x_ptr, mod_ptr, perm_ptr, tiles_ptr, m, 0, pure, n_rows, n_in, n_out,
                                 outs, out_mask, ins, in_mask, False, PERM, BLOCK_N)
    acc = _weight_grad_steps(acc, dy_ptr, x_ptr, mod_ptr, perm_ptr, tiles_ptr, m, pure, present, n_rows, n_in, n_out,
                             outs, out_mask, ins, in_mask, True, PERM, BLOCK_N)
    tl.store(dw_ptr + (m.to(tl.int64) * n_out + outs[:, None]) * n_in + ins[None, :],
             _cast(acc, dw_ptr.dtype.element_ty), mask=out_mask[:, None] & in_mask[None, :])


@triton.jit
def _bias_grad_kernel(dy_ptr, mod_ptr, perm_ptr, partial_ptr, tiles_ptr, counts_ptr, n_rows, n_out, n_tiles, chunk,
                      PERM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr):
    """``partial[s, m] = sum_{i: m_i = m} dy_i`` over the tiles ``s * chunk`` to ``(s + 1) * chunk`` of modality
    ``m``'s list, for ``BLOCK_O`` outputs, summed in float32 (rows of other modalities read as zeros); ``PERM`` as
    :func:`_weight_grad_kernel` takes it."""
    m, pid_o, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    outs = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    out_mask = outs < n_out
    last = tl.minimum(tl.load(counts_ptr + 2 * m + 1), (split + 1) * chunk)
    tiles_ptr += m.to(tl.int64) * n_tiles
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for j in range(split * chunk, last):
        rows, sel = _listed_rows(tiles_ptr, j, last, mod_ptr, perm_ptr, m, n_rows, True, PERM, BLOCK_N)
        acc += tl.load(dy_ptr + rows[:, None] * n_out + outs[None, :], mask=sel[:, None] & out_mask[None, :],
                       other=0.0).to(tl.float32)
    tl.store(partial_ptr + (split * tl.num_programs(0) + m).to(tl.int64) * n_out + outs, tl.sum(acc, 0),
             mask=out_mask)


_ROUTED_MM = Launcher(_routed_mm_kernel, pointers=8)
_WEIGHT_GRAD = Launcher(_weight_grad_kernel, pointers=9)
_BIAS_GRAD = Launcher(_bias_grad_kernel, pointers=6)


def _routed_mm(a, b, bias, ids, perm, block_n, block_c, block_r, warps, stages, group, tma=False):
    """``out[i] = a[i] @ b[m_i] (+ bias[m_i])``: ``a (N, R)`` contiguous, ``b (M, R, C)`` of any strides,
    ``out (N, C)``; ``m_i = ids[i]``, or with ``perm``, ``m_{perm[p]} = ids[p]`` and tiles formed in that order.
    With ``tma`` (:func:`_tma` of ``a`` and ``b``, then contiguous along ``R`` or ``C``), tiles of one id load ``b``
    through a tensor descriptor, and without ``perm`` ``a`` too."""
    n_rows, n_red = a.shape
    n_cols = b.shape[2]
    out = a.new_empty((n_rows, n_cols))
    a_desc = b_desc = None
    trans_b = tma and b.stride(2) != 1
    if tma:
        a_desc = TensorDescriptor.from_tensor(a, [block_n, block_r]) if perm is None else None
        b_desc = (TensorDescriptor.from_tensor(b.transpose(1, 2), [1, block_c, block_r]) if trans_b else
                  TensorDescriptor.from_tensor(b, [1, block_r, block_c]))
    grid = (cdiv(n_rows, block_n) * cdiv(n_cols, block_c),)
    args = (a, b, a_desc, b_desc, bias, ids, perm, out, n_rows, n_red, n_cols, *b.stride())
    options = dict(HAS_BIAS=bias is not None, PERM=perm is not None, TMA=tma, TRANS_B=trans_b, BLOCK_N=block_n,
                   BLOCK_C=block_c, BLOCK_R=block_r, GROUP=group, num_warps=warps, num_stages=stages)
    _ROUTED_MM(grid, *args, **options)
    return out


@functools.cache
def _bulk_copies(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` has the bulk tensor copies that tensor descriptors load through
    (compute capability 9.0 and later)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma(tiling: Tiling, *tensors) -> bool:
    """Whether tiles of one weight set can load ``tensors`` (``N`` rows first, each contiguous along its last
    dimension) through tensor descriptors: ``tiling.tma``, at least ``tiling.tma_rows`` rows, a Triton that has
    descriptors, 16-bit tensors with 16-byte aligned bases and strides, a GPU with bulk tensor copies (or the
    interpreter), and no token-tile block of the tiling (``TILE_BLOCKS``) larger than ``TMA_BLOCK``, the largest
    side of a bulk copy's box. Rows gathered through an ``order`` are not tiles of their tensor: they load through
    pointers whatever this says."""
    first = tensors[0]
    if not tiling.tma or first.shape[0] < tiling.tma_rows or TensorDescriptor is None:
        return False
    if any(getattr(tiling, name) > TMA_BLOCK for name in TILE_BLOCKS):
        return False
    if first.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not (_INTERPRETING or _bulk_copies(first.device.index)):
        return False
    return all(t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
               for t in tensors)


@triton.jit
def _tile_kinds(ids_ptr, tiles, within, m, n_rows, BLOCK_N: tl.constexpr):
    """Whether each token tile of ``tiles`` (of ``BLOCK_N`` tokens) holds a token of id ``m``, and whether it holds
    tokens of id ``m`` only; neither for a tile past the batch."""
    positions = tiles[:, None] * BLOCK_N + within[None, :]
    inside = positions < n_rows
    hits = ((tl.load(ids_ptr + positions, mask=inside, other=-1) == m) & inside).to(tl.int32)
    held = tl.sum(hits, 1)
    return held > 0, (held > 0) & (held == tl.sum(inside.to(tl.int32), 1))


@triton.jit
def _tile_lists_kernel(ids_ptr, tiles_ptr, counts_ptr, n_rows, n_tiles, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr):
    """Program ``m``: row ``m`` of :func:`_tile_lists`'s ``tiles`` and ``counts``, ``CHUNK`` tiles at a time."""
    m = tl.program_id(0)
    chunk = tl.arange(0, CHUNK)
    within = tl.arange(0, BLOCK_N)
    n_pure = 0
    for start in range(0, n_tiles, CHUNK):
        present, pure = _tile_kinds(ids_ptr, start + chunk, within, m, n_rows, BLOCK_N)
        n_pure += tl.sum(pure.to(tl.int32), 0)
    row_ptr = tiles_ptr + m.to(tl.int64) * n_tiles
    pure_before = 0
    mixed_before = 0
    for start in range(0, n_tiles, CHUNK):
        present, pure = _tile_kinds(ids_ptr, start + chunk, within, m, n_rows, BLOCK_N)
        pure = pure.to(tl.int32)
        mixed = present.to(tl.int32) - pure
        place = tl.where(pure > 0, pure_before + tl.cumsum(pure, 0), n_pure + mixed_before + tl.cumsum(mixed, 0)) - 1
        tl.store(row_ptr + place, start + chunk, mask=present)
        pure_before += tl.sum(pure, 0)
        mixed_before += tl.sum(mixed, 0)
    tl.store(counts_ptr + 2 * m, n_pure)
    tl.store(counts_ptr + 2 * m + 1, n_pure + mixed_before)


_TILE_LISTS = Launcher(_tile_lists_kernel, pointers=3)
TILE_LIST_CHUNK = 64


def _tile_lists(modality: torch.Tensor, n_modalities: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each modality, the token tiles of ``block`` tokens that hold it, and how many.

    Returns ``tiles (M, T)`` and ``counts (M, 2)``, int32, with ``T = ceil(N / block)``: ``tiles[m, :counts[m,
    0]]`` are the tiles whose tokens are all of modality ``m``, ``tiles[m, counts[m, 0]:counts[m, 1]]`` those that
    hold it among others, each group in token order (the rest is not written). One launch of
    :func:`_tile_lists_kernel`, which decides everything on the device.
    """
    n_tiles = cdiv(modality.shape[0], block)
    tiles = torch.empty(n_modalities, n_tiles, dtype=torch.int32, device=modality.device)
    counts = torch.empty(n_modalities, 2, dtype=torch.int32, device=modality.device)
    _TILE_LISTS((n_modalities,), modality, tiles, counts, modality.shape[0], n_tiles, BLOCK_N=block,
                CHUNK=TILE_LIST_CHUNK, num_warps=4)
    return tiles, counts


GROUPINGS_KEPT = 8


class _Grouping:
    """What the kernels derive from one ``modality`` and ``order``: the ids in the order the tiles are formed in
    (``ids``), and the tile lists of :func:`_tile_lists` per number of weight sets and block, made when first
    asked for. It holds ``modality`` and ``order``, so that their memory is not reused while it is cached."""

    def __init__(self, modality: torch.Tensor, order: torch.Tensor | None):
        self.sources = (modality, order)
        self.ids = modality if order is None else modality[order]
        self.tiles = {}

    def tile_lists(self, n_modalities: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (n_modalities, block)
        if key not in self.tiles:
            self.tiles[key] = _tile_lists(self.ids, n_modalities, block)
        return self.tiles[key]


_GROUPINGS: dict[tuple, _Grouping] = {}


def _identity(t: torch.Tensor | None):
    return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version)


def _grouping(modality: torch.Tensor, order: torch.Tensor | None) -> _Grouping:
    """The :class:`_Grouping` of ``modality`` and ``order``: the cached one of the same tensors at the same
    versions, or a new one (cached unless an input is an inference tensor or a CUDA graph is being captured)."""
    if modality.is_inference() or (order is not None and order.is_inference()) or \
            (modality.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _Grouping(modality, order)
    key = (_identity(modality), _identity(order))
    found = _GROUPINGS.get(key)
    if found is None:
        if len(_GROUPINGS) >= GROUPINGS_KEPT:
            del _GROUPINGS[next(iter(_GROUPINGS))]
        found = _GROUPINGS[key] = _Grouping(modality, order)
    return found


def _weight_grads(dy, x, grouping, perm, weight: tuple[torch.Size, torch.dtype], bias, tiling, need_weight=True):
    """``dweight`` of the ``(M, O, K)`` shape and the dtype ``weight`` gives (``None`` unless ``need_weight``) and
    ``dbias (M, O)`` in ``bias``'s dtype (``None`` without a bias); the ids in their order and the tile lists from
    ``grouping`` (a :class:`_Grouping`), ``perm`` as :func:`_routed_mm` takes it."""
    n_rows, n_in = x.shape
    n_mod, n_out = weight[0][:2]
    ids = grouping.ids
    tiles, counts = grouping.tile_lists(n_mod, tiling.dw_block_n)
    dweight = dbias = None
    if need_weight:
        dweight = torch.empty(weight[0], dtype=weight[1], device=dy.device)
        dy_desc = x_desc = None
        tma = perm is None and _tma(tiling, dy, x)
        if tma:
            dy_desc = TensorDescriptor.from_tensor(dy, [tiling.dw_block_n, tiling.dw_block_o])
            x_desc = TensorDescriptor.from_tensor(x, [tiling.dw_block_n, tiling.dw_block_k])
        grid = (n_mod * cdiv(n_out, tiling.dw_block_o) * cdiv(n_in, tiling.dw_block_k),)
        args = (dy, x, dy_desc, x_desc, ids, perm, dweight, tiles, counts, n_rows, n_in, n_out, tiles.shape[1])
        options = dict(PERM=perm is not None, TMA=tma, BLOCK_N=tiling.dw_block_n, BLOCK_O=tiling.dw_block_o,
                       BLOCK_K=tiling.dw_block_k, GROUP=tiling.group, num_warps=tiling.dw_warps,
                       num_stages=tiling.dw_stages)
        _WEIGHT_GRAD(grid, *args, **options)
    if bias is not None:
        chunk = max(1, BIAS_CHUNK_ROWS // tiling.dw_block_n)
        splits = cdiv(tiles.shape[1], chunk)
        partial = torch.empty(splits, n_mod, n_out, dtype=torch.float32, device=dy.device)
        _BIAS_GRAD((n_mod, cdiv(n_out, BIAS_BLOCK_O), splits), dy, ids, perm, partial, tiles, counts, n_rows, n_out,
                   tiles.shape[1], chunk, PERM=perm is not None, BLOCK_N=tiling.dw_block_n, BLOCK_O=BIAS_BLOCK_O,
                   num_warps=4)
        dbias = partial.sum(0).to(bias.dtype)
    return dweight, dbias


def _operand(x, weight, t: Tiling) -> torch.Tensor:
    """The weight as the forward reads it: a float32 master weight beside 16-bit tokens cast to their dtype once for
    the call (the backward's ``dx`` reads the same copy), except by the one-product-per-token forward, which rounds
    it as it loads it."""
    return weight if x.shape[0] <= t.gemv_rows else weight.to(x.dtype)


def _forward(x, weight, bias, ids, perm, t: Tiling) -> torch.Tensor:
    """``y (N, O)`` with ``weight`` from :func:`_operand`; ``ids`` and ``perm`` as :func:`_routed_mm` takes them."""
    if x.shape[0] == 0:
        return x.new_empty((0, weight.shape[1]))
    if x.shape[0] <= t.gemv_rows:
        block_k = max(16, min(t.gemv_block_k, pow2(x.shape[1])))
        return _routed_gemv(x, weight, bias, ids, t.gemv_block_o, block_k, t.gemv_warps)
    tma = _tma(t, x, weight)
    weight_t = weight.transpose(1, 2)
    if not tma and x.shape[0] >= t.copy_rows * weight.shape[0]:
        weight_t = weight_t.contiguous()
    return _routed_mm(x, weight_t, bias, ids, perm, t.block_n, t.block_o, t.block_k, t.warps, t.stages, t.group,
                      tma)


class RoutedLinearFn(torch.autograd.Function):
    """Autograd node of the Triton routed linear layer; see the module docstring. ``perm`` as :func:`_routed_mm`
    takes it, with the ids in its order from ``grouping`` (a :class:`_Grouping`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, perm, tiling, grouping):
        operand = _operand(x, weight, tiling)
        ctx.save_for_backward(x, operand, bias, perm)
        ctx.tiling, ctx.grouping, ctx.master = tiling, grouping, (weight.shape, weight.dtype)
        return _forward(x, operand, bias, grouping.ids, perm, tiling)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, bias, perm = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.shape[0] == 0:
            return (torch.empty_like(x) if need_x else None, x.new_zeros(ctx.master[0], dtype=ctx.master[1])
                    if need_w else None, torch.zeros_like(bias) if need_b else None, None, None, None)
        t = ctx.tiling
        dy = dy.contiguous()
        dx = dweight = dbias = None
        if need_x:
            weight = weight.to(dy.dtype)
            dx = _routed_mm(dy, weight, None, ctx.grouping.ids, perm, t.dx_block_n, t.dx_block_k, t.dx_block_o,
                            t.dx_warps, t.dx_stages, t.group, _tma(t, dy, weight))
        if need_w or need_b:
            dweight, dbias = _weight_grads(dy, x, ctx.grouping, perm, ctx.master, bias if need_b else None, t, need_w)
        return dx, dweight, dbias, None, None, None


class GroupedGemmFn(torch.autograd.Function):
    """Autograd node of the products of tokens sorted by id through PyTorch's grouped GEMM, over the groups of rows
    that ``groups`` (int32) ends: ``y = x W_m^T``, ``dx = dy W_m``, ``dW_m = dy_m^T x_m``. A float32 master weight
    is cast once for the forward and ``dx``, and its gradient cast back to float32."""

    @staticmethod
    def forward(ctx, x, weight, groups):
        operand = weight.to(x.dtype)
        ctx.save_for_backward(x, operand, groups)
        ctx.master = weight.dtype
        return F.grouped_mm(x, operand.transpose(1, 2), offs=groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, operand, groups = ctx.saved_tensors
        dy = dy.contiguous()
        dx = F.grouped_mm(dy, operand, offs=groups) if ctx.needs_input_grad[0] else None
        dweight = F.grouped_mm(dy.t(), x, offs=groups).to(ctx.master) if ctx.needs_input_grad[1] else None
        return dx, dweight, None


@functools.cache
def _grouped_gemm_device(index: int) -> bool:
    """Whether PyTorch's grouped GEMM runs on CUDA device ``index`` (compute capability 9.0 or later)."""
    return hasattr(F, "grouped_mm") and torch.cuda.get_device_capability(index) >= (9, 0)


def _grouped_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether tokens sorted by id take :class:`GroupedGemmFn`: bfloat16 ``x`` on such a GPU, some tokens, no
    bias, and rows of ``x``, ``y`` and the weight 16-byte aligned."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and bias is None and x.shape[0] > 0 and x.shape[1] % 8 == 0
            and weight.shape[1] % 8 == 0 and _grouped_gemm_device(x.device.index or 0))


def routed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, modality: torch.Tensor,
                  tiling: Tiling | None = None, order: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None) -> torch.Tensor:
    """``y[i] = x[i] @ weight[modality[i]].T + bias[modality[i]]``, differentiable in ``x``, ``weight``, ``bias``.

    Args:
        x: ``(N, K)``, float32, bfloat16 or float16.
        weight: ``(M, O, K)`` in ``x``'s dtype, or float32 with a 16-bit ``x`` (a master weight: the products
            are those of its rounding to ``x``'s dtype, cast once for the forward and backward).
        bias: ``(M, O)`` in ``weight``'s dtype, or ``None``.
        modality: ``(N,)`` int64 ids in ``0..M-1`` (checked by the caller).
        tiling: block sizes, warps and stages (:func:`default_tiling` of ``x``'s dtype and ``N`` when
            ``None``); the result does not depend on it beyond rounding.
        order: optional ``(N,)`` int64 permutation of the tokens that groups them by id (a stable argsort of
            ``modality``): the kernels then form their token tiles in that order, reading and writing each row
            in place through it, so that ids in any order cost what runs of one id cost. The result does not
            depend on it. Not used up to ``tiling.gemv_rows`` tokens.
        groups: optional ``(M,)`` integer ends of the ids' groups, for tokens sorted by id (``modality``
            non-decreasing, checked by the caller): see "Tokens sorted by id" above.

    Returns:
        ``y (N, O)`` in ``x``'s dtype. Gradients come in each input's dtype (a master weight's straight from
        the float32 sums, never rounded to ``x``'s dtype); a modality absent from
        ``modality`` gets exactly zero gradient. Where none is wanted (grad mode off, or no input requires one),
        the kernels run without an autograd node, whose Python costs a decoding step as much as the launch.

    Raises:
        SpecError: a float64 input; this backend computes in float32 (use ``backend="reference"``).
    """
    refuse_float64("routed linear", x=x, weight=weight, bias=bias)
    if groups is not None and _grouped_gemm(x, weight, bias):
        return GroupedGemmFn.apply(x.contiguous(), weight.contiguous(), groups.to(torch.int32))
    rows = x.shape[0] if x.shape[0] <= FEW_ROWS else None
    tiling = tiling or default_tiling(x.dtype, rows)
    modality = modality.contiguous()
    if order is not None and x.shape[0] <= tiling.gemv_rows:
        order = None
    if order is not None:
        order = order.contiguous()
    x, weight, bias = x.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return RoutedLinearFn.apply(x, weight, bias, order, tiling, _grouping(modality, order))
    ids = modality if order is None else _grouping(modality, order).ids
    return _forward(x, _operand(x, weight, tiling), bias, ids, order, tiling)
