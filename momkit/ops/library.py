"""The training front doors as ``torch.library`` custom operators, for ``torch.compile``.

While :func:`torch.compile` traces a model, :func:`momkit.ops.selective_scan`, :func:`momkit.ops.ssd_scan`,
:func:`momkit.ops.routed_linear`, :func:`momkit.ops.causal_conv1d`, :func:`momkit.ops.router_logits`,
:func:`momkit.ops.expert_slots`, :func:`momkit.ops.gated_residual` and :func:`momkit.ops.gated_mix` call
``torch.ops.momkit.<name>`` instead of running their backend directly: an operator opaque to the tracer (its
argument checks and the backend's choice, which read tensor values, run when the compiled graph runs), with a fake
implementation that gives its output's shape and dtype, and, for all but ``expert_slots`` (whose outputs are
integers), an autograd formula. The backward is itself an operator, ``torch.ops.momkit.<name>_backward``: it runs
the same backend forward again under autograd and takes the gradients of the inputs from it (one recomputation of
the forward in exchange for keeping the backends' own autograd). In eager mode the front doors do not go through
these operators.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from momkit.ops import dispatch

NAMESPACE = "momkit"


def _gradients(run: Callable[..., Tensor], inputs: list[Optional[Tensor]], grad: Tensor) -> list[Tensor]:
    """Gradients of ``run(*inputs)`` against ``grad`` for every floating input (an empty tensor for an absent
    or integer one), ``run`` evaluated again under autograd."""
    leaves = [t.detach().requires_grad_(True) if t is not None and t.is_floating_point() else t for t in inputs]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    # An operator's implementation runs with the autograd (and autocast) dispatch keys excluded; lift the
    # exclusion so that the backend's forward records its graph (its inputs are already in their dtype).
    everything = torch._C.DispatchKeySet(torch._C.DispatchKey.Undefined)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), everything), \
            torch.autocast(grad.device.type, enabled=False), torch.enable_grad():
        out = run(*leaves)
        found = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
    grads = []
    for t in leaves:
        g = next(found) if t is not None and t.requires_grad else None
        grads.append(t.new_zeros(t.shape) if g is None and t is not None and t.is_floating_point() else
                     g.contiguous() if g is not None else torch.empty(0, device=grad.device))
    return grads


def _fake_gradients(inputs: list[Optional[Tensor]], grad: Tensor) -> list[Tensor]:
    return [t.new_empty(t.shape) if t is not None and t.is_floating_point() else grad.new_empty(0) for t in inputs]


def _differentiable(op, backward_op, n_inputs: int) -> None:
    """Register ``op``'s autograd: save its inputs, and in the backward call ``backward_op(grad, *inputs,
    *other arguments)``, whose list gives the gradients of the first ``n_inputs`` (``None`` for the
    placeholders of absent or integer inputs)."""

    def setup_context(ctx, inputs, output):
        ctx.saved = inputs

    def backward(ctx, grad):
        inputs = ctx.saved
        grads = backward_op(grad, *inputs)
        tensors = [None if t is None or not t.is_floating_point() else g for g, t in zip(grads, inputs[:n_inputs])]
        return (*tensors, *(None for _ in inputs[n_inputs:]))

    op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op(f"{NAMESPACE}::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                   z: Optional[Tensor], delta_bias: Optional[Tensor], modality: Optional[Tensor],
                   seq_idx: Optional[Tensor], delta_softplus: bool, backend: str) -> Tensor:
    """:func:`momkit.ops.selective_scan` (without ``return_last_state``) as one operator."""
    return dispatch.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, False, modality, seq_idx,
                                   backend).contiguous()


@selective_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus, backend):
    return u.new_empty(u.shape)


@torch.library.custom_op(f"{NAMESPACE}::selective_scan_backward", mutates_args=())
def selective_scan_backward(grad: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Optional[Tensor], z: Optional[Tensor], delta_bias: Optional[Tensor],
                            modality: Optional[Tensor], seq_idx: Optional[Tensor], delta_softplus: bool,
                            backend: str) -> list[Tensor]:
    """Gradients of :func:`selective_scan` for ``u, delta, A, B, C, D, z, delta_bias``."""
    return _gradients(lambda *t: dispatch.selective_scan(*t, delta_softplus, False, modality, seq_idx, backend),
                      [u, delta, A, B, C, D, z, delta_bias], grad)


@selective_scan_backward.register_fake
def _(grad, u, delta, A, B, C, D, z, delta_bias, modality, seq_idx, delta_softplus, backend):
    return _fake_gradients([u, delta, A, B, C, D, z, delta_bias], grad)


@torch.library.custom_op(f"{NAMESPACE}::ssd_scan", mutates_args=())
def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor], z: Optional[Tensor],
             dt_bias: Optional[Tensor], initial_states: Optional[Tensor], seq_idx: Optional[Tensor],
             modality: Optional[Tensor], chunk_size: int, dt_softplus: bool, backend: str) -> Tensor:
    """:func:`momkit.ops.ssd_scan` (without ``return_final_states``) as one operator."""
    return dispatch.ssd_scan(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, False,
                             modality, backend).contiguous()


@ssd_scan.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, modality, chunk_size, dt_softplus, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{NAMESPACE}::ssd_scan_backward", mutates_args=())
def ssd_scan_backward(grad: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                      z: Optional[Tensor], dt_bias: Optional[Tensor], initial_states: Optional[Tensor],
                      seq_idx: Optional[Tensor], modality: Optional[Tensor], chunk_size: int, dt_softplus: bool,
                      backend: str) -> list[Tensor]:
    """Gradients of :func:`ssd_scan` for ``x, dt, A, B, C, D, z, dt_bias, initial_states``."""
    return _gradients(lambda x, dt, A, B, C, D, z, dt_bias, initial_states: dispatch.ssd_scan(
        x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, False, modality, backend),
        [x, dt, A, B, C, D, z, dt_bias, initial_states], grad)


@ssd_scan_backward.register_fake
def _(grad, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, modality, chunk_size, dt_softplus, backend):
    return _fake_gradients([x, dt, A, B, C, D, z, dt_bias, initial_states], grad)


@torch.library.custom_op(f"{NAMESPACE}::routed_linear", mutates_args=())
def routed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], modality: Tensor, order: Optional[Tensor],
                  groups: Optional[Tensor], backend: str) -> Tensor:
    """:func:`momkit.ops.routed_linear` as one operator (its inputs already in the autocast dtype)."""
    return dispatch.routed_linear(x, weight, bias, modality, backend, order, groups).contiguous()


@routed_linear.register_fake
def _(x, weight, bias, modality, order, groups, backend):
    return x.new_empty(*x.shape[:-1], weight.shape[1])


@torch.library.custom_op(f"{NAMESPACE}::routed_linear_backward", mutates_args=())
def routed_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], modality: Tensor,
                           order: Optional[Tensor], groups: Optional[Tensor], backend: str) -> list[Tensor]:
    """Gradients of :func:`routed_linear` for ``x, weight, bias``."""
    return _gradients(lambda *t: dispatch.routed_linear(*t, modality, backend, order, groups), [x, weight, bias],
                      grad)


@routed_linear_backward.register_fake
def _(grad, x, weight, bias, modality, order, groups, backend):
    return _fake_gradients([x, weight, bias], grad)


@torch.library.custom_op(f"{NAMESPACE}::causal_conv1d", mutates_args=())
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], seq_idx: Optional[Tensor],
                  modality: Optional[Tensor], backend: str) -> Tensor:
    """:func:`momkit.ops.causal_conv1d` as one operator."""
    return dispatch.causal_conv1d(x, weight, bias, seq_idx, modality, backend).contiguous()


@causal_conv1d.register_fake
def _(x, weight, bias, seq_idx, modality, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{NAMESPACE}::causal_conv1d_backward", mutates_args=())
def causal_conv1d_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                           seq_idx: Optional[Tensor], modality: Optional[Tensor], backend: str) -> list[Tensor]:
    """Gradients of :func:`causal_conv1d` for ``x, weight, bias``."""
    return _gradients(lambda *t: dispatch.causal_conv1d(*t, seq_idx, modality, backend), [x, weight, bias], grad)


@causal_conv1d_backward.register_fake
def _(grad, x, weight, bias, seq_idx, modality, backend):
    return _fake_gradients([x, weight, bias], grad)


@torch.library.custom_op(f"{NAMESPACE}::router_logits", mutates_args=())
def router_logits(x: Tensor, weight: Tensor, modality: Optional[Tensor], eps: float, backend: str) -> Tensor:
    """:func:`momkit.ops.router_logits` as one operator."""
    return dispatch.router_logits(x, weight, modality, eps, backend).contiguous()


@router_logits.register_fake
def _(x, weight, modality, eps, backend):
    dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
    return x.new_empty(*x.shape[:-1], weight.shape[-2], dtype=dtype)


@torch.library.custom_op(f"{NAMESPACE}::router_logits_backward", mutates_args=())
def router_logits_backward(grad: Tensor, x: Tensor, weight: Tensor, modality: Optional[Tensor], eps: float,
                           backend: str) -> list[Tensor]:
    """Gradients of :func:`router_logits` for ``x, weight``."""
    return _gradients(lambda *t: dispatch.router_logits(*t, modality, eps, backend), [x, weight], grad)


@router_logits_backward.register_fake
def _(grad, x, weight, modality, eps, backend):
    return _fake_gradients([x, weight], grad)


@torch.library.custom_op(f"{NAMESPACE}::expert_slots", mutates_args=())
def expert_slots(ids: Tensor, modality: Tensor, n_ids: int, n_modalities: int, n_experts: int,
                 capacity_factor: Optional[float], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`momkit.ops.expert_slots` as one operator (integer outputs, no gradient)."""
    out = dispatch.expert_slots(ids, modality, n_ids, n_modalities, n_experts, capacity_factor, backend)
    return tuple(t.contiguous() for t in out)


@expert_slots.register_fake
def _(ids, modality, n_ids, n_modalities, n_experts, capacity_factor, backend):
    slots = ids.new_empty(ids.numel(), dtype=torch.long)
    return (slots, ids.new_empty(ids.shape, dtype=torch.bool), ids.new_empty(n_ids, dtype=torch.long),
            ids.new_empty(n_modalities, n_ids, dtype=torch.long), ids.new_empty((), dtype=torch.long))


@torch.library.custom_op(f"{NAMESPACE}::gated_residual", mutates_args=())
def gated_residual(x: Tensor, branch: Tensor, gate: Tensor, backend: str) -> Tensor:
    """:func:`momkit.ops.gated_residual` as one operator."""
    return dispatch.gated_residual(x, branch, gate, backend).contiguous()


@gated_residual.register_fake
def _(x, branch, gate, backend):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, branch.dtype))


@torch.library.custom_op(f"{NAMESPACE}::gated_residual_backward", mutates_args=())
def gated_residual_backward(grad: Tensor, x: Tensor, branch: Tensor, gate: Tensor, backend: str) -> list[Tensor]:
    """Gradients of :func:`gated_residual` for ``branch, gate``; ``x``'s is the output's (an operator may not
    return its input)."""
    return _gradients(lambda *t: dispatch.gated_residual(x, *t, backend), [branch, gate], grad)


@gated_residual_backward.register_fake
def _(grad, x, branch, gate, backend):
    return _fake_gradients([branch, gate], grad)


def _residual_context(ctx, inputs, output):
    ctx.saved = inputs


def _residual_backward(ctx, grad):
    x, branch, gate, backend = ctx.saved
    return (grad.to(x.dtype), *gated_residual_backward(grad, x, branch, gate, backend), None)


gated_residual.register_autograd(_residual_backward, setup_context=_residual_context)


@torch.library.custom_op(f"{NAMESPACE}::gated_mix", mutates_args=())
def gated_mix(x: Tensor, y: Tensor, gate: Tensor, backend: str) -> Tensor:
    """:func:`momkit.ops.gated_mix` as one operator."""
    return dispatch.gated_mix(x, y, gate, backend).contiguous()


@gated_mix.register_fake
def _(x, y, gate, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op(f"{NAMESPACE}::gated_mix_backward", mutates_args=())
def gated_mix_backward(grad: Tensor, x: Tensor, y: Tensor, gate: Tensor, backend: str) -> list[Tensor]:
    """Gradients of :func:`gated_mix` for ``x, y, gate``."""
    return _gradients(lambda *t: dispatch.gated_mix(*t, backend), [x, y, gate], grad)


@gated_mix_backward.register_fake
def _(grad, x, y, gate, backend):
    return _fake_gradients([x, y, gate], grad)


_differentiable(selective_scan, selective_scan_backward, 8)
_differentiable(ssd_scan, ssd_scan_backward, 9)
_differentiable(routed_linear, routed_linear_backward, 3)
_differentiable(causal_conv1d, causal_conv1d_backward, 3)
_differentiable(router_logits, router_logits_backward, 2)
_differentiable(gated_mix, gated_mix_backward, 3)
