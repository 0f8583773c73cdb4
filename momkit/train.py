"""Training one model spec: AdamW with warm-up and cosine decay, held-out evaluation, FLOPs, checkpoints.

A run lives in one directory, laid out as :class:`momkit.rundir.RunDir` says (spec, metrics, checkpoint,
result). AdamW decays every parameter that :func:`momkit.routing.decays` names (matrices, less those that their
layer or backbone marks with :func:`momkit.routing.no_weight_decay`).

Batches are addressed by index and the objectives' noise is seeded by micro-batch, so a run resumed from a
checkpoint continues exactly as if it had not stopped. The loop never looks at a backbone's or a modality's
name: objectives, data and FLOPs all come from the spec through the registry.

Under ``torchrun`` the same call trains with DistributedDataParallel, or with FSDP2 when the spec's
``parallel.strategy`` is ``fsdp``. The ``grad_accum`` micro-batches of a step are shared by the ranks (rank
``r`` takes those whose number is ``r`` modulo the world size), so a run computes the same steps on any
number of ranks that divides ``grad_accum``, and its checkpoints, written by every rank through
``torch.distributed.checkpoint``, resume on any such number. Losses, FLOPs and metrics are summed over
ranks; rank 0 alone writes files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import yaml
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, \
    set_state_dict
from torchmetrics import MeanMetric, SumMetric
from tqdm import tqdm

from momkit.accounting import account
from momkit.errors import SpecError
from momkit.experts import RouterSummary, mutual_information
from momkit.model import Model, ModelOutput, save_model
from momkit.pretrained import SUITE_SOURCE, fill, frozen, load
from momkit.registry import get_registry
from momkit.routing import decays
from momkit.rundir import RunDir
from momkit.spec import ModelSpec
from momkit.tracking import LogContext, Loggers


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU; other names as ``torch.device`` reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SpecError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"device {name!r} asked for, but CUDA is not available here; use cpu or auto")
    return device


@dataclass
class _Ranks:
    """This process's place among the ``torchrun`` processes (one process: rank 0 of 1)."""

    rank: int
    world: int
    owns_group: bool

    @classmethod
    def start(cls, device: torch.device) -> _Ranks:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1 or dist.is_initialized():
            return cls(dist.get_rank() if dist.is_initialized() else 0, world, False)
        if device.type == "cuda":
            dist.init_process_group("cpu:gloo,cuda:nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        return cls(dist.get_rank(), world, True)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def total(self, *values: float) -> list[float]:
        """``values`` summed over the ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def stop(self) -> None:
        """Destroy the process group this process made. A finished run first meets the other ranks at a barrier
        (:func:`train`), so that no rank tears its group down while another still writes its results: on a 2-core
        CPU, 1 of 20 two-rank FSDP runs without it aborted in its exit (``terminate called without an active
        exception``), none of 50 with it."""
        if self.owns_group:
            dist.destroy_process_group()


def _device(name: str) -> torch.device:
    """The device of this process: under ``torchrun`` with CUDA, the GPU of its local rank."""
    device = resolve_device(name)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _parallel(model: Model, spec: ModelSpec, ranks: _Ranks, device: torch.device) -> nn.Module:
    """The module the training step calls: the model itself on one rank; over several, the model wrapped in
    DistributedDataParallel, or sharded in place by FSDP2 (``fully_shard`` of every block, then of the model, over
    a mesh of ``device``'s type: without one, FSDP2 takes CUDA wherever a GPU is present, also for a CPU run).

    Every parameter takes part in every forward and backward pass (an absent modality's adapter and head run
    on no positions and get a zero gradient), which both engines need to keep the ranks' reductions in step.
    """
    if ranks.world == 1:
        return model
    parallel = spec.parallel
    if parallel.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ranks.world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if parallel.param_dtype == "bf16" else None,
                                      reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=parallel.reshard_after_forward, mp_policy=policy)
        return fully_shard(model, mesh=mesh, mp_policy=policy)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def learning_rate(step: int, spec: ModelSpec) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    t = spec.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: nn.Module, spec: ModelSpec, decayed: set[str] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying those named in ``decayed``, by default those
    :func:`decays` picks; a sharded model passes the names taken before sharding, which replaces the
    parameters and their marks."""
    if decayed is None:
        decayed = {name for name, p in model.named_parameters() if decays(p)}
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = [p for name, p in trainable if name in decayed]
    rest = [p for name, p in trainable if name not in decayed]
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

    def evaluate(self, model: Model, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict, ModelOutput]:
        """Weighted training loss, ``{name: (loss_sum, count)}`` of one batch, and the model's output (its
        ``router``: the routers' summary of a model with learned experts, whose auxiliary loss the training loss
        includes).

        A modality without predictions in the batch adds its (zero) empty sum, so that its head still takes
        part in the backward pass with a zero gradient.
        """
        contexts = []
        for loss in self.losses:
            batch, context = loss.prepare(batch, generator)
            contexts.append(context)
        output = model(batch)
        total, parts = 0.0, {}
        for name, loss, weight, context in zip(self.names, self.losses, self.weights, contexts):
            summed, count = loss(output, batch, context)
            parts[name] = (summed, count)
            total = total + weight * summed / max(count, 1)
        if output.router is not None:
            total = total + output.router.aux_loss
        return total, parts, output


class _Log:
    """``metrics.jsonl``, appended line by line by rank 0; on resume, cut back to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int, main: bool, loggers: Loggers | None = None):
        self.path, self.main, self.loggers = path, main, loggers
        if main:
            lines = path.read_text().splitlines() if path.exists() else []
            kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        """Append ``record`` to ``metrics.jsonl``, then send it to the experiment loggers."""
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.loggers is not None:
                self.loggers.log(record)


@contextmanager
def _single_process_quietly():
    """``torch.distributed.checkpoint`` warns that it runs in one process when no group exists; it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _save(run: RunDir, model: nn.Module, optimizer, ranks: _Ranks, progress: dict) -> None:
    """Write the checkpoint from every rank: into a fresh directory, then swapped in by rank 0."""
    target = run.checkpoint_dir
    fresh, old = target.with_name(target.name + ".tmp"), target.with_name(target.name + ".old")
    if ranks.main:
        shutil.rmtree(fresh, ignore_errors=True)
    ranks.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    with _single_process_quietly():
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=fresh)
    ranks.barrier()
    if ranks.main:
        (fresh / run.progress_file.name).write_text(json.dumps(progress))
        if target.exists():
            os.replace(target, old)
        os.replace(fresh, target)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()


def _load(run: RunDir, model: nn.Module, optimizer) -> dict:
    """Restore model and optimiser from the checkpoint (written on any number of ranks); its counters."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=run.checkpoint_dir)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return json.loads(run.progress_file.read_text())


def run_model(out_dir: str | Path) -> Model:
    """The model of a run directory: the trained model of a finished run (``model/``), else the weights of its
    last checkpoint, so an unfinished run can be sampled while it trains."""
    run = RunDir(out_dir)
    if run.model_dir.is_dir():
        return load(run.model_dir)
    if not run.spec_file.is_file() or not run.has_checkpoint:
        raise SpecError(f"{out_dir} is not a run directory with a finished model or a checkpoint; train it first "
                        f"(momkit train SPEC --out {out_dir})")
    model = Model(ModelSpec.model_validate(yaml.safe_load(run.spec_file.read_text())))
    state = {"model": get_model_state_dict(model)}
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=run.checkpoint_dir)
    model.load_state_dict(state["model"])
    return model


def _move(batch, device: torch.device):
    return batch if device.type == "cpu" else batch.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, objectives: _Objectives, source, spec: ModelSpec, device: torch.device,
             autocast, ranks: _Ranks) -> dict:
    """Mean loss per modality (and perplexity for discrete ones, and bits per byte for those whose token bytes
    the source gives) over the held-out batches, which the ranks share; torchmetrics sums the means' states over
    the ranks.

    Every rank runs the same number of forward passes (a sharded model gathers its parameters collectively);
    a rank past the last batch repeats one and does not count it.
    """
    model.eval()
    means = {name: MeanMetric().to(device) for name in objectives.names}
    token_bytes = {name: torch.as_tensor(table, device=device)
                   for name, table in getattr(source, "token_bytes", {}).items()}
    nats = {name: SumMetric().to(device) for name in token_bytes}
    counted_bytes = {name: SumMetric().to(device) for name in token_bytes}
    loads = None
    available = source.num_batches(spec.train.batch_size)
    count_batches = spec.train.eval_batches
    for k in range(math.ceil(count_batches / ranks.world)):
        i = k * ranks.world + ranks.rank
        index = i % count_batches
        batch = _move(source.batch(index % available if available else index, spec.train.batch_size), device)
        generator = torch.Generator().manual_seed(spec.train.seed * 7919 + index)
        with autocast():
            _, parts, output = objectives.evaluate(model, batch, generator)
        router = output.router
        for name, (summed, count) in parts.items():
            if count and i < count_batches:
                means[name].update(summed.detach().float() / count, weight=count)
                if name in token_bytes:
                    nats[name].update(summed.detach().float())
                    counted_bytes[name].update(token_bytes[name][batch.tokens[output.targets[name]]].sum())
        if router is not None:
            counted = router.counts if i < count_batches else torch.zeros_like(router.counts)
            loads = counted if loads is None else loads + counted
    model.train()
    record = {} if loads is None else _expert_load(loads, spec, ranks)
    for modality in spec.modalities:
        counted = ranks.total(float(means[modality.name].weight))[0]
        if counted:
            value = float(means[modality.name].compute())
            record[f"loss/{modality.name}"] = value
            if modality.discrete:
                record[f"ppl/{modality.name}"] = math.exp(min(value, 50.0))
            if modality.name in token_bytes and float(counted_bytes[modality.name].compute()):
                record[f"bpb/{modality.name}"] = (float(nats[modality.name].compute()) / math.log(2)
                                                  / float(counted_bytes[modality.name].compute()))
    record["loss"] = sum(v for k, v in record.items() if k.startswith("loss/"))
    return record


def _expert_load(counts: torch.Tensor, spec: ModelSpec, ranks: _Ranks) -> dict:
    """The evaluation's expert load: per modality, the fraction of its token slots on each expert id, and the
    router-modality mutual information (bits, and as a share of the modality entropy)."""
    counts = torch.tensor(ranks.total(*counts.flatten().tolist())).reshape(counts.shape)
    info, share = mutual_information(counts)
    load = {m.name: [round(float(c) / max(float(row.sum()), 1.0), 6) for c in row]
            for m, row in zip(spec.modalities, counts)}
    return {"expert_load": load, "router_mi": info, "router_mi_share": share}


@dataclass
class _Progress:
    """The counters a checkpoint keeps: optimiser steps done, training FLOPs and tokens so far, the last
    evaluation record, the steps skipped for non-finite values (in all, and in a row up to now), and the fp16
    gradient scaler's state."""

    step: int = 0
    flops: float = 0.0
    tokens: int = 0
    eval: dict = field(default_factory=dict)
    skipped: int = 0
    bad_streak: int = 0
    scaler: dict = field(default_factory=dict)  # read from a checkpoint; saved fresh by each save


@dataclass
class _StepStats:
    """What one optimiser step measured over its micro-batches (summed over ranks by :meth:`summed`): per
    modality the summed loss and the number of predictions, the training FLOPs and the tokens.

    While the micro-batches run, the losses and the routers' figures add up as tensors on the device, read
    once by :meth:`summed`, so that counting a micro-batch does not wait for its kernels."""

    loss_sums: list
    counts: list[float]
    flops: float = 0.0
    tokens: float = 0.0
    router: list = field(default_factory=lambda: [0.0] * 5)  # balance, z, dropped, slots, micro-batches

    @classmethod
    def empty(cls, n_modalities: int) -> _StepStats:
        return cls([0.0] * n_modalities, [0.0] * n_modalities)

    def add(self, parts: dict, modality: torch.Tensor, per_token: list[float],
            router: RouterSummary | None = None) -> None:
        """Count one micro-batch: its objectives' ``{name: (loss_sum, count)}`` in modality order, its FLOPs
        from its ``modality`` ids (on the host), its routers' summary."""
        for i, (summed, count) in enumerate(parts.values()):
            self.loss_sums[i] = self.loss_sums[i] + summed.detach().float()
            self.counts[i] += count
        counts = torch.bincount(modality.flatten(), minlength=len(per_token)).tolist()
        self.flops += float(sum(c * f for c, f in zip(counts, per_token)))
        self.tokens += modality.numel()
        if router is not None:
            values = (router.balance.detach().float(), router.z.detach().float(), router.dropped.float(),
                      router.slots, 1)
            self.router = [a + b for a, b in zip(self.router, values)]

    def summed(self, ranks: _Ranks) -> _StepStats:
        n = len(self.counts)
        pending = [v for v in (*self.loss_sums, *self.router) if isinstance(v, torch.Tensor)]
        read = iter(torch.stack(pending).tolist() if pending else [])

        def host(values: list) -> list[float]:
            return [next(read) if isinstance(v, torch.Tensor) else v for v in values]

        loss_sums = host(self.loss_sums)
        values = ranks.total(*loss_sums, *self.counts, self.flops, self.tokens, *host(self.router))
        return _StepStats(values[:n], values[n:2 * n], values[2 * n], values[2 * n + 1], values[2 * n + 2:])

    def losses(self, names: list[str]) -> dict[str, float]:
        """``{"loss/<name>": mean loss}`` of the modalities that had predictions."""
        return {f"loss/{n}": s / c for n, s, c in zip(names, self.loss_sums, self.counts) if c}

    def routers(self) -> dict[str, float]:
        """With learned experts: the mean load-balancing loss and z-loss over the micro-batches and the share of
        token slots dropped; else nothing."""
        balance, z, dropped, slots, batches = self.router
        if not batches:
            return {}
        return {"aux/balance": balance / batches, "aux/z": z / batches, "dropped": dropped / max(slots, 1)}


@dataclass
class _Trainer:
    """What a run builds before its first step: the model (and its data-parallel wrapper), the optimiser, the
    objectives, both data sources and the training FLOPs per token of each modality."""

    spec: ModelSpec
    device: torch.device
    model: Model
    wrapped: nn.Module
    optimizer: torch.optim.AdamW
    objectives: _Objectives
    train_source: object
    eval_source: object
    per_token: list[float]
    autocast: Callable
    scaler: torch.amp.GradScaler | None
    ahead: tuple | None = None

    @classmethod
    def build(cls, spec: ModelSpec, device: torch.device, ranks: _Ranks) -> _Trainer:
        t = spec.train
        precision = t.precision if t.precision != "auto" else "bf16" if device.type == "cuda" else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else nullcontext
        scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
        torch.manual_seed(t.seed)
        model = Model(spec)
        if spec.init_from is not None:
            if spec.init_from.startswith(SUITE_SOURCE):
                raise SpecError(f"init_from {spec.init_from!r} names a suite variant, which only a suite resolves "
                                f"(momkit ablate); give a model directory, a checkpoint directory or a hub id")
            fill(model, load(spec.init_from))
        for name in frozen(model, t.freeze):
            model.get_parameter(name).requires_grad_(False)
        decayed = {name for name, p in model.named_parameters() if decays(p)}
        model = model.to(device)
        wrapped = _parallel(model, spec, ranks, device)
        optimizer = _optimizer(model, spec, decayed)
        objectives = _Objectives.of(spec)
        data = spec.dataset()
        build = get_registry().get("dataset", data.kind).build
        train_source = build(data, spec.modalities, "train", t.seq_len)
        eval_source = build(data, spec.modalities, "eval", t.seq_len)
        acc = account(spec, seq_len=t.seq_len)
        per_token = [sum(acc.training_flops[m.name].values()) for m in spec.modalities]
        return cls(spec, device, model, wrapped, optimizer, objectives, train_source, eval_source, per_token, autocast,
                   scaler)

    def step(self, step: int, ranks: _Ranks) -> tuple[_StepStats, bool]:
        """One optimiser step: this rank's micro-batches forward and backward, clipping, the update; and whether
        the loss and the gradients were finite (if not, the update is skipped)."""
        t = self.spec.train
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.spec)
        stats = _StepStats.empty(len(self.spec.modalities))
        micros = range(ranks.rank, t.grad_accum, ranks.world)
        for k, micro in enumerate(micros):
            index = step * t.grad_accum + micro
            modality, batch = self._batch(index)
            generator = torch.Generator().manual_seed(t.seed * 1_000_003 + index)
            with self._gradient_sync(k + 1 == len(micros)), self.autocast():
                loss, parts, output = self.objectives.evaluate(self.wrapped, batch, generator)
                loss = loss * ranks.world / t.grad_accum
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            stats.add(parts, modality, self.per_token, output.router)
            if k + 1 < len(micros):
                self._prepare(step * t.grad_accum + micros[k + 1])
            elif step + 1 < t.steps:
                self._prepare((step + 1) * t.grad_accum + micros[0])
        stats = stats.summed(ranks)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip > 0 else math.inf)
        finite = math.isfinite(float(norm)) and all(math.isfinite(s) for s in stats.loss_sums)
        if finite and self.scaler is None:
            self.optimizer.step()
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return stats, finite

    def _gradient_sync(self, sync: bool):
        """With DDP, all-reduce the gradients only in the backward of a rank's last micro-batch of the step;
        those of the micro-batches before it add up on the rank (``no_sync``). FSDP2 reduce-scatters after
        every micro-batch, which keeps only a shard of the gradients between them."""
        if not sync and isinstance(self.wrapped, nn.parallel.DistributedDataParallel):
            return self.wrapped.no_sync()
        return nullcontext()

    def _prepare(self, index: int) -> None:
        """Read training batch ``index`` and start its copy to the device, while the device still runs the
        kernels of the micro-batch before it."""
        batch = self.train_source.batch(index, self.spec.train.batch_size)
        self.ahead = (index, batch.modality, _move(batch, self.device))

    def _batch(self, index: int) -> tuple[torch.Tensor, object]:
        """Training batch ``index``: its modality ids on the host, and the batch on the device."""
        if self.ahead is None or self.ahead[0] != index:
            self._prepare(index)
        _, modality, batch = self.ahead
        self.ahead = None
        return modality, batch

    def scaler_state(self) -> dict:
        """The gradient scaler's state (empty without fp16), for the checkpoint."""
        return {} if self.scaler is None else self.scaler.state_dict()

    def evaluate(self, done: _Progress, ranks: _Ranks) -> dict:
        """The evaluation record at ``done``'s step."""
        return {"split": "eval", "step": done.step, "flops": done.flops, "tokens": done.tokens,
                **evaluate(self.model, self.objectives, self.eval_source, self.spec, self.device, self.autocast,
                           ranks)}


def train(spec: ModelSpec, out_dir: str | Path, *, max_steps: int | None = None, device: str | None = None,
          progress: bool = True) -> dict:
    """Train ``spec`` in ``out_dir`` and return its final evaluation; resume or skip what is already there.

    Args:
        spec: The model spec with its ``train`` and ``data`` settings.
        out_dir: The run directory (created if missing).
        max_steps: Stop after this many optimiser steps instead of ``spec.train.steps`` (the schedule keeps
            its length, so a run stopped early can be continued). A run stopped before its first evaluation
            is evaluated at its last step; that record is returned, not logged (the metrics of a run continued
            later stay those of an uninterrupted run).
        device: Overrides ``spec.train.device``.
        progress: Show a progress bar with the live loss per modality.

    Returns:
        The last evaluation record (also in ``result.json`` once the run has finished all its steps).
    """
    dev = _device(device or spec.train.device)
    ranks = _Ranks.start(dev)
    try:
        record = _run(spec, RunDir(out_dir), max_steps, dev, ranks, progress and ranks.main)
        ranks.barrier()
        return record
    finally:
        ranks.stop()


def _run(spec: ModelSpec, run: RunDir, max_steps: int | None, dev: torch.device, ranks: _Ranks,
         progress: bool) -> dict:
    t = spec.train
    if t.grad_accum % ranks.world:
        raise SpecError(f"train.grad_accum = {t.grad_accum} must be a multiple of the number of ranks "
                        f"({ranks.world}): the ranks share a step's micro-batches")
    run.check_spec(spec)
    ranks.barrier()
    if ranks.main:
        run.write_spec(spec)
    ranks.barrier()
    if run.finished:
        return run.result()

    trainer = _Trainer.build(spec, dev, ranks)
    done = _Progress(**_load(run, trainer.model, trainer.optimizer)) if run.has_checkpoint else _Progress()
    if trainer.scaler is not None and done.scaler:
        trainer.scaler.load_state_dict(done.scaler)
    last = min(t.steps, max_steps if max_steps is not None else t.steps)
    _loop(trainer, run, done, last, ranks, progress)
    record = done.eval or trainer.evaluate(done, ranks)
    record = {**record, "skipped_steps": done.skipped} if done.skipped else record
    if done.step == t.steps:
        state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if ranks.main:
            save_model(run.model_dir, spec, state)
            run.write_result(record)
    return record


def _loop(trainer: _Trainer, run: RunDir, done: _Progress, last: int, ranks: _Ranks, progress: bool) -> None:
    """Train from ``done.step`` to step ``last``, logging, evaluating and checkpointing as the spec says;
    ``done`` always describes the last finished step (what a checkpoint saves). A step whose loss or gradients
    are not finite updates nothing, is logged with ``"skipped": true`` and saves no checkpoint;
    ``train.max_bad_steps`` of them in a row stop the run with a ``SpecError``, its last checkpoint kept."""
    spec, t = trainer.spec, trainer.spec.train
    loggers = Loggers(t.loggers, LogContext.of(run.path, spec, done.step, done.flops)) if ranks.main else None
    log = _Log(run.metrics_file, done.step, ranks.main, loggers)
    bar = tqdm(total=last, initial=done.step, disable=not progress, desc=spec.name, dynamic_ncols=True)
    between_steps, saved = True, done.step if run.has_checkpoint else None

    def checkpoint() -> None:
        _save(run, trainer.model, trainer.optimizer, ranks, {**asdict(done), "scaler": trainer.scaler_state()})
    try:
        while done.step < last:
            between_steps = False
            stats, finite = trainer.step(done.step, ranks)
            step = _Progress(done.step + 1, done.flops + stats.flops, done.tokens + int(stats.tokens), done.eval,
                             done.skipped + (not finite), 0 if finite else done.bad_streak + 1)
            losses = stats.losses(trainer.objectives.names)
            log.write({"split": "train", "step": step.step, "flops": step.flops, "tokens": step.tokens,
                       "lr": learning_rate(done.step, spec), "time": time.time(), "loss": sum(losses.values()),
                       **losses, **stats.routers(), **({} if finite else {"skipped": True})})
            if step.bad_streak >= t.max_bad_steps:
                kept = f"its checkpoint of step {saved} is kept" if saved is not None else "no checkpoint was saved"
                raise SpecError(f"{spec.name}: stopped at step {step.step}: the loss or the gradients were not "
                                f"finite for {step.bad_streak} steps in a row (train.max_bad_steps); {kept}. Lower "
                                f"train.lr, train with precision bf16 or fp32, or raise train.max_bad_steps, in a "
                                f"new run directory")
            if step.step % t.eval_every == 0 or step.step == t.steps:
                step.eval = trainer.evaluate(step, ranks)
                log.write(step.eval)
            vars(done).update(vars(step))
            between_steps = True
            if finite and (done.step % t.checkpoint_every == 0 or done.step == last):
                checkpoint()
                saved = done.step
            bar.update(1)
            bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in losses.items()})
    except KeyboardInterrupt:
        if between_steps:
            checkpoint()
        raise
    finally:
        bar.close()
        if loggers is not None:
            loggers.close()
