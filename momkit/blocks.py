"""The block contract: :class:`Block`, the abstract base of every backbone's layer, and :class:`Layout`.

This module is the contract in code. A backbone subclasses :class:`Block` and implements its three abstract
methods; the model calls only the methods defined here, with the signatures defined here, and
:mod:`momkit.testing` checks that a block keeps the promises their docstrings make.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from momkit.batch import segments
from momkit.configs import BackboneConfig
from momkit.errors import SpecError
from momkit.ops.checks import check_ids


@dataclass(frozen=True)
class Layout:
    """What a block reads about each position besides its vector: one object, so that a new per-position fact
    does not change every backbone's signature.

    Attributes:
        modality: ``(b, l)`` int64 modality id of each position, the index into the spec's modalities (``(b,)``
            for one decoding step).
        seq_idx: optional ``(b, l)`` int32 or int64 document index of each position for packed sequences; no
            position may see a position of another document. ``None`` for a decoding step (a decoding state
            holds one document per row).
    """

    modality: torch.Tensor
    seq_idx: torch.Tensor | None = None

    @classmethod
    def of(cls, modality: torch.Tensor | Layout, seq_idx: torch.Tensor | None = None) -> Layout:
        """``modality`` as a layout: a :class:`Layout` as it is, a tensor with ``seq_idx`` beside it."""
        if isinstance(modality, Layout):
            if seq_idx is not None:
                raise SpecError("seq_idx was given beside a Layout; put it in the Layout (Layout(modality, "
                                "seq_idx)) instead")
            return modality
        return cls(modality, seq_idx)


@dataclass(frozen=True)
class Spans:
    """Where the bidirectional spans of a batch lie, as index tensors (computed on the device, without a host
    synchronisation or a loop over spans).

    A span is a run of positions of one bidirectional modality within one document (one image); every position
    outside the spans is its own identity.

    Attributes:
        mask: ``(b, l)`` bool, ``True`` inside a span.
        reverse: ``(b, l)`` int64 position that position ``t`` takes when every span is reversed in place
            (``start + end - t`` inside a span from ``start`` to ``end``, ``t`` outside): an involution, so
            ``x.gather(1, reverse)`` reverses the spans and the same gather puts them back.
        segments: ``(b, l)`` int64 id of each position's run of one modality within one document, increasing
            along a row: the ``seq_idx`` under which a scan over the reversed sequence never crosses a span's
            boundary.
        ids: ``(b, l)`` int64 the span id of each position (its segment), ``-1`` outside the spans.
        offset: ``(b, l)`` int64 each position's offset in its segment (0 at the segment's first position).
    """

    mask: torch.Tensor
    reverse: torch.Tensor
    segments: torch.Tensor
    ids: torch.Tensor
    offset: torch.Tensor

    @classmethod
    def of(cls, layout: Layout, bidirectional: Sequence[int]) -> Spans:
        """The spans of the modality ids ``bidirectional`` in ``layout``."""
        modality = layout.modality
        mask = torch.zeros_like(modality, dtype=torch.bool)
        for i in bidirectional:
            mask |= modality == i
        runs = segments(modality, layout.seq_idx)
        index = torch.arange(modality.shape[1], device=modality.device).expand_as(modality)
        starts = torch.ones_like(mask)
        starts[:, 1:] = runs[:, 1:] != runs[:, :-1]
        ends = torch.ones_like(mask)
        ends[:, :-1] = starts[:, 1:]
        first = torch.where(starts, index, 0).cummax(dim=1).values
        last = torch.where(ends, index, modality.shape[1]).flip(1).cummin(dim=1).values.flip(1)
        return cls(mask=mask, reverse=torch.where(mask, first + last - index, index), segments=runs,
                   ids=torch.where(mask, runs, -1), offset=index - first)


def state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a decoding state (a tensor, or dataclasses, lists, tuples and dicts holding tensors), in a
    fixed order; other values (counters, ``None``) are left out."""
    if isinstance(state, torch.Tensor):
        return [state]
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    elif isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in state_tensors(item)]
    return []


def _gather_positions(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t (b, l, ...)`` with position ``p`` of each row taken from ``index[:, p]``; a ``(b, l, d)`` view whose
    memory is ``(b, d, l)`` (a scan's output, transposed) is gathered in that layout, reading memory in order."""
    if t.dim() == 3 and not t.is_contiguous() and t.mT.is_contiguous():
        return t.mT.gather(2, index[:, None, :].expand(t.shape[0], t.shape[2], t.shape[1])).mT
    return t.gather(1, index.reshape(*index.shape, *(1,) * (t.dim() - 2)).expand_as(t))


class _Involution(torch.autograd.Function):
    """:func:`_gather_positions` by a permutation that is its own inverse: its gradient is the same gather (no
    scatter, whose atomic adds are slow on a GPU)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return _gather_positions(t, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return _gather_positions(grad, index), None


class _Rows(torch.autograd.Function):
    """The rows of ``t (n, ...)`` in the order of the permutation ``index``, whose inverse ``inverse`` gathers the
    gradient back (no scatter, whose atomic adds are slow on a GPU)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return t.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def reverse_spans(t: torch.Tensor, spans: Spans) -> torch.Tensor:
    """``t (b, l, ...)`` with every span reversed in place (and, applied again, put back)."""
    return _Involution.apply(t, spans.reverse)


class Block(nn.Module, ABC):
    """Abstract base of backbone blocks: one pre-norm residual layer over interleaved modalities.

    A backbone's block class subclasses this and implements :meth:`run`, :meth:`run_step` and
    :meth:`allocate_state`; the registry refuses a backbone whose block class leaves one of them abstract. It
    is built as ``BlockClass(config, modalities, routed, backend)`` and must call this ``__init__`` first.

    Callers use :meth:`forward` (``block(x, modality)``) and :meth:`step`, which check their inputs (a
    ``SpecError`` naming the bad argument, before any kernel runs) and then call the backbone's :meth:`run`
    and :meth:`run_step`. Every kernel operation of the block (scans, routed linear layers, decoding updates)
    is called with ``backend=self.backend``, the spec's ``scan_backend``.

    A class that sets :attr:`supports_bidirectional` is also built with the keyword ``bidirectional`` (never
    passed to other classes) when the spec names bidirectional modalities; a position-wise block needs nothing
    to be bidirectional and is built without it.

    Args:
        config: The backbone's validated options (a subclass of :class:`momkit.spec.BackboneConfig`).
        modalities: Modality names; a token of modality id ``i`` is of ``modalities[i]``.
        routed: The sublayers that hold one weight set per modality (a :class:`momkit.spec.Routed`, which also
            carries the learned experts, if any).
        backend: The kernel backend of every kernel operation: a registered name or ``"auto"``, or a mapping
            from operation names (and ``default``) to those.
        bidirectional: Names of the modalities whose spans the block sees whole (see :meth:`run`).

    Attributes:
        supports_prefill: Class attribute: whether :meth:`run` takes a decoding state (prefill); ``False``
            unless the backbone sets it, and then :meth:`forward` refuses a state.
        position_wise: Class attribute: whether each output position depends on its own input position alone
            (a feed-forward layer), which makes it bidirectional as it is. With learned experts and a residual
            branch, such a block's branch runs on its positions sorted by expert, as one sequence.
        supports_bidirectional: Class attribute: whether the class takes ``bidirectional`` (spans seen whole).
        capturable_step: Class attribute: whether :meth:`run_step` (and a prefill) can be captured in a CUDA
            graph and replayed: it reads no device value on the host and updates the tensors of its decoding
            state in place, never replacing them; :func:`momkit.generation.generate` then captures the whole
            decoding step on a GPU.
        residual: Class attribute: whether the class implements :meth:`branch`, the residual branch ``f`` of
            :meth:`run` (which returns ``x + f``). Learned experts then add their branches to ``x`` instead of
            mixing whole runs. A subclass that overrides :meth:`run` without :meth:`branch` and does not set it
            itself gets ``False``, so that a branch it inherits never stands for a run it has changed.
        config: The backbone's options.
        d_model: Width of the residual stream.
        modalities: Modality names.
        routed: The routed sublayers.
        experts: The learned experts (:class:`momkit.spec.ExpertsSpec`) or ``None``. With experts,
            :func:`momkit.build_block` gives the block its ``router`` (a :class:`momkit.experts.Router`) once it
            is built, and ``router_stats`` holds the router's :class:`momkit.experts.RouterStats` of the last
            forward pass, until the next one starts (a :class:`momkit.Model` drops every block's when its forward
            starts: a block's statistics hold the autograd graph of the blocks before it too).
        backend: The kernel backend name.
        bidirectional: The bidirectional modalities' names (empty: the block is causal).
    """

    supports_prefill: ClassVar[bool] = False
    position_wise: ClassVar[bool] = False
    supports_bidirectional: ClassVar[bool] = False
    capturable_step: ClassVar[bool] = False
    residual: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "run" in own and "branch" not in own and "residual" not in own:
            cls.residual = False

    def __init__(self, config: BackboneConfig, modalities: Sequence[str], routed: frozenset[str],
                 backend: str = "auto", *, bidirectional: Sequence[str] = ()):
        super().__init__()
        self.config = config
        self.d_model = config.d_model
        self.modalities = list(modalities)
        unknown = [name for name in bidirectional if name not in self.modalities]
        if unknown:
            raise SpecError(f"bidirectional names {unknown}, not modalities of this block: {self.modalities}")
        if bidirectional and not (self.supports_bidirectional or self.position_wise):
            raise SpecError(f"{type(self).__name__} does not support bidirectional spans (bidirectional = "
                            f"{list(bidirectional)}); valid: an empty list")
        self.bidirectional = tuple(bidirectional)
        self.routed = frozenset(routed)
        self.experts = getattr(routed, "experts", None)
        self.backend = backend
        self.router_stats = None

    @property
    def n_modalities(self) -> int:
        """Number of modalities ``M``, the leading dimension of routed parameters."""
        return len(self.modalities)

    def routing(self, sublayer: str) -> int | None:
        """The number of weight sets of ``sublayer``: ``n_modalities`` for a routed one, the number of expert ids
        for an expert one (``n_experts``, times ``n_modalities`` with ``per_modality``), ``None`` for a shared
        one: the ``n_modalities`` argument of the routed layers of :mod:`momkit.routing`."""
        if self.experts is not None and sublayer in self.experts.sublayers:
            return self.experts.n_experts * (self.n_modalities if self.experts.per_modality else 1)
        return self.n_modalities if sublayer in self.routed else None

    def spans(self, layout: Layout) -> Spans | None:
        """The bidirectional spans of ``layout`` (:class:`Spans`), ``None`` for a causal block."""
        if not self.bidirectional:
            return None
        return Spans.of(layout, [self.modalities.index(name) for name in self.bidirectional])

    @property
    def branches(self) -> int:
        """Runs of the block per position: ``top_k`` with experts, else 1 (see :mod:`momkit.experts`)."""
        return 1 if self.experts is None else self.experts.top_k

    def decoding_state(self, batch_size: int, max_length: int | None = None) -> Any:
        """The state :meth:`step` takes: :meth:`allocate_state`'s, or with ``top_k > 1`` experts a list of one per
        branch."""
        if self.branches == 1:
            return self.allocate_state(batch_size, max_length)
        return [self.allocate_state(batch_size, max_length) for _ in range(self.branches)]

    def _mix(self, x: torch.Tensor, route, run: Callable[[int], torch.Tensor], grouped: bool,
             residual: bool = False) -> torch.Tensor:
        """``x + sum_j gates_j (run(j) - x)``, or with ``residual`` (``run`` giving :meth:`branch`) ``x + sum_j
        gates_j run(j)``; run ``j`` with the expert sublayers on the ``j``-th chosen ids (and, when ``grouped``,
        the order that groups them: the capacity's sort where it is that, else an argsort). The ids are made
        contiguous once per run, so that the sublayers' kernels get the same tensor and can share what they
        derive from it."""
        self.router_stats = route.stats
        out = x
        try:
            for j in range(self.branches):
                ids = route.ids[..., j].contiguous()
                order = route.order if self.branches == 1 else None
                if grouped and order is None:
                    order = self.router.group_order(ids)
                self.choice.ids, self.choice.order, self.choice.groups = ids, order if grouped else None, None
                gate = route.gates[..., j, None]
                if residual:
                    out = self.router.add_branch(out, run(j), gate.to(out.dtype))
                elif self.branches == 1:
                    out = self.router.mix(x, run(j), gate)
                else:
                    out = out + gate * (run(j) - x)
        finally:
            self.choice.ids = self.choice.order = self.choice.groups = None
        return out

    def _sorted_branch(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """:meth:`branch` of a position-wise block run on its positions sorted by their chosen expert (by the
        choice's ``order``): the input is gathered into that order once, each expert's rows then lie together,
        so that the expert sublayers multiply them where they lie (:func:`momkit.ops.routed_linear`'s
        ``groups``), and the branch is put back in the positions' order once."""
        choice, rows = self.choice, x.reshape(-1, x.shape[-1])
        order = choice.order
        inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(len(order), device=order.device))
        ids = choice.ids.reshape(-1).index_select(0, order)
        every = torch.arange(self.router.n_ids, device=ids.device)
        choice.ids, choice.order = ids[None], None
        choice.groups = torch.searchsorted(ids, every, right=True, out_int32=True)
        branch = self.branch(_Rows.apply(rows, order, inverse)[None],
                             Layout(layout.modality.reshape(-1).index_select(0, order)[None]))
        width = branch.shape[-1]
        return _Rows.apply(branch.reshape(-1, width), inverse, order).view(*x.shape[:-1], width)

    def forward(self, x: torch.Tensor, modality: torch.Tensor | Layout, seq_idx: torch.Tensor | None = None, *,
                state: Any = None) -> torch.Tensor:
        """The block over whole sequences: ``x (b, l, d_model)`` -> ``(b, l, d_model)``.

        Args:
            x: ``(b, l, d_model)`` floating-point inputs.
            modality: ``(b, l)`` int64 modality ids, or a :class:`Layout` (then without ``seq_idx``).
            seq_idx: optional ``(b, l)`` document index of packed sequences.
            state: optional decoding state from :meth:`allocate_state`; see :meth:`run`.
        """
        layout = Layout.of(modality, seq_idx)
        self.check_inputs(x, layout)
        if state is not None and not self.supports_prefill:
            raise SpecError(f"{type(self).__name__} does not take a decoding state in forward (no prefill); "
                            f"feed the positions one by one through step instead")
        if state is not None and layout.seq_idx is not None:
            raise SpecError("a prefill (forward with a decoding state) takes no seq_idx: each row of a decoding "
                            "state is one document")
        if self.experts is None:
            return self.run(x, layout, state)
        if state is not None:
            raise SpecError("a block with experts takes no decoding state in forward; feed positions through step")
        route = self._route(x, layout.modality, self.training)
        if self.residual:
            branch = self._sorted_branch if self.position_wise else self.branch
            return self._mix(x, route, lambda j: branch(x, layout), True, residual=True)
        return self._mix(x, route, lambda j: self.run(x, layout), True)

    def step(self, x: torch.Tensor, modality: torch.Tensor | Layout, state: Any) -> torch.Tensor:
        """One position per sequence: ``x (b, d_model)``, ``modality (b,)`` int64 (or a :class:`Layout` of it)
        -> ``(b, d_model)``; advances ``state`` (from :meth:`decoding_state`, which is :meth:`allocate_state`'s
        without ``top_k > 1`` experts) in place."""
        layout = Layout.of(modality)
        self.check_inputs(x, layout, step=True)
        if self.experts is None:
            return self.run_step(x, layout, state)
        states = [state] if self.branches == 1 else state
        if not isinstance(states, list) or len(states) != self.branches:
            raise SpecError(f"a block with top_k = {self.branches} experts decodes {self.branches} branches; pass "
                            f"the state of decoding_state(), a list of {self.branches} states")
        return self._mix(x, self._route(x, layout.modality, False), lambda j: self.run_step(x, layout, states[j]),
                         False)

    def _route(self, x: torch.Tensor, modality: torch.Tensor, training: bool):
        """The router's choice for ``x``, after dropping the last pass's statistics. Their losses hold that pass's
        autograd graph, and with it the parameters' gradient accumulators, which this pass would otherwise reuse:
        a CUDA graph captured on a side stream after an eager pass on another stream cannot."""
        self.router_stats = None
        router = getattr(self, "router", None)
        if router is None:
            raise SpecError(f"this {type(self).__name__} has learned experts but no router: build it with "
                            f"momkit.build_block, which gives it one")
        return router(x, modality, training)

    @abstractmethod
    def run(self, x: torch.Tensor, layout: Layout, state: Any = None) -> torch.Tensor:
        """The block over whole sequences, on checked inputs: ``x (b, l, d_model)`` -> ``(b, l, d_model)``.

        Position ``t``'s output depends only on positions ``<= t`` of its own document (``layout.seq_idx``),
        and each token meets only the weights of its own modality in routed sublayers; a modality absent from
        the batch gets exactly zero gradient. A bidirectional block (:attr:`bidirectional`) also lets a position
        inside a span (:meth:`spans`) depend on the later positions of the same span, and nothing else later.

        ``state`` (prefill) is ``None``, or, for a class that sets :attr:`supports_prefill`, a decoding state from
        :meth:`allocate_state`: the block then starts from it and leaves in it the state after the last
        position, as if each position had gone through :meth:`run_step`.
        """

    def branch(self, x: torch.Tensor, layout: Layout, state: Any = None) -> torch.Tensor:
        """For a class that sets :attr:`residual`: the residual branch ``f`` of :meth:`run`, which returns ``x + f``
        for the same arguments (``run(x, layout, state) == x + branch(x, layout, state)``). A block with learned
        experts then computes ``x + sum_j g_j f_j`` (:func:`momkit.ops.gated_residual`) instead of ``x + sum_j
        g_j (run_j - x)``, the same sum without the runs' residual additions and their subtraction. Other classes
        do not implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not set residual, so it has no residual branch")

    @abstractmethod
    def run_step(self, x: torch.Tensor, layout: Layout, state: Any) -> torch.Tensor:
        """One position per sequence, on checked inputs: ``x (b, d_model)``, ``layout.modality (b,)`` ->
        ``(b, d_model)``, equal (to rounding) to that position's output of :meth:`run` over the whole sequence;
        updates ``state`` in place. A bidirectional block decodes positions outside its spans only."""

    @abstractmethod
    def allocate_state(self, batch_size: int, max_length: int | None = None) -> Any:
        """A fresh decoding state for ``batch_size`` sequences, on the block's device, before any position.

        ``max_length`` is the number of positions the caller means to feed (``None``: unknown); a block whose
        state grows with the sequence (a KV cache) may size itself by it, others ignore it. The state may be any
        object; the caller only passes it back to :meth:`step` and :meth:`forward`.
        """

    def check_inputs(self, x: torch.Tensor, layout: Layout, step: bool = False) -> None:
        """Check ``x (b, l, d_model)``, ``layout.modality (b, l)`` and the optional ``layout.seq_idx (b, l)``
        (``(b, d_model)`` and ``(b,)`` for a step); a ``SpecError`` names what is wrong."""
        modality, seq_idx = layout.modality, layout.seq_idx
        form = "(b, d_model)" if step else "(b, l, d_model)"
        if not isinstance(x, torch.Tensor) or x.dim() != (2 if step else 3) or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise SpecError(f"x must be {form} with d_model = {self.d_model}, got {got}")
        if not x.is_floating_point():
            raise SpecError(f"x must be a floating-point tensor, got {x.dtype}")
        if not isinstance(modality, torch.Tensor) or tuple(modality.shape) != tuple(x.shape[:-1]):
            got = tuple(modality.shape) if isinstance(modality, torch.Tensor) else type(modality).__name__
            raise SpecError(f"modality must be {'(b,)' if step else '(b, l)'} = {tuple(x.shape[:-1])} "
                            f"to match x, got {got}")
        if modality.dtype != torch.int64:
            raise SpecError(f"modality must be int64, got {modality.dtype}")
        if modality.device != x.device:
            raise SpecError(f"modality is on {modality.device} but x is on {x.device}")
        check_ids(modality, self.n_modalities, names=self.modalities)
        if step and seq_idx is not None:
            raise SpecError("a decoding step takes no seq_idx: each row of a decoding state is one document")
        if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.shape != modality.shape
                                    or seq_idx.dtype not in (torch.int32, torch.int64)
                                    or seq_idx.device != x.device):
            got = (f"{tuple(seq_idx.shape)} {seq_idx.dtype} on {seq_idx.device}" if isinstance(seq_idx, torch.Tensor)
                   else type(seq_idx).__name__)
            raise SpecError(f"seq_idx must be an int32 or int64 tensor of shape {tuple(modality.shape)} on "
                            f"{x.device}, like modality; got {got}")
