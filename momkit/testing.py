"""The block contract's checks, for built-in and third-party backbones alike.

A :class:`ContractCase` says how to build small blocks of one backbone (its options and the routings to try);
each ``check_*`` function builds float64 blocks with random parameters and random inputs and raises
``AssertionError`` where the block breaks a promise of :class:`momkit.Block`:

- :func:`check_step_matches_forward`: decoding position by position equals the whole-sequence forward;
- :func:`check_prefill_matches_forward`: for a class that sets ``supports_prefill``, a prefill, steps and a
  second prefill from one decoding state equal the whole-sequence forward;
- :func:`check_step_capturable`: for a class that sets ``capturable_step``, the decoding state is updated in
  place, and (on a CUDA GPU) a step captured in a CUDA graph and replayed equals the eager step;
- :func:`check_causal`: no output depends on a later position;
- :func:`check_packed_documents`: packed documents (``seq_idx``) equal the documents run apart;
- :func:`check_identical_copies_ignore_labels`, :func:`check_labels_matter`,
  :func:`check_swapped_copies_equal_swapped_labels`: a routed parameter's copies are used by modality id;
- :func:`check_absent_modality_gets_zero_gradient`: a modality absent from the batch learns nothing;
- :func:`check_gradients`: autograd's gradients equal finite differences, in float64, for the input and
  every parameter;
- :func:`check_float32`: a float32 block runs forward and backward to finite values;
- :func:`check_rejects_bad_inputs`: bad shapes, dtypes and ids are a ``SpecError`` naming the argument;
- :func:`check_bidirectional_spans`: a block built with a bidirectional modality sees each span whole and
  nothing else later, forward and backward (for a class that sets ``supports_bidirectional``);
- :func:`check_residual_branch`: for a class that sets ``residual``, ``run`` equals ``x + branch``, and learned
  experts mix the same output from the branches as from the runs.

A routed sublayer's parameters are those under the block attribute of the sublayer's name (the
:class:`momkit.descriptors.Backbone` contract), with a leading modality dimension.

:class:`BackboneContract` runs every check on every routing of a case as pytest tests: a plugin's test module
subclasses it with a ``Test`` name and a ``case``::

    from momkit.testing import BackboneContract, ContractCase

    class TestMyBackbone(BackboneContract):
        case = ContractCase(backbone={"kind": "my_backbone", "d_model": 16})

The module needs only momkit and torch; pytest collects the class but is not imported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

from momkit.blocks import Block, Layout, state_tensors
from momkit.errors import SpecError
from momkit.generation import capture
from momkit.model import build_block
from momkit.ops import available_backends

MODALITIES = ("text", "image", "speech")
"""The built-in modality kinds the checks build blocks with: two, or three for the checks that need an absent
modality."""


def _everything() -> dict[str, Any]:
    return {"dense": "dense", "all": "all"}


@dataclass(frozen=True)
class ContractCase:
    """How the checks exercise one backbone.

    Attributes:
        backbone: The block spec's ``backbone`` mapping: ``kind`` and small options (``d_model`` 8 to 32 keeps
            the float64 checks fast).
        routings: ``{name: routing}``: the routings each check runs on, each a ``routing.specific`` (a preset
            name or a list of sublayers) or a whole ``routing`` mapping (with ``experts``); by default ``dense``
            and ``all``.
        options: ``{routing name: backbone options}`` added to ``backbone`` for that routing.
        spec: Other block spec fields, for example ``{"scan_backend": "reference"}``.
        unit_scale: Parameters whose name contains one of these are drawn from N(0, 1); all others from
            N(0, 0.3²), which keeps a random float64 block well-conditioned.
        skip: ``{check function name: routing names}`` it does not run on (to keep a suite short).
        length: Positions per test sequence (at least 12).
        tolerance: Largest absolute and relative difference allowed between two float64 computations of one
            value (step vs forward, packed vs apart, swapped vs relabelled, before and after a later change).
        seed: Seed of the random parameters and inputs.
    """

    backbone: Mapping[str, Any]
    routings: Mapping[str, Any] = field(default_factory=_everything)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    spec: Mapping[str, Any] = field(default_factory=dict)
    unit_scale: tuple[str, ...] = ()
    skip: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    length: int = 23
    tolerance: float = 1e-12
    seed: int = 1234

    @property
    def d_model(self) -> int:
        """The blocks' ``d_model``."""
        return self.backbone["d_model"]

    def block_spec(self, routing: str, n_modalities: int = 2, bidirectional: tuple[str, ...] = ()) -> dict[str, Any]:
        """The block spec of routing ``routing`` over the first ``n_modalities`` of :data:`MODALITIES`, with the
        ``bidirectional`` modalities."""
        value = self.routings[routing]
        return {"modalities": list(MODALITIES[:n_modalities]),
                "routing": dict(value) if isinstance(value, Mapping) else {"specific": value},
                **self.spec, "backbone": {**self.backbone, **self.options.get(routing, {})},
                "bidirectional": list(bidirectional)}

    def build(self, routing: str, generator: torch.Generator, n_modalities: int = 2, exact: bool = False,
              bidirectional: tuple[str, ...] = ()) -> Block:
        """A float64 block of ``routing`` whose every parameter is random (no two modality copies coincide); with
        ``exact``, learned experts' gates get their exact gradient (``gradient: exact``)."""
        spec = self.block_spec(routing, n_modalities, bidirectional)
        if exact and spec["routing"].get("experts"):
            spec["routing"]["experts"] = {**spec["routing"]["experts"], "gradient": "exact"}
        block = build_block(spec).double()
        with torch.no_grad():
            for name, p in block.named_parameters():
                scale = 1.0 if any(u in name for u in self.unit_scale) else 0.3
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * scale)
        return block

    def inputs(self, generator: torch.Generator, batch: int = 2, length: int | None = None,
               n_modalities: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``x (b, l, d_model)`` float64 and ``modality (b, l)`` with ids in ``0..n_modalities-1``."""
        length = self.length if length is None else length
        x = torch.randn(batch, length, self.d_model, generator=generator, dtype=torch.float64)
        return x, torch.randint(0, n_modalities, (batch, length), generator=generator)

    def generator(self) -> torch.Generator:
        """A fresh generator seeded by :attr:`seed`."""
        return torch.Generator().manual_seed(self.seed)


def routed_parameters(block: Block) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every parameter of a routed sublayer (a leading modality dimension)."""
    for name, p in block.named_parameters():
        if name.split(".")[0] in block.routed:
            yield name, p


def _close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}")


def check_step_matches_forward(case: ContractCase, routing: str) -> None:
    """Feeding the positions one by one through ``step`` gives the whole-sequence ``forward``'s outputs."""
    gen = case.generator()
    block = case.build(routing, gen)
    x, modality = case.inputs(gen)
    full = block(x, modality)
    with torch.no_grad():
        state = block.decoding_state(x.shape[0], x.shape[1])
        steps = torch.stack([block.step(x[:, t], modality[:, t], state) for t in range(x.shape[1])], dim=1)
    _close(steps, full.detach(), case.tolerance, "step-by-step outputs differ from forward")


def check_prefill_matches_forward(case: ContractCase, routing: str) -> None:
    """For a class with ``supports_prefill`` (and no learned experts): the first third of the positions through
    ``forward`` with a decoding state, the next ones through ``step``, the rest through ``forward`` with the same
    state again, give the whole-sequence ``forward``'s outputs."""
    gen = case.generator()
    block = case.build(routing, gen)
    if not block.supports_prefill or block.experts is not None:
        return
    x, modality = case.inputs(gen)
    full = block(x, modality)
    first, second = case.length // 3, 2 * case.length // 3
    with torch.no_grad():
        state = block.decoding_state(x.shape[0], x.shape[1])
        parts = [block(x[:, :first], modality[:, :first], state=state)]
        parts += [block.step(x[:, t], modality[:, t], state)[:, None] for t in range(first, second)]
        parts.append(block(x[:, second:], modality[:, second:], state=state))
    _close(torch.cat(parts, dim=1), full.detach(), case.tolerance,
           "prefill, steps and prefill again differ from forward")


def check_step_capturable(case: ContractCase, routing: str) -> None:
    """For a class with ``capturable_step`` (and no learned experts): a prefill and steps update the decoding
    state's tensors in place (the same storage, new values); on a CUDA GPU, a step captured in a CUDA graph and
    replayed position by position gives the eager steps' outputs and state (on the ``triton`` backend, the GPU's:
    the reference backend reads group sizes on the host)."""
    gen = case.generator()
    block = case.build(routing, gen)
    if not block.capturable_step or block.experts is not None:
        return
    x, modality = case.inputs(gen)
    cut = case.length // 2
    with torch.no_grad():
        state = block.decoding_state(x.shape[0], x.shape[1])
        before = [(t.data_ptr(), t.clone()) for t in state_tensors(state)]
        if block.supports_prefill:
            block(x[:, :cut], modality[:, :cut], state=state)
        block.step(x[:, cut], modality[:, cut], state)
        after = state_tensors(state)
        assert [t.data_ptr() for t in after] == [ptr for ptr, _ in before], \
            "the decoding state's tensors were replaced, not updated in place"
        assert not before or any(not torch.equal(t, old) for t, (_, old) in zip(after, before)), \
            "the decoding state did not change"
    if torch.cuda.is_available() and "triton" in available_backends():
        on_gpu = build_block({**case.block_spec(routing), "scan_backend": "triton"})
        on_gpu.load_state_dict(block.state_dict())
        _check_captured_steps(on_gpu.cuda().float().eval(), x.cuda().float(), modality.cuda())


def _check_captured_steps(block, x: torch.Tensor, modality: torch.Tensor) -> None:
    """Steps of ``block`` through one captured CUDA graph equal its eager steps, outputs and final state."""
    with torch.no_grad():
        eager_state = block.decoding_state(x.shape[0], x.shape[1])
        eager = torch.stack([block.step(x[:, t], modality[:, t], eager_state) for t in range(x.shape[1])], dim=1)
        state, scratch = (block.decoding_state(x.shape[0], x.shape[1]) for _ in range(2))
        x_t, m_t = x[:, 0].clone(), modality[:, 0].clone()
        graph, out = capture(lambda: block.step(x_t, m_t, state), lambda: block.step(x_t, m_t, scratch), times=1)
        outputs = []
        for t in range(x.shape[1]):
            x_t.copy_(x[:, t])
            m_t.copy_(modality[:, t])
            graph.replay()
            outputs.append(out.clone())
    _close(torch.stack(outputs, dim=1), eager, 1e-5, "a captured step differs from the eager step")
    for captured, expected in zip(state_tensors(state), state_tensors(eager_state)):
        _close(captured, expected, 1e-5, "the state after captured steps differs from the eager steps'")


def check_causal(case: ContractCase, routing: str) -> None:
    """Changing positions from ``t`` on (inputs and modalities) leaves every output before ``t`` unchanged (to
    ``case.tolerance``: a routed or expert linear layer multiplies each group of tokens of one modality or expert
    at once, and a BLAS matmul may round a row differently when its group's size changes) and changes the
    outputs from ``t`` on."""
    gen = case.generator()
    block = case.build(routing, gen)
    x, modality = case.inputs(gen)
    cut = case.length // 2
    y = block(x, modality)
    x2, m2 = x.clone(), modality.clone()
    x2[:, cut:] += torch.randn(x2[:, cut:].shape, generator=gen, dtype=x.dtype)
    m2[:, cut:] = 1 - m2[:, cut:]
    y2 = block(x2, m2)
    _close(y2[:, :cut], y[:, :cut], case.tolerance, f"outputs before position {cut} depend on later positions")
    assert (y2[:, cut:] - y[:, cut:]).abs().max() > 1e-3, f"outputs from position {cut} ignore their inputs"


def check_packed_documents(case: ContractCase, routing: str) -> None:
    """A row of packed documents (``seq_idx``, int64 or int32) gives each document's output as if it ran alone."""
    gen = case.generator()
    block = case.build(routing, gen)
    length = case.length + 7
    x, modality = case.inputs(gen, length=length)
    bounds = {0: (0, length // 2, length), 1: (0, 5, 6, length)}
    for dtype in (torch.int64, torch.int32):
        seq_idx = torch.zeros(x.shape[:2], dtype=dtype)
        for row, cuts in bounds.items():
            for document, (start, end) in enumerate(zip(cuts, cuts[1:])):
                seq_idx[row, start:end] = document
        packed = block(x, modality, seq_idx)
        for row, cuts in bounds.items():
            for start, end in zip(cuts, cuts[1:]):
                alone = block(x[row:row + 1, start:end], modality[row:row + 1, start:end])
                _close(packed[row:row + 1, start:end], alone, case.tolerance,
                       f"packed document [{start}, {end}) of row {row} (seq_idx {dtype}) differs from it alone")


def check_identical_copies_ignore_labels(case: ContractCase, routing: str) -> None:
    """With every routed parameter's copies made equal, the modality ids no longer matter."""
    gen = case.generator()
    block = case.build(routing, gen)
    with torch.no_grad():
        for _, p in routed_parameters(block):
            p.copy_(p[:1].clone().expand_as(p))
    x, modality = case.inputs(gen)
    _close(block(x, modality), block(x, torch.zeros_like(modality)), case.tolerance,
           "identical copies of every routed parameter, yet the output depends on the modality ids")


def check_labels_matter(case: ContractCase, routing: str) -> None:
    """With distinct copies of the routed parameters, relabelling the positions changes the output (a routing
    that routes nothing passes trivially)."""
    gen = case.generator()
    block = case.build(routing, gen)
    if not any(True for _ in routed_parameters(block)):
        return
    x, modality = case.inputs(gen)
    assert (block(x, modality) - block(x, 1 - modality)).abs().max() > 1e-3, \
        "the routed copies are not used by modality id: relabelling the positions changes nothing"


def check_swapped_copies_equal_swapped_labels(case: ContractCase, routing: str) -> None:
    """Swapping two modalities' copies of every routed parameter equals swapping their ids in the input."""
    gen = case.generator()
    block = case.build(routing, gen, n_modalities=3)
    x, modality = case.inputs(gen, n_modalities=3)
    y = block(x, modality)
    with torch.no_grad():
        for _, p in routed_parameters(block):
            p[[0, 2]] = p[[2, 0]]
    swapped = modality.clone()
    swapped[modality == 0], swapped[modality == 2] = 2, 0
    _close(block(x, swapped), y, case.tolerance, "swapping the copies of modalities 0 and 2 is not the same as "
                                                 "swapping their ids")


def check_absent_modality_gets_zero_gradient(case: ContractCase, routing: str) -> None:
    """A modality absent from the batch gets exactly zero gradient in every routed parameter; each present one
    gets some."""
    gen = case.generator()
    block = case.build(routing, gen, n_modalities=3)
    x, modality = case.inputs(gen, n_modalities=2)
    (block(x, modality) * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum().backward()
    for name, p in routed_parameters(block):
        assert p.grad is not None, f"{name} took no part in the forward pass"
        assert torch.equal(p.grad[2], torch.zeros_like(p.grad[2])), \
            f"{name}: the copy of absent modality 2 has a nonzero gradient"
        for present in (0, 1):
            assert p.grad[present].abs().sum() > 0, \
                f"{name}: the copy of modality {present}, present in the batch, has zero gradient"


def check_gradients(case: ContractCase, routing: str, directions: int = 3) -> None:
    """Autograd's gradient of a random linear function of the output, with respect to the input and every
    parameter, matches central finite differences along random directions (float64, step 1e-6). Learned
    experts' gates are checked with their exact gradient (see :mod:`momkit.experts`)."""
    gen = case.generator()
    block = case.build(routing, gen, exact=True)
    x, modality = case.inputs(gen, length=7)
    _check_gradients(block, gen, x, modality, None, directions)


def _check_gradients(block: Block, gen: torch.Generator, x: torch.Tensor, modality: torch.Tensor,
                     seq_idx: torch.Tensor | None, directions: int) -> None:
    weight = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    x.requires_grad_(True)
    params = [x, *block.parameters()]
    (block(x, modality, seq_idx) * weight).sum().backward()
    grads = [p.grad for p in params]
    for _ in range(directions):
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        predicted = sum(float((g * d).sum()) for g, d in zip(grads, v))
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                for p, d in zip(params, v):
                    p.add_(d, alpha=sign * 1e-6)
                values.append(float((block(x, modality, seq_idx) * weight).sum()))
                for p, d in zip(params, v):
                    p.sub_(d, alpha=sign * 1e-6)
        measured = (values[0] - values[1]) / 2e-6
        assert abs(measured - predicted) <= 1e-6 * max(1.0, abs(measured)), \
            f"directional derivative: autograd {predicted:.10g}, finite differences {measured:.10g}"


SPAN_LAYOUT = ((0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0),
               (0,) * 14 + (1,) * 9)
"""Modality ids and documents of :func:`check_bidirectional_spans`' first row: in document 0, text, an image
span at 3-7, text at 8-9, an image span at 10-13; document 1 opens with an image span at 14-16 that touches the
one before it (two spans: documents differ), then text."""


def _changed_after(block: Block, gen, x, modality, seq_idx, where: slice) -> torch.Tensor:
    """The block's output on ``x`` with row 0's positions ``where`` redrawn."""
    x2 = x.clone()
    x2[0, where] = torch.randn(x2[0, where].shape, generator=gen, dtype=x.dtype)
    return block(x2, modality, seq_idx)


def check_bidirectional_spans(case: ContractCase, routing: str) -> None:
    """A block built with ``bidirectional: [image]`` lets a position inside an image span depend on the later
    positions of its span, and on nothing else later: not another span, another modality or another document;
    packed documents equal the documents run apart; its gradients match finite differences; on a batch without
    image positions it equals the causal block with the same weights, and decodes like its forward. Passes
    trivially for a class without ``supports_bidirectional`` (a position-wise block is bidirectional as it is)."""
    gen = case.generator()
    spec = case.block_spec(routing)
    if not build_block(spec).supports_bidirectional:
        return
    block = case.build(routing, gen, bidirectional=("image",))
    length = len(SPAN_LAYOUT[0])
    x, modality = case.inputs(gen, length=length)
    modality[0] = torch.tensor(SPAN_LAYOUT[0])
    seq_idx = torch.zeros_like(modality)
    seq_idx[0] = torch.tensor(SPAN_LAYOUT[1])
    y = block(x, modality, seq_idx)
    inside = _changed_after(block, gen, x, modality, seq_idx, slice(7, 8))
    assert (inside[0, 3:7] - y[0, 3:7]).abs().amin(dim=-1).min() > 0 and \
        (inside[0, 3] - y[0, 3]).abs().max() > 1e-3, "an image position ignores a later position of its own span"
    for where, keep, what in ((slice(7, 8), 3, "positions before the span"),
                              (slice(8, 10), 8, "the span before later text"),
                              (slice(10, 14), 10, "an earlier span of the same modality"),
                              (slice(14, 23), 14, "the document before")):
        _close(_changed_after(block, gen, x, modality, seq_idx, where)[0, :keep], y[0, :keep], case.tolerance,
               f"{what} depend(s) on row 0's positions {where.start}-{where.stop - 1}")
    for start, end in ((0, 14), (14, length)):
        alone = block(x[:1, start:end], modality[:1, start:end])
        _close(y[:1, start:end], alone, case.tolerance, f"packed document [{start}, {end}) differs from it alone")
    grad_modality = torch.tensor([[0, 1, 1, 1, 0, 1, 1]])
    _check_gradients(case.build(routing, gen, exact=True, bidirectional=("image",)), gen,
                     torch.randn(1, 7, case.d_model, generator=gen, dtype=torch.float64), grad_modality,
                     torch.tensor([[0, 0, 0, 0, 0, 1, 1]]), directions=3)
    causal = case.build(routing, gen)
    causal.load_state_dict({k: v for k, v in block.state_dict().items() if k in causal.state_dict()})
    text = torch.zeros_like(modality)
    full = block(x, text)
    _close(full, causal(x, text), case.tolerance, "without image positions, the block differs from the causal one")
    with torch.no_grad():
        state = block.decoding_state(x.shape[0], length)
        steps = torch.stack([block.step(x[:, t], text[:, t], state) for t in range(length)], dim=1)
    _close(steps, full.detach(), case.tolerance, "decoding positions outside the spans differs from forward")


def check_float32(case: ContractCase, routing: str) -> None:
    """A float32 block, as built, runs forward and backward to an output of the input's shape and finite
    gradients for every parameter."""
    gen = case.generator()
    block = build_block(case.block_spec(routing))
    x, modality = case.inputs(gen)
    y = block(x.float(), modality)
    y.square().mean().backward()
    assert y.shape == x.shape and y.dtype == torch.float32, f"output {tuple(y.shape)} {y.dtype}"
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: missing or non-finite gradient"


def _raises(pattern: str, call: Callable[[], Any], what: str) -> None:
    try:
        call()
    except SpecError as exc:
        assert re.search(pattern, str(exc)), f"{what}: message {str(exc)!r} does not match {pattern!r}"
        return
    raise AssertionError(f"{what}: no SpecError raised")


def check_rejects_bad_inputs(case: ContractCase, routing: str) -> None:
    """Bad inputs of ``forward`` and ``step`` are a ``SpecError`` that names the argument and what is valid."""
    gen = case.generator()
    block = case.build(routing, gen)
    x, m = case.inputs(gen)
    d = case.d_model
    shape = re.escape(str(tuple(m.shape)))
    bad = {
        "d_model": ((x[..., :-1], m), rf"x must be \(b, l, d_model\) with d_model = {d}"),
        "modality shape": ((x, m[:, :-1]), r"modality must be \(b, l\)"),
        "modality int32": ((x, m.int()), "modality must be int64"),
        "modality ids": ((x, m + 5), r"valid ids: 0 = text, 1 = image"),
        "integer x": ((x.long(), m), "floating-point"),
        "float seq_idx": ((x, m, m.float()), rf"seq_idx must be an int32 or int64 tensor of shape {shape}"),
        "seq_idx shape": ((x, m, m[:, 1:]), r"seq_idx must be .* like modality; got"),
    }
    for what, (args, pattern) in bad.items():
        _raises(pattern, lambda args=args: block(*args), what)
    state = block.decoding_state(2)
    _raises(r"modality must be \(b,\)", lambda: block.step(x[:, 0], m[0, :3], state),
            "step with a wrong modality shape")


def check_residual_branch(case: ContractCase, routing: str) -> None:
    """For a class with ``residual``: ``run`` gives ``x + branch`` for the same arguments; with learned experts,
    the block's output mixed from the branches (``x + sum_j g_j f_j``) equals the one mixed from whole runs
    (``x + sum_j g_j (run_j - x)``), forward and backward."""
    gen = case.generator()
    block = case.build(routing, gen)
    if not block.residual:
        return
    x, modality = case.inputs(gen)
    if block.experts is None:
        layout = Layout.of(modality)
        _close(block.run(x, layout), x + block.branch(x, layout), case.tolerance, "run differs from x + branch")
        return
    weights = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    results = []
    for residual in (True, False):
        block.residual = residual
        leaf = x.clone().requires_grad_(True)
        out = block(leaf, modality)
        results.append((out.detach(), *torch.autograd.grad((out * weights).sum(), [leaf, *block.parameters()],
                                                          allow_unused=True, materialize_grads=True)))
    del block.residual
    for what, branches, runs in zip(("output", "input gradient", *(n for n, _ in block.named_parameters())),
                                    *results):
        _close(branches, runs, case.tolerance, f"{what} mixed from the branches differs from the runs'")


CHECKS = (check_step_matches_forward, check_prefill_matches_forward, check_step_capturable, check_causal,
          check_packed_documents, check_identical_copies_ignore_labels, check_labels_matter,
          check_swapped_copies_equal_swapped_labels,
          check_absent_modality_gets_zero_gradient, check_gradients, check_float32, check_rejects_bad_inputs,
          check_bidirectional_spans, check_residual_branch)
"""Every check, in the order :class:`BackboneContract` runs them."""


def run_checks(case: ContractCase, checks=CHECKS) -> None:
    """Run ``checks`` on every routing of ``case`` (except those ``case.skip`` leaves out); the first failure is
    an ``AssertionError`` naming the check and the routing."""
    for check in checks:
        for routing in case.routings:
            if routing in case.skip.get(check.__name__, ()):
                continue
            try:
                check(case, routing)
            except AssertionError as exc:
                raise AssertionError(f"{check.__name__} failed for routing {routing!r}: {exc}") from exc


class BackboneContract:
    """Pytest tests of every check, each over every routing of :attr:`case`: subclass it as ``TestSomething``
    with a ``case`` (see the module docstring)."""

    case: ContractCase

    def test_step_matches_forward(self):
        run_checks(self.case, [check_step_matches_forward, check_prefill_matches_forward, check_step_capturable])

    def test_causal(self):
        run_checks(self.case, [check_causal])

    def test_packed_documents(self):
        run_checks(self.case, [check_packed_documents])

    def test_routed_copies_are_used_by_modality(self):
        run_checks(self.case, [check_identical_copies_ignore_labels, check_labels_matter,
                               check_swapped_copies_equal_swapped_labels])

    def test_absent_modality_gets_zero_gradient(self):
        run_checks(self.case, [check_absent_modality_gets_zero_gradient])

    def test_gradients(self):
        run_checks(self.case, [check_gradients, check_float32])

    def test_rejects_bad_inputs(self):
        run_checks(self.case, [check_rejects_bad_inputs])

    def test_bidirectional_spans(self):
        run_checks(self.case, [check_bidirectional_spans])

    def test_residual_branch(self):
        run_checks(self.case, [check_residual_branch])
