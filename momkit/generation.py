"""Sampling from a model: discrete tokens one at a time, and spans of a continuous modality by diffusion.

Without continuous spans to sample and without bidirectional modalities, generation runs through the blocks'
step path: every prompt position is fed once and every sampled token once, nothing re-runs the prefix. The
prompt positions before the shortest prompt's last go through one forward pass with the decoding state (a
prefill, :meth:`momkit.Model.prefill`) where every block takes one; the rest step. Rows of a batch may have
prompts of different lengths; they step in lockstep, each row feeding its own prompt until it ends and its
samples after that.

A schedule rule that asks for ``count`` positions of a continuous modality (an image after ``<image>``) makes
them one span, denoised as a whole: its latents start as noise and the model, conditioned on the sequence so
far, predicts them at each of the ``Denoising.steps`` steps of the modality's diffusion objective (DDPM or DDIM;
classifier-free guidance mixes in the prediction for the span alone, the prefix dropped). The clean latents are
appended and sampling continues. Such generation, and any generation from a model with bidirectional
modalities (whose spans the step path cannot see whole), runs row by row on a decoding state: the prompt in
one prefill, each token a step, each denoising step a prefill of the span from a copy of the state, the clean
span a prefill. A model whose blocks take no state in ``forward`` (learned experts, some plugins) re-runs the
row so far through the whole-sequence forward pass instead, at a cost that grows with the square of the
length.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from momkit.batch import Batch
from momkit.blocks import state_tensors
from momkit.errors import SpecError
from momkit.ops import unchecked
from momkit.registry import get_registry


@dataclass(frozen=True)
class ScheduleRule:
    """After token ``after_token`` of modality ``after``, the next ``count`` positions are of modality ``then``.

    For example ``ScheduleRule(after="text", after_token=BOI, then="image", count=64)``: "after ``<image>``,
    64 image tokens".
    """

    after: str
    after_token: int
    then: str
    count: int


@dataclass(frozen=True)
class ModalitySchedule:
    """Which modality each generated position belongs to.

    Attributes:
        default: The modality of positions no rule claims; ``None`` keeps the modality of each prompt's last
            position.
        rules: :class:`ScheduleRule` s, checked after every token (the prompt's last one included).
    """

    default: str | None = None
    rules: tuple[ScheduleRule, ...] = ()


@dataclass
class Generation:
    """Prompts and their continuations, right-padded.

    Attributes:
        tokens: ``(b, T)`` int64; row ``r`` is valid up to ``lengths[r]`` (prompt, then samples).
        modality: ``(b, T)`` int64 modality ids of the same positions.
        lengths: ``(b,)`` prompt length plus ``max_new_tokens``.
        latents: ``{name: (b, T, latent_dim)}`` of each continuous modality of the prompt or the samples, read at
            its positions (zero elsewhere).
    """

    tokens: torch.Tensor
    modality: torch.Tensor
    lengths: torch.Tensor
    latents: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _RowSchedule:
    """Where one row stands in its schedule."""

    default: int
    pending: int | None = None
    remaining: int = 0
    rules: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    def observe(self, modality: int, token: int) -> None:
        if (modality, token) in self.rules:
            self.pending, self.remaining = self.rules[(modality, token)]

    def next(self) -> int:
        if self.remaining > 0:
            self.remaining -= 1
            return self.pending
        return self.default

    def take_span(self, most: int) -> int:
        """After :meth:`next` gave the first position of a continuous run: how many positions the span has (the
        run's, at most ``most``); the schedule moves past them."""
        count = min(self.remaining + 1, most)
        self.remaining -= count - 1
        return count


@dataclass(frozen=True)
class Denoising:
    """How :func:`generate` samples a span of a continuous modality.

    Attributes:
        steps: Denoising steps (1 returns the model's first prediction of the clean latents).
        sampler: ``ddim`` (deterministic) or ``ddpm`` (ancestral, fresh noise at each step).
        guidance: Classifier-free guidance scale ``w``: the prediction is ``u + w (c - u)`` with ``c`` the
            prediction given the sequence so far and ``u`` that for the span alone; 1 uses ``c`` alone.
    """

    steps: int = 50
    sampler: str = "ddim"
    guidance: float = 1.0

    def check(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise SpecError(f"denoising steps must be a positive int, got {self.steps!r}")
        if self.sampler not in SAMPLERS:
            raise SpecError(f"sampler {self.sampler!r} is not one of {', '.join(SAMPLERS)}")
        if not self.guidance >= 0:
            raise SpecError(f"guidance must be >= 0 (1: no guidance), got {self.guidance!r}")


SAMPLERS = ("ddim", "ddpm")


def _denoiser(model: nn.Module, name: str):
    """The objective of continuous modality ``name``, which must be able to sample (``sample``)."""
    names = [m.name for m in model.modalities]
    modality = model.modalities[names.index(name)]
    config = model.spec.objective(name)
    objective = get_registry().get("objective", config.kind).build(config, modality, names.index(name))
    if not callable(getattr(objective, "sample", None)):
        raise SpecError(f"cannot sample continuous modality {name!r}: its objective {config.kind!r} has no "
                        f"sampler (sample); objectives that have one: diffusion")
    return objective


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """``(N, vocab)`` logits -> ``(N,)`` token ids; greedy when ``temperature`` is 0. A draw is the argmax of the
    logits plus Gumbel noise (a sample of their softmax), which reads nothing on the host."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device)
    return (logits - torch.log(-torch.log(uniform))).argmax(-1)


def _check_options(model: nn.Module, prompt: Batch, max_new_tokens, prompt_lengths, temperature, top_k, schedule,
                   denoising: Denoising, cuda_graph):
    model.check(prompt)
    batch, length = prompt.modality.shape
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise SpecError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise SpecError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise SpecError(f"top_k must be None or a positive int, got {top_k!r}")
    if prompt_lengths is not None:
        if tuple(prompt_lengths.shape) != (batch,) or int(prompt_lengths.min()) < 1 or \
                int(prompt_lengths.max()) > length:
            raise SpecError(f"prompt_lengths must be ({batch},) with values in 1..{length}, got "
                            f"{prompt_lengths.tolist()}")
    names = [m.name for m in model.modalities]
    for rule in schedule.rules:
        if rule.count < 1:
            raise SpecError(f"schedule rule {rule} has count {rule.count}; expected a positive int")
    sampled = [r.then for r in schedule.rules] + ([schedule.default] if schedule.default else [])
    for name in [r.after for r in schedule.rules] + sampled:
        if name not in names:
            raise SpecError(f"schedule names modality {name!r}; this model's modalities: {names}")
    if schedule.default and not model.modalities[names.index(schedule.default)].discrete:
        raise SpecError(f"schedule default {schedule.default!r} is continuous; the default must be a discrete "
                        f"modality (a continuous one is sampled as a span of a rule's count)")
    for rule in schedule.rules:
        if not model.modalities[names.index(rule.then)].discrete:
            _denoiser(model, rule.then)
    denoising.check()
    if cuda_graph not in (None, True, False):
        raise SpecError(f"cuda_graph must be None (on a GPU where the model allows it), True or False, got "
                        f"{cuda_graph!r}")


@torch.no_grad()
def generate(model: nn.Module, prompt: Batch, max_new_tokens: int, *, prompt_lengths: torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None, schedule: ModalitySchedule | None = None,
             generator: torch.Generator | None = None, denoising: Denoising | None = None,
             cuda_graph: bool | None = None) -> Generation:
    """Sample ``max_new_tokens`` positions after each prompt.

    Args:
        model: A :class:`momkit.Model`.
        prompt: ``(b, l)`` prompts; row ``r`` uses its first ``prompt_lengths[r]`` positions (the others must
            still hold valid ids; they are not read).
        max_new_tokens: Positions to sample per row (a continuous span counts its positions).
        prompt_lengths: ``(b,)`` prompt lengths; all ``l`` if omitted.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample among the ``top_k`` most likely tokens only.
        schedule: Which modality each new position is of; by default that of the prompt's last position. A
            rule whose ``then`` is a continuous modality asks for a span of ``count`` latents.
        generator: Random generator of the sampling (the tokens, the spans' noise).
        denoising: How spans of continuous modalities are sampled (:class:`Denoising`).
        cuda_graph: Whether the decoding step of token-by-token generation runs as one captured CUDA graph:
            ``None`` (default) on a GPU where :attr:`momkit.Model.can_capture`, ``False`` never, ``True`` always
            (``SpecError`` where it cannot). Graphs are kept per model for later calls of the same options and
            bucketed sizes (batch and length rounded up to powers of two).

    Returns:
        A :class:`Generation`.
    """
    schedule, denoising = schedule or ModalitySchedule(), denoising or Denoising()
    _check_options(model, prompt, max_new_tokens, prompt_lengths, temperature, top_k, schedule, denoising,
                   cuda_graph)
    batch, length = prompt.modality.shape
    device = prompt.modality.device
    lengths = (torch.full((batch,), length, device=device) if prompt_lengths is None else prompt_lengths).tolist()
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.int64, device=device)
    modality = torch.zeros_like(tokens)
    modality[:, :length] = prompt.modality
    if prompt.tokens is not None:
        tokens[:, :length] = prompt.tokens
    dtype = next(model.parameters()).dtype
    latents = {m.name: torch.zeros(batch, total, m.latent_dim, dtype=dtype, device=device) for m in model.modalities
               if not m.discrete}
    for name, values in prompt.latents.items():
        latents[name][:, :length] = values

    names = [m.name for m in model.modalities]
    rules = {(names.index(r.after), r.after_token): (names.index(r.then), r.count) for r in schedule.rules}
    rows = []
    for r, n in enumerate(lengths):
        last = int(modality[r, n - 1])
        row = _RowSchedule(default=names.index(schedule.default) if schedule.default else last, rules=rules)
        row.observe(last, int(tokens[r, n - 1]))
        rows.append(row)
    for r, row in enumerate(rows):
        if not model.modalities[row.default].discrete:
            raise SpecError(f"prompt row {r} ends in continuous modality {names[row.default]!r}; give a "
                            f"schedule whose default is a discrete modality")

    sequences = (tokens, modality, latents)
    continuous = any(not model.modalities[names.index(r.then)].discrete for r in schedule.rules)
    if continuous or model.spec.bidirectional:
        if cuda_graph:
            raise SpecError("cuda_graph=True, but this generation samples spans of a continuous modality or has "
                            "bidirectional modalities, which run through prefills row by row; valid: "
                            "cuda_graph=False or None")
        for r in range(batch):
            _generate_row(model, sequences, r, lengths[r], lengths[r] + max_new_tokens, rows[r],
                          (temperature, top_k, generator), denoising)
    else:
        _generate_steps(model, prompt, sequences, lengths, max_new_tokens, rows, (temperature, top_k, generator),
                        cuda_graph)
    out_lengths = torch.tensor([n + max_new_tokens for n in lengths], device=device)
    past = torch.arange(total, device=device) >= out_lengths[:, None]
    return Generation(tokens=tokens.masked_fill(past, 0), modality=modality.masked_fill(past, 0),
                      lengths=out_lengths, latents={k: v.masked_fill(past[..., None], 0) for k, v in latents.items()})


class _Lockstep:
    """Discrete generation of every row in lockstep as tensor operations alone, reading no value on the host, so
    that its :meth:`step` (embedding, blocks, final norm, heads, sampling, schedule) can be captured in one CUDA
    graph and replayed.

    Buffers ``(batch, width)`` hold every row's tokens and modalities (the prompts, zeros after them, then what
    is sampled, added in); ``t`` is the position fed next. A row samples position ``t + 1`` when it lies in
    ``[first, end)``, feeds its prompt before ``first`` and zeros (token 0 of modality 0) from ``end`` on, which
    the output cuts. The schedule lives in ``default``, ``pending`` and ``remaining`` per row and the rules as
    tensors; ``heads`` are the modalities a position may be sampled in. The loop holds its model weakly: a graph
    kept for a model must not keep the model alive.
    """

    def __init__(self, model, batch: int, width: int, heads: tuple[int, ...],
                 rules: dict[tuple[int, int], tuple[int, int]], latent_names: tuple[str, ...], temperature: float,
                 top_k: int | None):
        weight = next(model.parameters())
        device = weight.device

        def ints(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.int64, device=device)

        self._model, self.temperature, self.top_k = weakref.ref(model), temperature, top_k
        self.heads = [(m, model.modalities[m].name) for m in heads]
        self.tokens, self.modality = ints(batch, width), ints(batch, width)
        dims = {m.name: m.latent_dim for m in model.modalities if not m.discrete}
        self.latents = {name: torch.zeros(batch, width, dims[name], dtype=weight.dtype, device=device)
                        for name in latent_names}
        self.first, self.end, self.t = ints(batch), ints(batch), ints(1)
        self.default, self.pending, self.remaining = ints(batch), ints(batch), ints(batch)
        self.rules = torch.tensor([[*key, *value] for key, value in rules.items()], dtype=torch.int64,
                                  device=device).reshape(-1, 4).T
        self.state = model.allocate_state(batch, width)

    @property
    def model(self):
        return self._model()

    def load(self, tokens: torch.Tensor, modality: torch.Tensor, latents: dict[str, torch.Tensor],
             lengths: list[int], max_new_tokens: int, rows: list[_RowSchedule], t: int) -> None:
        """Start from sequences ``(n, l)`` holding the prompts (``n`` at most the buffers' rows, the rest repeat
        row 0; ``l`` at most their width) and a fresh decoding state, feeding position ``t`` next."""
        n, length = tokens.shape
        order = list(range(n)) + [0] * (self.tokens.shape[0] - n)
        for buffer, values in ((self.first, lengths), (self.end, [n + max_new_tokens for n in lengths]),
                               (self.default, [r.default for r in rows]),
                               (self.pending, [r.pending or 0 for r in rows]),
                               (self.remaining, [r.remaining for r in rows])):
            buffer.copy_(torch.tensor([values[i] for i in order]))
        index = torch.tensor(order, device=tokens.device)
        for buffer, values in [(self.tokens, tokens), (self.modality, modality)] + \
                [(self.latents[name], latents[name]) for name in self.latents]:
            buffer.zero_()
            buffer[:, :length] = values[index, :length]
        sampled = torch.arange(self.tokens.shape[1], device=tokens.device) >= self.first[:, None]
        self.tokens.masked_fill_(sampled, 0)
        self.modality.masked_fill_(sampled, 0)
        self.t.fill_(t)

    def reset_state(self) -> None:
        """Put the decoding state back to a fresh one's values, in place (a captured graph holds its tensors)."""
        fresh = self.model.allocate_state(*self.tokens.shape)
        for mine, value in zip(state_tensors(self.state), state_tensors(fresh)):
            mine.copy_(value)

    def step(self) -> None:
        """Feed position ``t`` of every row and write position ``t + 1``."""
        t, model = self.t, self.model
        token, modality = self.tokens.index_select(1, t)[:, 0], self.modality.index_select(1, t)[:, 0]
        h = model.step(token, modality, self.state,
                       {name: values.index_select(1, t)[:, 0] for name, values in self.latents.items()})
        after = t + 1
        sampled = (after >= self.first) & (after < self.end)
        chosen = self.default
        if self.rules.shape[1]:
            scheduled = sampled & (self.remaining > 0)
            chosen = torch.where(scheduled, self.pending, self.default)
            self.remaining.sub_(scheduled.long())
        draws = [(m, _sample(model.heads[name](h), self.temperature, self.top_k, None)) for m, name in self.heads]
        sample = draws[0][1]
        for m, drawn in draws[1:]:
            sample = torch.where(chosen == m, drawn, sample)
        if self.rules.shape[1]:
            after_m, after_token, then, count = self.rules
            hit = sampled[:, None] & (after_m == chosen[:, None]) & (after_token == sample[:, None])
            found = hit.any(1)
            self.pending.copy_(torch.where(found, (hit * then).sum(1), self.pending))
            self.remaining.copy_(torch.where(found, (hit * count).sum(1), self.remaining))
        self.tokens.index_add_(1, after, (sample * sampled)[:, None])
        self.modality.index_add_(1, after, (chosen * sampled)[:, None])
        self.t.add_(1)


def capture(run, warm_up=None, times: int = 2):
    """``run()`` captured in a CUDA graph, after ``times`` calls of ``warm_up`` (``run`` when ``None``) on a side
    stream, which compile the kernels and settle the allocator: the graph, to replay, and what the captured call
    returned (tensors that each replay overwrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(times):
            (warm_up or run)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = run()
    return graph, result


class _Graphed:
    """A :class:`_Lockstep` whose step is captured in a CUDA graph (:func:`capture`)."""

    def __init__(self, loop: _Lockstep):
        self.loop = loop
        self.graph, _ = capture(loop.step)

    def step(self) -> None:
        self.graph.replay()


_CAPTURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
KEEP_GRAPHS = 4


def _bucket(n: int, least: int = 1) -> int:
    """The power of two at least ``n`` and ``least``: batch sizes and lengths share a captured graph."""
    return max(least, 1 << (n - 1).bit_length())


def _decoder(model, cuda_graph: bool | None, batch: int, total: int, *options) -> _Lockstep | _Graphed:
    """A lockstep decoder for ``batch`` rows of ``total`` positions; on a GPU unless ``cuda_graph`` is ``False``,
    a captured one, kept per model (the last :data:`KEEP_GRAPHS`) for calls of the same bucketed sizes and options
    while no parameter has changed (storage, dtype, version counter: a graph may hold tensors derived from them).
    Where capture fails (a block or a kernel backend that reads a device value on the host), ``cuda_graph=True``
    raises and ``None`` warns and runs eagerly."""
    if cuda_graph is False:
        return _Lockstep(model, batch, total, *options)
    size = (_bucket(batch), _bucket(total, 64))
    key = (size, tuple((p.data_ptr(), p.dtype, p._version) for p in model.parameters()), repr(options))
    cache = _CAPTURED.setdefault(model, {})
    if key not in cache:
        while len(cache) >= KEEP_GRAPHS:
            cache.pop(next(iter(cache)))
        stream = torch.cuda.current_stream()
        try:
            cache[key] = _Graphed(_Lockstep(model, *size, *options))
        except RuntimeError as exc:
            torch.cuda.set_stream(stream)
            cache[key] = exc
    found = cache[key]
    if isinstance(found, _Graphed):
        found.loop.reset_state()
        return found
    if cuda_graph:
        raise SpecError(f"cuda_graph=True, but capturing the decoding step failed: {found}; valid: "
                        f"cuda_graph=False or None") from found
    warnings.warn(f"generate: the decoding step could not be captured in a CUDA graph ({found}); decoding "
                  f"eagerly (cuda_graph=False skips the attempt)", stacklevel=5)
    return _Lockstep(model, batch, total, *options)


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device, sampled: bool):
    """Draw the sampling's noise from the device's default generator, seeded from ``generator`` (or from the
    global generator), and leave the global generators as they were; yields a function that seeds it again (after
    a capture, whose warm-up draws noise). Without ``sampled`` (greedy decoding) nothing is drawn or seeded."""
    if not sampled:
        yield lambda: None
        return
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu"))
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []

    def restart():
        torch.random.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(devices[0]):
                torch.cuda.manual_seed(seed)

    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        restart()
        yield restart


def _generate_steps(model, prompt: Batch, sequences, lengths: list[int], max_new_tokens: int,
                    rows: list[_RowSchedule], sampling, cuda_graph: bool | None) -> None:
    """Discrete generation of every row in lockstep through the step path, into ``sequences``; the positions
    before the shortest prompt's last go through one prefill pass where every block takes one. On a GPU the
    decoding step runs as one CUDA graph (unless ``cuda_graph`` is ``False``). Eager steps after the first skip
    the kernel front doors' argument checks (:func:`momkit.ops.unchecked`): a step's calls of them repeat the
    first step's dtypes, devices and, for the state updates and the projections of one position, shapes."""
    tokens, modality, latents = sequences
    batch, total = tokens.shape
    device = tokens.device
    temperature, top_k, generator = sampling
    if cuda_graph:
        _check_capturable(model, device)
    elif cuda_graph is None and not (device.type == "cuda" and model.can_capture):
        cuda_graph = False
    rules = rows[0].rules
    heads = tuple(sorted({r.default for r in rows} | {then for then, _ in rules.values()}))
    names = tuple(prompt.latents)
    start = min(lengths) - 1 if model.can_prefill else 0
    with _seeded(generator, device, temperature > 0) as restart:
        decoder = _decoder(model, cuda_graph, batch, total, heads, rules, names, temperature, top_k)
        restart()
        loop = decoder.loop if isinstance(decoder, _Graphed) else decoder
        loop.load(tokens, modality, latents, lengths, max_new_tokens, rows, start)
        if start > 0:
            model.prefill(loop.tokens[:, :start], loop.modality[:, :start], loop.state,
                          {name: values[:, :start] for name, values in loop.latents.items()})
        if start < total - 1:
            decoder.step()
        with unchecked():
            for _ in range(start + 1, total - 1):
                decoder.step()
    tokens.copy_(loop.tokens[:batch, :total])
    modality.copy_(loop.modality[:batch, :total])


def _check_capturable(model, device: torch.device) -> None:
    """Refuse ``cuda_graph=True`` where the decoding step cannot be captured, naming why."""
    if device.type != "cuda":
        raise SpecError(f"cuda_graph=True needs the model and the prompt on a CUDA device, got {device}; "
                        f"valid: cuda_graph=False or None on this device")
    if not model.can_capture:
        blocks = sorted({type(b).__name__ for b in model.blocks if not b.capturable_step or b.experts is not None})
        why = f"blocks {blocks} (no capturable_step, or learned experts)" if blocks else \
            f"bidirectional modalities {list(model.spec.bidirectional)}"
        raise SpecError(f"cuda_graph=True, but this model's decoding step cannot be captured: {why}; "
                        f"valid: cuda_graph=False or None (eager)")


def _row_batch(sequences, r: int, start: int, end: int,
               noisy: tuple[str, int, torch.Tensor, float] | None = None) -> Batch:
    """Row ``r``'s positions ``[start, end)`` as a batch of one; ``noisy = (name, span, latents, step)`` puts the
    latents of a span being denoised at ``[span, end)`` with their diffusion step."""
    tokens, modality, latents = sequences
    values = {name: v[r:r + 1, start:end].clone() for name, v in latents.items()}
    steps = {}
    if noisy is not None:
        name, span, x, step = noisy
        values[name][0, span - start:] = x.to(values[name].dtype)
        steps[name] = torch.zeros(1, end - start, dtype=x.dtype, device=x.device)
        steps[name][0, span - start:] = step
    return Batch(modality=modality[r:r + 1, start:end], tokens=tokens[r:r + 1, start:end], latents=values,
                 timesteps=steps)


def _generate_row(model, sequences, r: int, start: int, end: int, row: _RowSchedule, sampling,
                  denoising: Denoising) -> None:
    """Generate row ``r``'s positions ``[start, end)`` into ``sequences``: a discrete token from the last
    position's output, a continuous span by denoising; through prefills of a decoding state where the model
    takes them, else through the whole-sequence forward pass."""
    if model.can_prefill:
        _generate_row_prefilled(model, sequences, r, start, end, row, sampling, denoising)
        return
    tokens, modality, latents = sequences
    t = start
    while t < end:
        m = row.next()
        config = model.modalities[m]
        if config.discrete:
            hidden = model(_row_batch(sequences, r, 0, t)).hidden[:, -1]
            token = _sample(model.heads[config.name](hidden), *sampling)
            tokens[r, t], modality[r, t] = token[0], m
            row.observe(m, int(token[0]))
            t += 1
            continue
        count = row.take_span(end - t)
        modality[r, t:t + count] = m

        def conditional(x, step, t=t, count=count, config=config):
            out = model(_row_batch(sequences, r, 0, t + count, (config.name, t, x, step))).predictions[config.name]
            return out[-count:]

        def unconditional(x, step, t=t, count=count, config=config):
            return model(_row_batch(sequences, r, t, t + count, (config.name, t, x, step))).predictions[config.name]

        latents[config.name][r, t:t + count] = _denoise(model, config, count, conditional, unconditional, denoising,
                                                        sampling[2], latents[config.name].dtype)
        t += count


def _generate_row_prefilled(model, sequences, r: int, start: int, end: int, row: _RowSchedule, sampling,
                            denoising: Denoising) -> None:
    """:func:`_generate_row` on a decoding state: the prompt in one prefill, each token a step, each denoising
    step a prefill of the span from a copy of the state, and the clean span a prefill."""
    tokens, modality, latents = sequences
    state = model.allocate_state(1, end)

    def feed(state, s: int, e: int, noisy: tuple[str, int, torch.Tensor, float] | None = None) -> torch.Tensor:
        batch = _row_batch(sequences, r, s, e, noisy)
        return model.prefill(batch.tokens, batch.modality, state, batch.latents, batch.timesteps)

    hidden = feed(state, 0, start)[:, -1]
    t = start
    while t < end:
        m = row.next()
        config = model.modalities[m]
        if config.discrete:
            token = _sample(model.heads[config.name](hidden), *sampling)
            tokens[r, t], modality[r, t] = token[0], m
            row.observe(m, int(token[0]))
            hidden = model.step(tokens[r:r + 1, t], modality[r:r + 1, t], state)
            t += 1
            continue
        count = row.take_span(end - t)
        modality[r, t:t + count] = m

        def conditional(x, step, t=t, count=count, config=config):
            return model.heads[config.name](feed(copy.deepcopy(state), t, t + count, (config.name, t, x, step))[0])

        def unconditional(x, step, t=t, count=count, config=config):
            return model.heads[config.name](feed(model.allocate_state(1, count), t, t + count,
                                                 (config.name, t, x, step))[0])

        latents[config.name][r, t:t + count] = _denoise(model, config, count, conditional, unconditional, denoising,
                                                        sampling[2], latents[config.name].dtype)
        hidden = feed(state, t, t + count)[:, -1]
        t += count


def _denoise(model, config, count: int, conditional, unconditional, denoising: Denoising, generator,
             dtype: torch.dtype) -> torch.Tensor:
    """The clean latents ``(count, latent_dim)`` of a span of continuous modality ``config``, from the model's
    predictions for noisy latents ``x`` at step ``step``: ``conditional(x, step)`` given the sequence before the
    span, ``unconditional(x, step)`` given the span alone (classifier-free guidance)."""
    objective = _denoiser(model, config.name)
    device = next(model.parameters()).device
    noise = torch.randn(count, config.latent_dim, generator=generator).to(device, dtype)
    wide = torch.promote_types(dtype, torch.float32)

    def predict(x: torch.Tensor, step: float) -> torch.Tensor:
        given = conditional(x, step).to(wide)
        if denoising.guidance == 1:
            return given
        alone = unconditional(x, step).to(wide)
        return alone + denoising.guidance * (given - alone)

    return objective.sample(predict, noise, denoising.steps, denoising.sampler, generator)
