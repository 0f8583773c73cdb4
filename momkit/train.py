"""Training one model spec: AdamW with warm-up and cosine decay, held-out evaluation, FLOPs, checkpoints.

A run lives in one directory:

- ``spec.yaml``: the spec it trains (a re-run with a different spec in the same directory is refused);
- ``metrics.jsonl``: one JSON object per line, ``{"split": "train" | "eval", "step", "flops", "tokens",
  "loss", "loss/<modality>", ...}``, evaluation lines adding ``"ppl/<modality>"`` for discrete modalities;
- ``checkpoint.pt``: model, optimiser and counters after the last saved step, written atomically;
- ``result.json``: the final evaluation, written when the run has finished.

Batches are addressed by index and the objectives' noise is seeded by step, so a run resumed from a
checkpoint continues exactly as if it had not stopped. The loop never looks at a backbone's or a modality's
name: objectives, data and FLOPs all come from the spec through the registry.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torchmetrics import MeanMetric
from tqdm import tqdm

from momkit import routing
from momkit.accounting import account
from momkit.model import Model
from momkit.registry import get_registry
from momkit.spec import ModelSpec

SPEC_FILE, METRICS_FILE, CHECKPOINT_FILE, RESULT_FILE = "spec.yaml", "metrics.jsonl", "checkpoint.pt", "result.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; other names as ``torch.device`` reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here; use cpu or auto")
    return device


def learning_rate(step: int, spec: ModelSpec) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    t = spec.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: nn.Module, spec: ModelSpec) -> torch.optim.AdamW:
    """AdamW decaying the matrices of linear layers and embeddings only."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (routing.Linear, nn.Linear, nn.Embedding))}
    decay = [p for p in model.parameters() if id(p) in matrices]
    rest = [p for p in model.parameters() if id(p) not in matrices]
    groups = [{"params": decay, "weight_decay": spec.train.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.train.lr, betas=spec.train.betas)


@dataclass
class _Objectives:
    """The spec's objective of every modality, built once."""

    losses: list
    weights: list[float]
    names: list[str]

    @classmethod
    def of(cls, spec: ModelSpec) -> _Objectives:
        registry = get_registry()
        losses, weights = [], []
        for i, modality in enumerate(spec.modalities):
            config = spec.objective(modality.name)
            losses.append(registry.get("objective", config.kind).build(config, modality, i))
            weights.append(config.weight)
        return cls(losses, weights, spec.modality_names)

    def evaluate(self, model: Model, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Weighted training loss and ``{name: (loss_sum, count)}`` of one batch."""
        contexts = []
        for loss in self.losses:
            batch, context = loss.prepare(batch, generator)
            contexts.append(context)
        output = model(batch)
        total, parts = 0.0, {}
        for name, loss, weight, context in zip(self.names, self.losses, self.weights, contexts):
            summed, count = loss(output, batch, context)
            parts[name] = (summed, count)
            if count:
                total = total + weight * summed / count
        return total, parts


class _Log:
    """``metrics.jsonl``, appended line by line; on resume, cut back to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _flops_of(batch, per_token: list[float]) -> float:
    counts = torch.bincount(batch.modality.flatten(), minlength=len(per_token)).tolist()
    return float(sum(c * f for c, f in zip(counts, per_token)))


def _move(batch, device: torch.device):
    return batch if device.type == "cpu" else batch.to(device)


@torch.no_grad()
def evaluate(model: Model, objectives: _Objectives, source, spec: ModelSpec, device: torch.device,
             autocast) -> dict:
    """Mean loss per modality (and perplexity for discrete ones) over the held-out batches."""
    model.eval()
    means = {name: MeanMetric() for name in objectives.names}
    available = source.num_batches(spec.train.batch_size)
    for i in range(spec.train.eval_batches):
        batch = _move(source.batch(i % available if available else i, spec.train.batch_size), device)
        generator = torch.Generator().manual_seed(spec.train.seed * 7919 + i)
        with autocast():
            _, parts = objectives.evaluate(model, batch, generator)
        for name, (summed, count) in parts.items():
            if count:
                means[name].update(summed.detach().float().cpu() / count, weight=count)
    model.train()
    record = {}
    for modality in spec.modalities:
        if means[modality.name].weight:
            value = float(means[modality.name].compute())
            record[f"loss/{modality.name}"] = value
            if modality.discrete:
                record[f"ppl/{modality.name}"] = math.exp(min(value, 50.0))
    record["loss"] = sum(v for k, v in record.items() if k.startswith("loss/"))
    return record


def train(spec: ModelSpec, out_dir: str | Path, *, max_steps: int | None = None, device: str | None = None,
          progress: bool = True) -> dict:
    """Train ``spec`` in ``out_dir`` and return its final evaluation; resume or skip what is already there.

    Args:
        spec: The model spec with its ``train`` and ``data`` settings.
        out_dir: The run directory (created if missing).
        max_steps: Stop after this many optimiser steps instead of ``spec.train.steps`` (the schedule keeps
            its length, so a run stopped early can be continued).
        device: Overrides ``spec.train.device``.
        progress: Show a progress bar with the live loss per modality.

    Returns:
        The last evaluation record (also in ``result.json`` once the run has finished all its steps).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_text = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if (out / SPEC_FILE).exists() and (out / SPEC_FILE).read_text() != spec_text:
        raise ValueError(f"{out} holds a run of a different spec; use another directory or remove it")
    (out / SPEC_FILE).write_text(spec_text)
    if (out / RESULT_FILE).exists():
        return json.loads((out / RESULT_FILE).read_text())

    t = spec.train
    dev = resolve_device(device or t.device)
    bf16 = t.precision == "bf16" or (t.precision == "auto" and dev.type == "cuda")
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    torch.manual_seed(t.seed)
    model = Model(spec).to(dev)
    optimizer = _optimizer(model, spec)
    objectives = _Objectives.of(spec)
    data = spec.dataset()
    build = get_registry().get("dataset", data.kind).build
    train_source = build(data, spec.modalities, "train", t.seq_len)
    eval_source = build(data, spec.modalities, "eval", t.seq_len)
    acc = account(spec, seq_len=t.seq_len)
    per_token = [sum(acc.training_flops[m.name].values()) for m in spec.modalities]

    step, flops, tokens, record = 0, 0.0, 0, {}
    if (out / CHECKPOINT_FILE).exists():
        state = torch.load(out / CHECKPOINT_FILE, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, flops, tokens, record = state["step"], state["flops"], state["tokens"], state["eval"]
    log = _Log(out / METRICS_FILE, step)

    def checkpoint() -> None:
        _save(out / CHECKPOINT_FILE, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                      "step": step, "flops": flops, "tokens": tokens, "eval": record})

    last = min(t.steps, max_steps if max_steps is not None else t.steps)
    bar = tqdm(total=last, initial=step, disable=not progress, desc=spec.name, dynamic_ncols=True)
    between_steps = True
    try:
        while step < last:
            between_steps = False
            lr = learning_rate(step, spec)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums = {name: [0.0, 0] for name in objectives.names}
            step_flops, step_tokens = 0.0, 0
            for micro in range(t.grad_accum):
                batch = _move(train_source.batch(step * t.grad_accum + micro, t.batch_size), dev)
                generator = torch.Generator().manual_seed(t.seed * 1_000_003 + step * t.grad_accum + micro)
                with autocast():
                    loss, parts = objectives.evaluate(model, batch, generator)
                (loss / t.grad_accum).backward()
                step_flops += _flops_of(batch, per_token)
                step_tokens += batch.modality.numel()
                for name, (summed, count) in parts.items():
                    sums[name][0] += float(summed.detach())
                    sums[name][1] += count
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done, flops, tokens = step + 1, flops + step_flops, tokens + step_tokens
            losses = {f"loss/{n}": s / c for n, (s, c) in sums.items() if c}
            log.write({"split": "train", "step": done, "flops": flops, "tokens": tokens, "lr": lr,
                       "loss": sum(losses.values()), **losses})
            if done % t.eval_every == 0 or done == t.steps:
                record = {"split": "eval", "step": done, "flops": flops, "tokens": tokens,
                          **evaluate(model, objectives, eval_source, spec, dev, autocast)}
                log.write(record)
            step, between_steps = done, True
            if step % t.checkpoint_every == 0 or step == last:
                checkpoint()
            bar.update(1)
            bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in losses.items()})
    except KeyboardInterrupt:
        if between_steps:
            checkpoint()
        raise
    finally:
        bar.close()
    if step == t.steps:
        (out / RESULT_FILE).write_text(json.dumps(record, indent=1))
    return record
