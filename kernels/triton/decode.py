"""Single-position state updates of decoding in Triton: one launch each per layer and position.

Decoding one position through a Mamba layer is a handful of small operations on tensors of a few thousand
elements, so its time is the number of launches, not arithmetic. These two kernels replace the PyTorch
chains of the step path (about a dozen launches for the state update, six for the convolution) with one each.

``selective_state_update``: one program per batch row, head and block of ``BLOCK_P`` channels holds a
``(BLOCK_P, n)`` tile of the state; it applies ``dt_bias`` and softplus, the decay ``exp(dt A)``, the input
``dt x B``, writes the state back, and reads out ``state C + D x`` gated by ``silu(z)``. Mamba-1's
``(b, d, n)`` state is one head of ``d`` channels. Every tensor is addressed through its strides, so the
per-head ``dt``, ``A``, ``D`` and ``dt_bias`` of Mamba-2 arrive as stride-0 views over the head dimension,
and a parameter given per modality adds a stride along its leading ``M`` (0 for a shared one): the program
reads its row's modality id and offsets by it, so nothing is gathered beforehand.

``conv_state_update``: one program per batch row and block of channels shifts the ``(BLOCK_C, k)`` window
by one position, appends the new input, stores the window and writes ``sum_j window_j w_j + bias``,
optionally through silu.

Both compute in float32 and support no gradient (decoding runs under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from momkit.kernels.triton.launch import Launcher
from momkit.kernels.triton.tiling import cdiv, pow2, refuse_float64

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _state_update_kernel(state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, mod_ptr, out_ptr,
                         heads, channels, n, heads_per_group, mod_b,
                         s_b, s_h, s_p, s_n, x_b, x_h, x_p, dt_b, dt_h, dt_p, a_m, a_h, a_p, a_n,
                         b_b, b_g, b_n, c_b, c_g, c_n, d_m, d_h, d_p, z_b, z_h, z_p, bias_m, bias_h, bias_p,
                         o_b, o_h, o_p,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr,
                         SOFTPLUS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(1)
    b = row // heads
    h = row % heads
    g = h // heads_per_group
    m = tl.load(mod_ptr + b * mod_b) if HAS_MOD else 0
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < channels
    mask_n = offs_n < n
    mask = mask_p[:, None] & mask_n[None, :]

    state_ptrs = state_ptr + b * s_b + h * s_h + offs_p[:, None] * s_p + offs_n[None, :] * s_n
    state = tl.load(state_ptrs, mask=mask, other=0.0)
    x = tl.load(x_ptr + b * x_b + h * x_h + offs_p * x_p, mask=mask_p, other=0.0).to(tl.float32)
    dt = tl.load(dt_ptr + b * dt_b + h * dt_h + offs_p * dt_p, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + m * bias_m + h * bias_h + offs_p * bias_p, mask=mask_p, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = tl.where(dt <= 20.0, LN2 * tl.log2(1.0 + tl.exp2(dt * LOG2E)), dt)
    A = tl.load(A_ptr + m * a_m + h * a_h + offs_p[:, None] * a_p + offs_n[None, :] * a_n, mask=mask,
                other=0.0).to(tl.float32)
    B = tl.load(B_ptr + b * b_b + g * b_g + offs_n * b_n, mask=mask_n, other=0.0).to(tl.float32)
    C = tl.load(C_ptr + b * c_b + g * c_g + offs_n * c_n, mask=mask_n, other=0.0).to(tl.float32)

    state = state * tl.exp2(dt[:, None] * A * LOG2E) + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state, mask=mask)
    y = tl.sum(state * C[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + m * d_m + h * d_h + offs_p * d_p, mask=mask_p, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * z_b + h * z_h + offs_p * z_p, mask=mask_p, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(out_ptr + b * o_b + h * o_h + offs_p * o_p, y.to(out_ptr.dtype.element_ty), mask=mask_p)


_STATE_UPDATE = Launcher(_state_update_kernel, pointers=11)


def _param_strides(t: torch.Tensor | None, dims: int) -> list[int]:
    """The stride along a parameter's leading ``M`` (0 when it is shared, so that every modality id reads the
    same row), then the strides of its ``dims`` trailing dimensions; zeros for a missing parameter."""
    if t is None:
        return [0] * (dims + 1)
    return [t.stride(0) if t.dim() > dims else 0, *t.stride()[t.dim() - dims:]]


def _strides(t: torch.Tensor | None, dims: int) -> list[int]:
    """The strides of ``t``, zeros for a missing tensor."""
    return [0] * dims if t is None else list(t.stride())


def selective_state_update(*, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, modality):
    """:func:`momkit.ops.selective_state_update` in one launch; ``state`` must be float32.

    Mamba-1's channels layout is addressed as one head of ``d`` channels through strides with a zero for the
    head (and group) dimension, not reshaped: a view costs a decoding step more host time than its arithmetic."""
    refuse_float64("decoding update", state=state, x=x, A=A)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if state.dim() == 4:
        batch, heads, channels, n = state.shape
        groups = B.shape[1]
        strides = (*state.stride(), *x.stride(), *dt.stride(), *_param_strides(A, 3), *B.stride(), *C.stride(),
                   *_param_strides(D, 2), *_strides(z, 3), *_param_strides(dt_bias, 2), *out.stride())
    else:
        batch, channels, n = state.shape
        heads = groups = 1
        strides = (*_one_head(state.stride()), *_one_head(x.stride()), *_one_head(dt.stride()),
                   *_one_head(_param_strides(A, 2)), *_one_head(B.stride()), *_one_head(C.stride()),
                   *_one_head(_param_strides(D, 1)), *_one_head(_strides(z, 2)),
                   *_one_head(_param_strides(dt_bias, 1)), *_one_head(out.stride()))
    block_n = max(16, pow2(n))
    block_p = max(1, min(pow2(channels), 4096 // block_n))
    grid = (cdiv(channels, block_p), batch * heads)
    _STATE_UPDATE(
        grid, state, x, dt, A, B, C, D, z, dt_bias, modality, out, heads, channels, n, heads // groups,
        *_strides(modality, 1), *strides,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, HAS_MOD=modality is not None,
        SOFTPLUS=bool(dt_softplus), BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4)
    return out


def _one_head(strides) -> tuple[int, ...]:
    """``strides`` with a zero inserted after the first (the batch's, or a parameter's ``M``): a tensor of
    Mamba-1's layout read as one of one head."""
    return (strides[0], 0, *strides[1:])


@triton.jit
def _conv_update_kernel(x_ptr, state_ptr, w_ptr, bias_ptr, mod_ptr, out_ptr, channels, width, mod_b,
                        x_b, x_c, s_b, s_c, s_k, w_m, w_c, w_k, bias_m, bias_c, o_b, o_c,
                        HAS_BIAS: tl.constexpr, HAS_MOD: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(1)
    m = tl.load(mod_ptr + b * mod_b) if HAS_MOD else 0
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < channels
    row = state_ptr + b * s_b + offs_c[:, None] * s_c
    older = tl.load(row + (offs_k[None, :] + 1) * s_k, mask=mask_c[:, None] & (offs_k[None, :] < width - 1),
                    other=0.0)
    x = tl.load(x_ptr + b * x_b + offs_c * x_c, mask=mask_c, other=0.0)
    window = tl.where(offs_k[None, :] == width - 1, x[:, None].to(older.dtype), older)
    inside = mask_c[:, None] & (offs_k[None, :] < width)
    tl.store(row + offs_k[None, :] * s_k, window, mask=inside)
    w = tl.load(w_ptr + m * w_m + offs_c[:, None] * w_c + offs_k[None, :] * w_k, mask=inside, other=0.0)
    y = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + m * bias_m + offs_c * bias_c, mask=mask_c, other=0.0).to(tl.float32)
    if SILU:
        y *= tl.sigmoid(y)
    tl.store(out_ptr + b * o_b + offs_c * o_c, y.to(out_ptr.dtype.element_ty), mask=mask_c)


_CONV_UPDATE = Launcher(_conv_update_kernel, pointers=6)


def conv_state_update(*, x, conv_state, weight, bias, activation, modality):
    """:func:`momkit.ops.conv_state_update` in one launch."""
    refuse_float64("decoding update", x=x, conv_state=conv_state, weight=weight)
    batch, channels = x.shape
    width = conv_state.shape[-1]
    out = torch.empty_like(x)
    block_k = pow2(width)
    block_c = max(1, min(pow2(channels), 2048 // block_k))
    grid = (cdiv(channels, block_c), batch)
    _CONV_UPDATE(
        grid, x, conv_state, weight, bias, modality, out, channels, width, *_strides(modality, 1),
        *x.stride(), *conv_state.stride(), *_param_strides(weight, 2), *_param_strides(bias, 1), *out.stride(),
        HAS_BIAS=bias is not None, HAS_MOD=modality is not None, SILU=activation == "silu", BLOCK_C=block_c,
        BLOCK_K=block_k, num_warps=4)
    return out
