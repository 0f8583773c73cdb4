"""Sampling from a model, one position at a time through the blocks' step path.

Every prompt position is fed once (prefill through ``step``) and every sampled token once: nothing re-runs the
prefix. Rows of a batch may have prompts of different lengths; they step in lockstep, each row feeding its
own prompt until it ends and its samples after that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from momkit.batch import Batch
from momkit.errors import SpecError


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
    """

    tokens: torch.Tensor
    modality: torch.Tensor
    lengths: torch.Tensor


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


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """``(N, vocab)`` logits -> ``(N,)`` token ids; greedy when ``temperature`` is 0."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]


def _check_options(model: nn.Module, prompt: Batch, max_new_tokens, prompt_lengths, temperature, top_k, schedule):
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
    for name in sampled:
        if not model.modalities[names.index(name)].discrete:
            raise SpecError(f"cannot sample modality {name!r}: it is continuous; generation samples discrete "
                            f"tokens only")


@torch.no_grad()
def generate(model: nn.Module, prompt: Batch, max_new_tokens: int, *, prompt_lengths: torch.Tensor | None = None,
             temperature: float = 1.0, top_k: int | None = None, schedule: ModalitySchedule | None = None,
             generator: torch.Generator | None = None) -> Generation:
    """Sample ``max_new_tokens`` tokens after each prompt.

    Args:
        model: A :class:`momkit.Model` (this module reads its ``check``, ``modalities``, ``allocate_state``,
            ``step`` and ``heads``).
        prompt: ``(b, l)`` prompts; row ``r`` uses its first ``prompt_lengths[r]`` positions (the others must
            still hold valid ids; they are not read).
        max_new_tokens: Tokens to sample per row.
        prompt_lengths: ``(b,)`` prompt lengths; all ``l`` if omitted.
        temperature: Softmax temperature; 0 picks the most likely token (greedy).
        top_k: Sample among the ``top_k`` most likely tokens only.
        schedule: Which modality each new position is of; by default that of the prompt's last position.
        generator: Random generator of the sampling.

    Returns:
        A :class:`Generation`.
    """
    schedule = schedule or ModalitySchedule()
    _check_options(model, prompt, max_new_tokens, prompt_lengths, temperature, top_k, schedule)
    batch, length = prompt.modality.shape
    device = prompt.modality.device
    lengths = (torch.full((batch,), length, device=device) if prompt_lengths is None else prompt_lengths).tolist()
    total = max(lengths) + max_new_tokens
    tokens = torch.zeros(batch, total, dtype=torch.int64, device=device)
    modality = torch.zeros_like(tokens)
    modality[:, :length] = prompt.modality
    if prompt.tokens is not None:
        tokens[:, :length] = prompt.tokens

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

    state = model.allocate_state(batch, total)
    for t in range(total - 1):
        latents = {k: v[:, t] for k, v in prompt.latents.items()} if t < length else {}
        h = model.step(tokens[:, t], modality[:, t], state, latents)
        for r in range(batch):
            if t + 1 >= lengths[r] + max_new_tokens:
                tokens[r, t + 1], modality[r, t + 1] = tokens[r, t], modality[r, t]
        sampling = [r for r in range(batch) if lengths[r] <= t + 1 < lengths[r] + max_new_tokens]
        chosen = {r: rows[r].next() for r in sampling}
        for m in sorted(set(chosen.values())):
            group = [r for r in sampling if chosen[r] == m]
            index = torch.tensor(group, device=device)
            sample = _sample(model.heads[names[m]](h[index]), temperature, top_k, generator)
            tokens[index, t + 1] = sample
            modality[index, t + 1] = m
            for r, token in zip(group, sample.tolist()):
                rows[r].observe(m, token)
    out_lengths = torch.tensor([n + max_new_tokens for n in lengths], device=device)
    past = torch.arange(total, device=device) >= out_lengths[:, None]
    return Generation(tokens=tokens.masked_fill(past, 0), modality=modality.masked_fill(past, 0),
                      lengths=out_lengths)
