"""Learned experts, the second routing mode: a router per block picks, for each token, ``top_k`` of the
``n_experts`` weight sets of the block's expert sublayers.

A block with experts runs once per slot ``j < top_k``: in run ``j`` every expert sublayer applies to each
token the weights of the token's ``j``-th expert (the same grouped routed-linear kernels as modality routing,
with expert ids in place of modality ids), and the block's output is ``x + sum_j g_j (run_j(x) - x)``. A block
class with a residual branch (:attr:`momkit.Block.residual`: ``run(x) = x + f(x)``) computes the same sum as ``x +
sum_j g_j f_j(x)``, without the runs' residual additions. For a position-wise layer (a feed-forward network) this
is the usual mixture of experts; for a sequence mixer each slot is a branch with its own state. A position-wise
block's branch runs on its positions sorted by expert, so that each expert's rows lie together (the expert
sublayers get the ids' ``groups`` in place of ``order``).

The router reads the block's input through a parameter-free RMS normalisation: ``p = softmax(W rms(x))``
(``W`` per modality with ``per_modality``, whose experts are then numbered ``m * n_experts + e``), in float32 at
least, also under autocast (Switch Transformer's selective precision: a router in bfloat16 rounds its logits,
and with them its choices); :func:`momkit.ops.router_logits` computes its logits. The gates
are ``g_j = p_j / sg(sum of the chosen p)``: their values are the renormalised top-k probabilities, which sum
to one, so experts holding identical weights compute exactly the dense layer; their gradient reaches the
router as the Switch Transformer's gate ``p_j`` does (``sg`` stops the gradient), also for ``top_k = 1``.
Finite differences do not see that gradient (the gate's value is locally constant at ``top_k = 1``): it is an
estimator, as in Switch Transformer. ``gradient: exact`` gives the renormalised gates their exact gradient
instead (which the block contract's finite-difference check uses).

In training with a ``capacity_factor``, expert ``i`` takes at most ``ceil(capacity_factor * top_k * N /
n_experts)`` token slots of the ``N`` tokens its router sees, slot 0 of every token before slot 1 and tokens
in order; a dropped slot adds nothing (``g_j = 0``). The load-balancing loss is Switch Transformer's
``n_experts * sum_i f_i P_i`` (``f_i`` the fraction of slots routed to expert ``i``, ``P_i`` its mean
probability), per router; the z-loss the mean square of the logits' log-sum-exp, computed as the top logit less
the log of its probability (``lse = l_i - log p_i`` for any ``i``; the top one is the best conditioned), from the
softmax already taken instead of another pass over the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from momkit import ops
from momkit.errors import PluginError, SpecError
from momkit.routing import Linear

EPS = 1e-6


@dataclass
class Choice:
    """The expert ids the expert sublayers of a block apply in the current run: ``(b, l)`` or ``(b,)``, and either
    the permutation of the flattened positions that groups them (``None`` when decoding), which the grouped kernels
    form their tiles by (:func:`momkit.ops.routed_linear`'s ``order``), or, for positions the block has sorted by
    expert, where each id's positions end (its ``groups``)."""

    ids: torch.Tensor | None = None
    order: torch.Tensor | None = None
    groups: torch.Tensor | None = None


@dataclass
class RouterStats:
    """What a block's router measured in its last forward pass.

    Attributes:
        balance: Load-balancing loss (a scalar tensor with gradient).
        z: Router z-loss (a scalar tensor with gradient).
        counts: ``(M, n_ids)`` token slots kept per modality and expert id.
        dropped: Token slots dropped by the capacity (a scalar tensor, so routing never waits for the device).
        slots: Token slots routed (tokens times ``top_k``).
    """

    balance: torch.Tensor
    z: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    slots: int


@dataclass
class Route:
    """A router's decision: ``ids (..., top_k)`` expert ids and ``gates (..., top_k)``, its statistics, and the
    stable argsort of the slot-major flattened ids (``ids.t()`` of ``(N, top_k)``, :func:`momkit.ops.expert_slots`),
    which with ``top_k = 1`` groups the tokens by expert."""

    ids: torch.Tensor
    gates: torch.Tensor
    stats: RouterStats
    order: torch.Tensor | None = None


def sort_slots(ids: torch.Tensor, modality: torch.Tensor, n_ids: int, n_modalities: int, n_experts: int,
               capacity_factor: float | None) -> tuple[torch.Tensor, ...]:
    """:func:`momkit.ops.expert_slots` in PyTorch operations: the stable argsort of the slot-major ids (``ids.t()``
    flattened) by :func:`group_order`, and from the ranks it gives each slot among its id's, the capacity's mask;
    the picks per id, the kept slots per modality and id, and the dropped slots counted with ``index_add_``
    (``bincount`` would read its length on the host). One router set sees every token, so its capacity is a number
    on the host. The reference backend's, and the Triton backend's beyond the ids its kernels take."""
    n, k = ids.shape
    slot_major = ids.t().reshape(-1)
    picks = torch.zeros(n_ids, dtype=torch.long, device=ids.device)
    picks.index_add_(0, slot_major, torch.ones_like(slot_major))
    order = group_order(slot_major, n_ids)
    if capacity_factor is None:
        keep = torch.ones_like(ids, dtype=torch.bool)
    else:
        ranked_ids = slot_major[order]
        rank = torch.arange(len(order), device=ids.device) - torch.searchsorted(ranked_ids, ranked_ids)
        if n_ids == n_experts:
            kept = rank < math.ceil(capacity_factor * k * n / n_experts)
        else:
            tokens = picks.view(-1, n_experts).sum(1) // k
            capacity = torch.ceil(capacity_factor * k * tokens.double() / n_experts).long()
            kept = rank < capacity[ranked_ids // n_experts]
        keep = torch.empty_like(kept).index_put_((order,), kept).reshape(k, n).t()
    counts = torch.zeros(n_modalities * n_ids, dtype=torch.long, device=ids.device)
    counts.index_add_(0, (modality[:, None] * n_ids + ids).reshape(-1), keep.reshape(-1).long())
    return order, keep, picks, counts.view(n_modalities, n_ids), ids.numel() - counts.sum()


def group_order(ids: torch.Tensor, n_ids: int) -> torch.Tensor:
    """The stable argsort of ``ids`` (flattened, values in ``0..n_ids-1``): the order that groups the positions by
    id. It sorts keys of the narrowest integer dtype that holds the ids, since a GPU's radix sort makes one pass
    per byte of key: one for up to 256 ids, where int64 keys take eight."""
    keys = ids.reshape(-1)
    narrow = next((d for d in (torch.uint8, torch.int16) if n_ids - 1 <= torch.iinfo(d).max), torch.int32)
    return torch.argsort(keys.to(narrow), stable=True)


class Router(nn.Module):
    """A block's router: ``n_experts`` logits per token from ``rms(x)``, one weight matrix, or one per modality.

    Args:
        d_model: Width of the block's input.
        experts: The :class:`momkit.spec.ExpertsSpec`.
        n_modalities: ``M``.
        backend: Kernel backend of the (per-modality) projection.
    """

    def __init__(self, d_model: int, experts, n_modalities: int, backend: str = "auto"):
        super().__init__()
        self.experts, self.n_modalities, self.backend = experts, n_modalities, backend
        self.proj = Linear(d_model, experts.n_experts, bias=False,
                           n_modalities=n_modalities if experts.per_modality else None, backend=backend)

    @property
    def n_ids(self) -> int:
        """Expert ids: ``n_experts``, or ``M * n_experts`` with ``per_modality``."""
        return self.experts.n_experts * (self.n_modalities if self.experts.per_modality else 1)

    def forward(self, x: torch.Tensor, modality: torch.Tensor, training: bool) -> Route:
        """Route ``x (..., d)`` of ``modality (...)``; the capacity applies when ``training``."""
        e, k, per_modality = self.experts.n_experts, self.experts.top_k, self.experts.per_modality
        logits = ops.router_logits(x, self.proj.weight, modality if per_modality else None, eps=EPS,
                                   backend=self.backend)
        probs = logits.softmax(-1)
        top_p, top_e = probs.max(-1, keepdim=True) if k == 1 else probs.topk(k, dim=-1)
        total = top_p if k == 1 else top_p.sum(-1, keepdim=True)
        gates = top_p / (total.detach() if self.experts.gradient == "switch" else total)
        ids = top_e + (modality * e)[..., None] if per_modality else top_e
        flat_ids, flat_modality = ids.reshape(-1, k), modality.reshape(-1)
        factor = self.experts.capacity_factor if training else None
        order, keep, picks, counts, dropped = ops.expert_slots(
            flat_ids, flat_modality, self.n_ids, self.n_modalities, n_experts=e, capacity_factor=factor,
            backend=self.backend)
        if factor is not None:
            gates = gates * keep.reshape(gates.shape)
        tokens = picks.view(-1, e).sum(1) // k if per_modality else len(flat_ids)
        lse = logits.gather(-1, top_e[..., :1]) - top_p[..., :1].log()
        balance, z = self._losses(lse, probs.reshape(-1, e), picks, tokens, flat_modality)
        return Route(ids, gates.to(x.dtype), RouterStats(balance, z, counts, dropped, ids.numel()), order)

    def group_order(self, ids: torch.Tensor) -> torch.Tensor:
        """:func:`group_order` of expert ids of this router."""
        return group_order(ids, self.n_ids)

    def add_branch(self, x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x + gate branch`` for ``branch`` a block's residual branch on the chosen experts
        (:func:`momkit.ops.gated_residual` on the router's backend)."""
        return ops.gated_residual(x, branch, gate, backend=self.backend)

    def mix(self, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The block's output at top 1, ``x + gate (y - x)`` for ``y`` its run on the chosen experts
        (:func:`momkit.ops.gated_mix` on the router's backend)."""
        return ops.gated_mix(x, y, gate, backend=self.backend)

    def _losses(self, lse, probs, picks, tokens, modality) -> tuple[torch.Tensor, torch.Tensor]:
        """The load-balancing loss and the z-loss of a routing: ``lse`` the logits' log-sum-exp, ``picks
        (n_ids,)`` the slots that chose each id before the capacity, ``tokens`` those each router set saw (a tensor
        per set with ``per_modality``, else an int)."""
        e, k = self.experts.n_experts, self.experts.top_k
        chosen = picks.view(-1, e).to(probs.dtype)
        if self.experts.per_modality:
            mass = probs.new_zeros(self.n_modalities, e).index_add_(0, modality, probs)
            seen = tokens.clamp(min=1).to(probs.dtype)[:, None]
            present = (tokens > 0).to(probs.dtype)
            per_set = e * (chosen / (k * seen) * mass / seen).sum(-1)
            balance = (per_set * present).sum() / present.sum().clamp(min=1)
        else:
            seen = max(tokens, 1)
            balance = torch.dot(chosen.reshape(-1), probs.sum(0)) * (e / (k * seen * seen))
        squares = lse.square()
        return balance, squares.mean() if lse.numel() else squares.sum()


@dataclass
class RouterSummary:
    """The routers of a model's blocks over one forward pass.

    Attributes:
        aux_loss: The auxiliary loss to add to the training loss: per block, ``balance_loss`` times its
            load-balancing loss plus ``z_loss`` times its z-loss, summed over blocks.
        balance: Load-balancing loss, averaged over the blocks with experts.
        z: Router z-loss, averaged over those blocks.
        counts: ``(M, n_ids)`` kept token slots per modality and expert id, summed over the blocks whose
            expert ids are numbered as the first's.
        dropped: Token slots dropped by the capacity, summed over blocks (a scalar tensor).
        slots: Token slots routed, summed over blocks.
    """

    aux_loss: torch.Tensor
    balance: torch.Tensor
    z: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    slots: int

    @classmethod
    def of(cls, blocks) -> RouterSummary | None:
        """The summary of the blocks with experts among ``blocks`` (after a forward pass), ``None`` if none."""
        routed = [b for b in blocks if b.experts is not None and b.router_stats is not None]
        if not routed:
            return None
        stats = [b.router_stats for b in routed]
        aux = sum(b.experts.balance_loss * s.balance + b.experts.z_loss * s.z for b, s in zip(routed, stats))
        counts = sum(s.counts for s in stats if s.counts.shape == stats[0].counts.shape)
        return cls(aux, torch.stack([s.balance for s in stats]).mean(), torch.stack([s.z for s in stats]).mean(),
                   counts, sum(s.dropped for s in stats), sum(s.slots for s in stats))


def linear_sublayers(block: nn.Module, sublayers) -> list[str]:
    """The sublayers of ``block`` made of :class:`momkit.routing.Linear` layers alone (which experts can hold)."""
    linear = []
    for name in sublayers:
        part = getattr(block, name, None)
        if isinstance(part, nn.Module) and all(isinstance(m, Linear) or not list(m.parameters(recurse=False))
                                               for m in part.modules()) and any(isinstance(m, Linear)
                                                                                for m in part.modules()):
            linear.append(name)
    return linear


def attach(block, sublayers) -> None:
    """Give a built block with experts its :class:`Router` and :class:`Choice`, and point the linear layers of
    its expert sublayers at the choice; ``SpecError`` for an expert sublayer not made of linear layers.
    ``sublayers`` are the backbone's."""
    experts = block.experts
    block.router = Router(block.d_model, experts, block.n_modalities, block.backend)
    block.choice = Choice()
    valid = linear_sublayers(block, sublayers)
    for name in experts.sublayers:
        if name not in valid:
            raise SpecError(f"routing.experts.sublayers names {name!r}, which is not a linear sublayer of backbone "
                            f"{block.config.kind!r}; its linear sublayers: {', '.join(valid) or 'none'}")
        for layer in getattr(block, name).modules():
            if isinstance(layer, Linear):
                if layer.n_modalities != block.routing(name):
                    raise PluginError(f"backbone {block.config.kind!r} builds sublayer {name!r} without "
                                      f"n_modalities=self.routing({name!r}), so it cannot hold experts")
                layer.choice = block.choice


def mutual_information(counts: torch.Tensor) -> tuple[float, float]:
    """Mutual information (bits) between modality and expert id of a ``(M, n_ids)`` count table, and its share
    of the modality's entropy (1: the expert determines the modality; 0: independent)."""
    joint = counts.double() / max(float(counts.sum()), 1.0)
    pm, pe = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    info = float((joint[nonzero] * torch.log2(joint[nonzero] / (pm @ pe)[nonzero])).sum())
    entropy = float(-(pm[pm > 0] * torch.log2(pm[pm > 0])).sum())
    return info, info / entropy if entropy > 0 else math.nan
