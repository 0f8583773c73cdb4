"""The Triton router logits, gated residual and gated mix against float64 formulas written out per token, forward
and backward; the Triton expert slots against the capacity written out slot by slot.

Small odd shapes (a width that is not a multiple of the kernels' column block, fewer experts than their padded
block, row groups that end inside a block) run under Triton's interpreter on CPU tensors when
``TRITON_INTERPRET=1`` is set, otherwise on a CUDA GPU; the shapes of a training batch run only on a CUDA GPU.
Each comparison is the relative Frobenius error of the output and of every input's gradient for a random
linear loss, against float64 on the same (rounded) inputs, within ``TOLERANCE`` of the inputs' dtype.
"""

import math

import pytest
import torch

from momkit.experts import sort_slots
from tests.kernels.conftest import DEVICE, TOLERANCE, assert_close

KERNELS = "momkit.kernels.triton.experts"
EPS = 1e-6


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def reference_logits(x, weight, modality):
    """``rms(x_i) . W_{m_i, e}`` token by token, in float64."""
    h = x / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS)
    picked = weight[None].expand(len(x), *weight.shape) if weight.dim() == 2 else weight[modality]
    return torch.einsum("nd,ned->ne", h, picked)


def outputs_and_grads(fn, inputs: dict, seed: int) -> dict:
    """The output of ``fn(**inputs)`` and the gradients of its floating inputs for the linear loss of weights
    drawn in float64 from ``seed`` and rounded to the output's dtype."""
    leaves = {k: v.detach().clone().requires_grad_(True) if v is not None and v.is_floating_point() else v
              for k, v in inputs.items()}
    out = fn(**leaves)
    loss_gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=loss_gen, dtype=torch.float64).to(out.device, out.dtype)
    wanted = {k: v for k, v in leaves.items() if v is not None and v.is_floating_point()}
    grads = torch.autograd.grad((out * w).sum(), list(wanted.values()))
    return {"out": out, **{f"d{k}": g for k, g in zip(wanted, grads)}}


def router_case(gen, n, d, e, sets, dtype, absent=None):
    ids = [s for s in range(sets) if s != absent] if sets else [0]
    modality = torch.tensor(ids)[torch.randint(0, len(ids), (n,), generator=gen)].to(DEVICE)
    weight = randn(gen, *((sets,) if sets else ()), e, d) / d ** 0.5
    return dict(x=randn(gen, n, d, dtype=dtype) * 3, weight=weight, modality=modality if sets else None)


def check_router(kernels, gen, n, d, e, sets, dtype, absent=None):
    inputs = router_case(gen, n, d, e, sets, dtype, absent)
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    got = outputs_and_grads(lambda **a: kernels.router_logits(**a, eps=EPS), inputs, seed)
    wide = {k: v.double() if v is not None and v.is_floating_point() else v for k, v in inputs.items()}
    ref = outputs_and_grads(reference_logits, wide, seed)
    assert got["out"].dtype == torch.float32 and got["dx"].dtype == dtype
    assert_close(got, ref, dtype, f"router n={n} d={d} e={e} sets={sets} {dtype}")
    if absent is not None:
        assert torch.equal(got["dweight"][absent], torch.zeros_like(got["dweight"][absent]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sets", [None, 3])
def test_router_logits(kernels, gen, sets, dtype):
    check_router(kernels, gen, 37, 70, 5, sets, dtype)


def test_router_logits_row_groups_of_several_blocks(kernels, gen):
    """More rows than the backward's groups take in one block: each group's loop runs several blocks and its
    last ends inside one; a modality absent from the batch gets exactly zero weight gradient."""
    n = kernels.ROUTER_GROUPS * kernels.BACKWARD_ROWS * 2 + 5
    check_router(kernels, gen, n, 70, 5, 3, torch.float32, absent=1)


@pytest.mark.parametrize("n, d, e, sets", [(16384 + 3, 1024, 8, None), (4099, 1024, 64, 2), (2050, 4096, 16, 4)])
def test_router_logits_large(cuda_kernels, gen, n, d, e, sets):
    for dtype in (torch.float32, torch.bfloat16):
        check_router(cuda_kernels, gen, n, d, e, sets, dtype)


def check_mix(kernels, gen, n, d, dtype):
    inputs = dict(x=randn(gen, n, d, dtype=dtype), y=randn(gen, n, d, dtype=dtype),
                  gate=torch.rand(n, 1, generator=gen, dtype=torch.float64).to(DEVICE, dtype))
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    got = outputs_and_grads(kernels.gated_mix, inputs, seed)
    wide = {k: v.double() for k, v in inputs.items()}
    ref = outputs_and_grads(lambda x, y, gate: x + gate * (y - x), wide, seed)
    assert all(got[k].dtype == dtype for k in got)
    assert_close(got, ref, dtype, f"gated mix n={n} d={d} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d", [(37, 70), (5, 5000)])
def test_gated_mix(kernels, gen, n, d, dtype):
    check_mix(kernels, gen, n, d, dtype)


def test_gated_mix_large(cuda_kernels, gen):
    for dtype in (torch.float32, torch.bfloat16):
        check_mix(cuda_kernels, gen, 16384 + 3, 1024, dtype)


def check_residual(kernels, gen, n, d, dtype, branch_dtype):
    inputs = dict(x=randn(gen, n, d, dtype=dtype), branch=randn(gen, n, d, dtype=branch_dtype),
                  gate=torch.rand(n, 1, generator=gen, dtype=torch.float64).to(DEVICE, dtype))
    seed = int(torch.randint(0, 2 ** 31, (1,), generator=gen))
    got = outputs_and_grads(kernels.gated_residual, inputs, seed)
    wide = {k: v.double() for k, v in inputs.items()}
    ref = outputs_and_grads(lambda x, branch, gate: x + gate * branch, wide, seed)
    assert got["out"].dtype == torch.promote_types(dtype, branch_dtype)
    assert all(got[f"d{k}"].dtype == v.dtype for k, v in inputs.items())
    label = f"gated residual n={n} d={d} {dtype} + {branch_dtype}"
    assert_close({"dbranch": got.pop("dbranch")}, {"dbranch": ref.pop("dbranch")}, branch_dtype, label)
    assert_close(got, ref, dtype, label)


@pytest.mark.parametrize("dtype, branch_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("n, d", [(37, 70), (5, 5000)])
def test_gated_residual(kernels, gen, n, d, dtype, branch_dtype):
    check_residual(kernels, gen, n, d, dtype, branch_dtype)


def test_gated_residual_large(cuda_kernels, gen):
    for dtype, branch_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16)):
        check_residual(cuda_kernels, gen, 16384 + 3, 1024, dtype, branch_dtype)


def slots_by_hand(ids, modality, n_ids, n_modalities, n_experts, factor):
    """:func:`momkit.ops.expert_slots` slot by slot: slots taken slot-major, each id keeping slots while it has
    fewer than its capacity, ``ceil(factor * k * tokens / n_experts)`` over its router set's tokens."""
    n, k = ids.shape
    slot_ids = [int(ids[s % n, s // n]) for s in range(n * k)]
    picks = [slot_ids.count(i) for i in range(n_ids)]
    tokens = [sum(picks[s * n_experts:(s + 1) * n_experts]) // k for s in range(n_ids // n_experts)]
    taken, keep = [0] * n_ids, [[False] * k for _ in range(n)]
    counts = torch.zeros(n_modalities, n_ids, dtype=torch.long)
    for s, i in enumerate(slot_ids):
        if factor is None or taken[i] < math.ceil(factor * k * tokens[i // n_experts] / n_experts):
            taken[i] += 1
            keep[s % n][s // n] = True
            counts[int(modality[s % n]), i] += 1
    order = sorted(range(n * k), key=lambda s: (slot_ids[s], s))
    return dict(order=order, keep=keep, picks=picks, counts=counts.tolist(), dropped=n * k - sum(taken))


def slot_case(gen, n, k, n_ids, n_modalities, skew):
    """Random ids, ``skew`` of them on id 1 so that its capacity drops slots."""
    ids = torch.randint(0, n_ids, (n, k), generator=gen)
    ids[torch.rand(n, k, generator=gen) < skew] = 1
    return ids.to(DEVICE), torch.randint(0, n_modalities, (n,), generator=gen).to(DEVICE)


def as_lists(slots) -> dict:
    order, keep, picks, counts, dropped = slots
    return dict(order=order.tolist(), keep=keep.tolist(), picks=picks.tolist(), counts=counts.tolist(),
                dropped=int(dropped))


@pytest.mark.parametrize("n, k, n_ids, n_experts, n_modalities, factor", [
    (37, 1, 3, 3, 2, 1.25), (300, 2, 8, 4, 2, 0.6), (301, 3, 8, 8, 3, None), (600, 1, 300, 100, 3, 1.1),
    (1, 1, 5, 5, 1, 0.2), (40, 2, 4, 2, 1, 1e12)])
def test_expert_slots_match_the_slots_written_out(kernels, gen, n, k, n_ids, n_experts, n_modalities, factor):
    """Odd slot counts, several blocks of slots (the second and fourth cases), more blocks than one step of the
    scan's loop takes (the fourth: 300 ids make blocks of 16 slots, 38 of them, in steps of 16), router sets, no
    capacity, and a capacity past int32's range (the last)."""
    ids, modality = slot_case(gen, n, k, n_ids, n_modalities, skew=0.4)
    got = as_lists(kernels.expert_slots(ids=ids, modality=modality, n_ids=n_ids, n_modalities=n_modalities,
                                        n_experts=n_experts, capacity_factor=factor))
    assert got == slots_by_hand(ids.cpu(), modality.cpu(), n_ids, n_modalities, n_experts, factor)
    assert (factor is None or factor > 1e9 or n == 1) == (got["dropped"] == 0)


@pytest.mark.parametrize("n, k, n_ids, n_experts, n_modalities, factor", [
    (16384, 1, 8, 8, 2, 1.25), (65536 + 5, 2, 64, 8, 8, 1.0), (100003, 1, 1024, 1024, 2, None),
    (20000, 1, 2000, 1000, 2, 1.5)])
def test_expert_slots_large(cuda_kernels, gen, n, k, n_ids, n_experts, n_modalities, factor):
    """A training batch's slots, many ids, and more than ``MOST_SLOT_IDS`` ids (the torch operations' sort), against
    the torch operations."""
    ids, modality = slot_case(gen, n, k, n_ids, n_modalities, skew=0.2)
    args = dict(ids=ids, modality=modality, n_ids=n_ids, n_modalities=n_modalities, n_experts=n_experts,
                capacity_factor=factor)
    assert as_lists(cuda_kernels.expert_slots(**args)) == as_lists(sort_slots(*args.values()))


def test_float64_is_refused(kernels, gen):
    x = randn(gen, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="computes in float32 but x, weight is torch.float64"):
        kernels.router_logits(x, randn(gen, 3, 8, dtype=torch.float64), None, EPS)
    with pytest.raises(ValueError, match="computes in float32 but x, y, gate is torch.float64"):
        kernels.gated_mix(x, x, x[:, :1])
    with pytest.raises(ValueError, match="computes in float32 but x, branch, gate is torch.float64"):
        kernels.gated_residual(x, x, x[:, :1])
