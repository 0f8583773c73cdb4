"""Ablation suites: train every variant of a base spec for every seed, then compare them per modality.

A suite file names a base model spec, the variants (named overrides of dotted spec fields, and/or a grid
over such fields), the seeds, the baseline variant and overrides applied to every variant (training and data
settings). Every variant's spec is validated before any training starts. Runs live in
``OUT/runs/<variant>/seed<k>/`` (see :mod:`momkit.train`): a finished run is skipped and an interrupted one
resumes, so re-running the same command completes a suite. Runs go one after another, up to ``workers`` at
once in separate processes (one per GPU), or as Slurm jobs through submitit; whichever wrote the run logs,
the summary is rebuilt from them alone.

FLOPs-to-match (the Mixture-of-Mamba paper's headline metric) is, per modality, the training FLOPs at which
a variant's held-out loss first reaches the baseline's final held-out loss, over the FLOPs at which the
baseline's does, linearly interpolated between evaluations of the seed-averaged curves, each curve first
fitted non-increasing (:func:`monotone`), so that a dip of evaluation noise reaches nothing early and the
baseline is at 100% by construction. On a baseline still improving at its end this is the paper's fraction of
the baseline's training FLOPs.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
import os
import queue
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Union

import torch
from pydantic import Field, ValidationError, field_validator, model_validator

from momkit.errors import SpecError
from momkit.model import build_model
from momkit.pretrained import SUITE_SOURCE
from momkit.spec import ModelSpec, StrictModel, read_mapping, set_field
from momkit.rundir import RunDir
from momkit.train import train

SUITE_FILE = "suite.json"


class SuiteSpec(StrictModel):
    """An ablation suite."""

    name: str = Field(min_length=1, description="Name of the suite, used in the summary.")
    base: Union[str, dict[str, Any]] = Field(description="The base model spec: a path (relative to the suite "
                                                         "file) or an inline mapping.")
    variants: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Named variants, each a mapping of dotted spec fields to values, "
                                          "e.g. `{routing.specific: dense}`.")
    grid: dict[str, list[Any]] = Field(
        default_factory=dict, description="Dotted spec fields and the values to try; every combination is a "
                                          "variant named `field=value,...`.")
    seeds: list[int] = Field([0], min_length=1, description="Seeds (`train.seed`) of every variant.")
    baseline: str = Field(description="The variant the others are compared with.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted spec fields set in every "
                                                                        "variant (training and data settings).")
    slurm: dict[str, Any] = Field(default_factory=dict, description="Parameters of each Slurm job with "
                                                                    "`--launcher slurm` (submitit's "
                                                                    "`update_parameters`, e.g. `timeout_min`, "
                                                                    "`slurm_partition`, `gpus_per_node`).")

    @field_validator("grid")
    @classmethod
    def _grid_not_empty(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        empty = [k for k, v in value.items() if not v]
        if empty:
            raise SpecError(f"grid field(s) {', '.join(map(repr, empty))} have no values; give at least one")
        return value

    @model_validator(mode="after")
    def _variants_and_baseline(self) -> SuiteSpec:
        names = list(self.all_variants())
        if not names:
            raise SpecError("the suite has no variants: give `variants` and/or a `grid`")
        if self.baseline not in names:
            raise SpecError(f"baseline {self.baseline!r} is not a variant; variants: {', '.join(names)}")
        return self

    def all_variants(self) -> dict[str, dict[str, Any]]:
        """``{variant: overrides}``: the named variants, then the grid's combinations."""
        variants = dict(self.variants)
        fields = list(self.grid)
        for values in itertools.product(*self.grid.values()) if fields else ():
            name = ",".join(f"{f}={_label(v)}" for f, v in zip(fields, values))
            variants[name] = dict(zip(fields, values))
        return variants


def _label(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def variant_specs(suite: SuiteSpec, base: dict[str, Any]) -> dict[str, dict[int, ModelSpec]]:
    """``{variant: {seed: ModelSpec}}``, every spec validated (``ValueError`` naming variant and field)."""
    specs = {}
    for name, changes in suite.all_variants().items():
        specs[name] = {}
        for seed in suite.seeds:
            data = copy.deepcopy(base)
            for dotted, value in {**suite.overrides, **changes, "train.seed": seed}.items():
                set_field(data, dotted, value)
            data["name"] = f"{name}/seed{seed}"
            try:
                specs[name][seed] = ModelSpec.model_validate(data)
                with torch.device("meta"):
                    build_model(specs[name][seed])
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                                     for e in exc.errors())
                raise SpecError(f"variant {name!r} (seed {seed}) is not a valid spec: {problems}") from None
            except SpecError as exc:
                raise SpecError(f"variant {name!r} (seed {seed}) does not build: {exc}") from None
    return specs


def load_suite(path: str | Path) -> tuple[SuiteSpec, dict[str, Any]]:
    """Read a suite file and its base spec (as a mapping)."""
    path = Path(path)
    suite = SuiteSpec.model_validate(read_mapping(path, "suite"))
    base = read_mapping(path.parent / suite.base, "base spec") if isinstance(suite.base, str) else suite.base
    return suite, base


def run_suite(suite: SuiteSpec, base: dict[str, Any], out_dir: str | Path, *, max_steps: int | None = None,
              device: str | None = None, progress: bool = True, workers: int = 1, launcher: str = "local",
              cluster: str | None = None) -> None:
    """Train every variant and seed of ``suite`` under ``out_dir`` (skipping finished runs), then report.

    Args:
        workers: With the local launcher, runs at once, each in its own process (on its own GPU when there
            are GPUs, round robin; on CPU sharing the cores).
        launcher: ``local``, or ``slurm`` to submit every unfinished run as a job through submitit.
        cluster: submitit's cluster (``None`` detects Slurm; ``debug`` runs the jobs in this process).
    """
    if launcher not in ("local", "slurm"):
        raise SpecError(f"unknown launcher {launcher!r}; use local or slurm")
    if workers < 1:
        raise SpecError(f"workers must be a positive int, got {workers}")
    specs = variant_specs(suite, base)
    out = Path(out_dir)
    waves = _waves(specs, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUITE_FILE).write_text(json.dumps({"name": suite.name, "baseline": suite.baseline,
                                              "variants": list(specs), "seeds": suite.seeds}, indent=1))
    for wave in waves:
        pending = [(spec, run) for spec, run in wave if not run.finished]
        if launcher == "slurm":
            _submit(pending, out, suite.slurm, cluster, max_steps, device)
        elif workers > 1:
            _fan_out(pending, workers, max_steps, device)
        else:
            for spec, run in pending:
                train(spec, run.path, max_steps=max_steps, device=device, progress=progress)
    report(out)


def _waves(specs: dict[str, dict[int, ModelSpec]], out: Path) -> list[list[tuple[ModelSpec, RunDir]]]:
    """The runs in the order they can train: a variant whose ``init_from`` is ``variant:NAME`` starts from the
    model of NAME's run of the same seed, so it comes in a later wave than NAME; its ``init_from`` becomes
    that model's directory."""
    sources = {}
    for name, by_seed in specs.items():
        init = next(iter(by_seed.values())).init_from
        if init is not None and init.startswith(SUITE_SOURCE):
            sources[name] = init[len(SUITE_SOURCE):]
            if sources[name] not in specs:
                raise SpecError(f"variant {name!r}: init_from {init!r} names no variant of the suite; its "
                                f"variants: {', '.join(specs)}")
    depth: dict[str, int] = {}

    def depth_of(name: str, chain: tuple[str, ...] = ()) -> int:
        if name in chain:
            raise SpecError(f"variants start from each other in a cycle: {' -> '.join((*chain, name))}")
        if name not in depth:
            depth[name] = depth_of(sources[name], (*chain, name)) + 1 if name in sources else 0
        return depth[name]

    waves: list[list[tuple[ModelSpec, RunDir]]] = [[] for _ in range(1 + max(map(depth_of, specs), default=0))]
    for name, by_seed in specs.items():
        for seed, spec in by_seed.items():
            if name in sources:
                source = run_dir(out, sources[name], seed).model_dir.resolve()
                spec = spec.model_copy(update={"init_from": str(source)})
            waves[depth_of(name)].append((spec, run_dir(out, name, seed)))
    return waves


def _fan_out(runs: list, workers: int, max_steps: int | None, device: str | None) -> None:
    """Run ``momkit train`` for each run in up to ``workers`` processes at once."""
    gpus = torch.cuda.device_count()
    slots: queue.Queue[int] = queue.Queue()
    for slot in range(workers):
        slots.put(slot)

    def one(spec, run: RunDir) -> tuple[RunDir, subprocess.CompletedProcess]:
        run.write_spec(spec)
        slot = slots.get()
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        command = [sys.executable, "-m", "momkit", "train", str(run.spec_file), "--out", str(run.path), "--quiet"]
        command += ["--max-steps", str(max_steps)] if max_steps else []
        command += ["--device", device] if device else []
        try:
            return run, subprocess.run(command, env=env, capture_output=True, text=True)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda run: one(*run), runs))
    failed = [(run, r) for run, r in results if r.returncode]
    if failed:
        run, result = failed[0]
        raise SpecError(f"{len(failed)} run(s) failed; {run.path}: {result.stderr.strip()[-2000:]}")


def _submit(runs: list, out: Path, parameters: dict[str, Any], cluster: str | None, max_steps: int | None,
            device: str | None) -> None:
    """Submit each run as a job through submitit and wait for all of them."""
    try:
        import submitit
    except ImportError as exc:
        raise SpecError("--launcher slurm needs submitit: pip install 'momkit[slurm]'") from exc
    executor = submitit.AutoExecutor(folder=out / "slurm", cluster=cluster)
    executor.update_parameters(**parameters)
    jobs = [executor.submit(train, spec, run.path, max_steps=max_steps, device=device, progress=False)
            for spec, run in runs]
    for job in jobs:
        job.result()


def run_dir(out: Path, variant: str, seed: int) -> RunDir:
    """The run directory of ``variant`` and ``seed`` in suite directory ``out``."""
    return RunDir(out / "runs" / variant.replace("/", "_") / f"seed{seed}")


def flops_to_match(curve: list[tuple[float, float]], target: float, budget: float) -> float | None:
    """First FLOPs at which ``curve`` ``[(flops, loss)]`` reaches ``target``, as a fraction of ``budget``;
    ``None`` if it never does. Linear interpolation between points; the curve starts at ``(0, inf)``."""
    previous = (0.0, math.inf)
    for flops, loss in curve:
        if loss <= target:
            if math.isinf(previous[1]):
                return flops / budget
            fraction = (previous[1] - target) / (previous[1] - loss) if previous[1] != loss else 1.0
            return (previous[0] + fraction * (flops - previous[0])) / budget
        previous = (flops, loss)
    return None


def monotone(curve: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-increasing least-squares fit of ``curve``'s losses (isotonic regression, pooling adjacent
    violators), at the same FLOPs: a dip of evaluation noise below later values is averaged with its neighbours
    instead of counting as reached."""
    blocks: list[list[float]] = []  # [sum of losses, count]
    for _, loss in curve:
        blocks.append([loss, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fitted = [value for total, count in blocks for value in [total / count] * int(count)]
    return [(flops, value) for (flops, _), value in zip(curve, fitted)]


def curve_noise(curve: list[tuple[float, float]]) -> float | None:
    """The root mean square of the curve's departures from its :func:`monotone` fit: how far evaluation noise
    moves the seed-averaged loss (``None`` for fewer than two evaluations)."""
    if len(curve) < 2:
        return None
    fitted = monotone(curve)
    return math.sqrt(sum((a[1] - b[1]) ** 2 for a, b in zip(curve, fitted)) / len(curve))


def _aligned(curves: list[list[dict]], key: str) -> tuple[list[int], list[dict[int, dict]]]:
    """The evaluation steps every seed has for ``key``, and each seed's records by step."""
    by_step = [{r["step"]: r for r in c if key in r} for c in curves]
    return (sorted(set.intersection(*(set(s) for s in by_step))) if by_step else []), by_step


def _seed_band(curves: list[list[dict]], key: str) -> tuple[list[float], list[float]]:
    """The lowest and highest loss over the seeds at each evaluation of :func:`_mean_curve`."""
    steps, by_step = _aligned(curves, key)
    values = [[s[k][key] for s in by_step] for k in steps]
    return [min(v) for v in values], [max(v) for v in values]


def _mean_curve(curves: list[list[dict]], key: str) -> list[tuple[float, float]]:
    """Seed-averaged ``[(flops, loss)]`` over the evaluation steps every seed has."""
    steps, by_step = _aligned(curves, key)
    return [(sum(s[k]["flops"] for s in by_step) / len(by_step), sum(s[k][key] for s in by_step) / len(by_step))
            for k in steps]


def report(out_dir: str | Path) -> list[dict]:
    """Rebuild ``summary.csv``, ``summary.md`` and the plots of ``out_dir`` from its run logs."""
    out = Path(out_dir)
    if not (out / SUITE_FILE).exists():
        raise SpecError(f"{out} holds no suite (no {SUITE_FILE}); run `momkit ablate` there first")
    meta = json.loads((out / SUITE_FILE).read_text())
    curves = {v: [run_dir(out, v, s).eval_curve() for s in meta["seeds"]] for v in meta["variants"]}
    finished = {v: all(run_dir(out, v, s).finished for s in meta["seeds"]) for v in meta["variants"]}
    keys = sorted({k for cs in curves.values() for c in cs for r in c for k in r if k.startswith("loss/")})
    keys += [k for k in sorted({k for cs in curves.values() for c in cs for r in c for k in r
                                if k.startswith("bpb/")}) if _tokenizations_differ(curves, k)]
    base = meta["baseline"]
    rows = []
    for key in keys:
        metric, modality = key.split("/", 1)
        base_curve = _mean_curve(curves[base], key)
        for variant in meta["variants"]:
            finals = [c[-1][key] for c in curves[variant] if c and key in c[-1]]
            if not finals:
                continue
            mean = sum(finals) / len(finals)
            std = math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) if len(finals) > 1 else 0.0
            curve = _mean_curve(curves[variant], key)
            row = {"variant": variant, "modality": modality, "metric": metric, "loss": mean, "std": std,
                   "seeds": len(finals),
                   "finished": finished[variant], "gain": None, "flops_to_match": None,
                   "curve_noise": curve_noise(curve)}
            if base_curve:
                row["gain"] = (base_curve[-1][1] - mean) / base_curve[-1][1]
                fitted = monotone(base_curve)
                target = fitted[-1][1]
                row["flops_to_match"] = flops_to_match(monotone(curve), target, flops_to_match(fitted, target, 1.0))
            rows.append(row)
    routers = _routers(curves)
    _write_tables(out, meta, rows, routers)
    _plot(out, meta, curves, keys)
    _plot_loads(out, routers)
    return rows


def _tokenizations_differ(curves: dict, key: str) -> bool:
    """Whether the variants' tokens of ``key``'s modality cover different bytes per token (other tokenizers),
    where per-token losses do not compare and bits per byte (``key``) does: the final evaluations' ratios of bits
    per byte to loss differ."""
    loss = "loss/" + key.split("/", 1)[1]
    ratios = [c[-1][key] / c[-1][loss] for runs in curves.values() for c in runs
              if c and key in c[-1] and c[-1].get(loss)]
    return len(ratios) > 1 and max(ratios) - min(ratios) > 1e-6 * max(ratios)


def _routers(curves: dict) -> dict[str, dict]:
    """Per variant with learned experts: the expert load of its last evaluation (``{modality: [shares]}``) and
    the router-modality mutual information, averaged over its seeds."""
    routers = {}
    for variant, runs in curves.items():
        last = [c[-1] for c in runs if c and "expert_load" in c[-1]]
        if not last:
            continue
        names = list(last[0]["expert_load"])
        load = {n: [sum(r["expert_load"][n][i] for r in last) / len(last)
                    for i in range(len(last[0]["expert_load"][n]))] for n in names}
        routers[variant] = {"load": load, "mi": sum(r["router_mi"] for r in last) / len(last),
                            "share": sum(r["router_mi_share"] for r in last) / len(last)}
    return routers


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def _write_tables(out: Path, meta: dict, rows: list[dict], routers: dict[str, dict]) -> None:
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "modality", "metric", "loss", "std", "seeds", "finished",
                                               "gain", "flops_to_match", "curve_noise"])
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# {meta['name']}", "",
             f"Held-out loss after training (mean ± std over seeds {meta['seeds']}); gain over the baseline "
             f"`{meta['baseline']}`; FLOPs-to-match: the training FLOPs at which the variant first reaches the "
             f"baseline's final loss over those at which the baseline first reaches it, both curves (seed means) "
             f"fitted non-increasing first, so that noise cannot reach a loss early (`not reached` if it never "
             f"does; the baseline is 100%); curve noise: the root mean square of the seed-mean curve's "
             f"departures from that fit.", "",
             "| modality | variant | loss | gain | FLOPs-to-match | curve noise |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["metric"] == "bpb" and r is next(x for x in rows if x["metric"] == "bpb"):
            lines += ["", "## Bits per byte", "",
                      "The variants read the text through different tokenizers, so their per-token losses do not "
                      "compare: the held-out loss in bits per UTF-8 byte of the predicted tokens does, with the same "
                      "columns.", "",
                      "| modality | variant | bits per byte | gain | FLOPs-to-match | curve noise |",
                      "| --- | --- | --- | --- | --- | --- |"]
        reached = "not reached" if r["flops_to_match"] is None and r["gain"] is not None else \
            _fmt(r["flops_to_match"], "{:.1%}")
        status = "" if r["finished"] else " (unfinished)"
        lines.append(f"| {r['modality']} | {r['variant']}{status} | {r['loss']:.4f} ± {r['std']:.4f} | "
                     f"{_fmt(r['gain'], '{:+.2%}')} | {reached} | {_fmt(r['curve_noise'], '{:.2g}')} |")
    if routers:
        lines += ["", "## Learned experts", "",
                  "At the last evaluation: the mutual information between the routers' expert choice and the "
                  "token's modality (bits, and as a share of the modality entropy: 0 when the routers ignore the "
                  "modality, 1 when the expert determines it), and the expert load by modality (`plots/`).", "",
                  "| variant | router-modality MI (bits) | share of modality entropy | expert load |",
                  "| --- | --- | --- | --- |"]
        for variant, r in routers.items():
            lines.append(f"| {variant} | {r['mi']:.4f} | {r['share']:.1%} | "
                         f"`plots/expert_load_{_file_name(variant)}.png` |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _file_name(variant: str) -> str:
    return re.sub(r"[^\w.=+-]", "_", variant)


def _plot(out: Path, meta: dict, curves: dict, keys: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(exist_ok=True)
    for key in keys:
        metric, modality = key.split("/", 1)
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in meta["variants"]:
            curve = _mean_curve(curves[variant], key)
            if curve:
                style = {"linewidth": 2.5, "color": "black"} if variant == meta["baseline"] else {}
                line, = ax.plot([c[0] for c in curve], [c[1] for c in curve], marker="o", markersize=3,
                                label=variant, **style)
                low, high = _seed_band(curves[variant], key)
                if len(curves[variant]) > 1:
                    ax.fill_between([c[0] for c in curve], low, high, color=line.get_color(), alpha=0.15,
                                    linewidth=0)
        ax.set_xlabel("training FLOPs")
        ax.set_yscale("log")
        ax.set_ylabel(f"held-out {'loss' if metric == 'loss' else 'bits per byte'} ({modality}, log scale)")
        ax.set_title(f"{meta['name']}: {modality} (seed mean; band: the seeds' range)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "plots" / f"{metric}_vs_flops_{modality}.png", dpi=120)
        plt.close(fig)


def _plot_loads(out: Path, routers: dict[str, dict]) -> None:
    """One heat map per variant with experts: the share of each modality's token slots on each expert id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for variant, r in routers.items():
        names = list(r["load"])
        table = [r["load"][n] for n in names]
        fig, ax = plt.subplots(figsize=(2.4 + 0.45 * len(table[0]), 1.2 + 0.5 * len(names)))
        image = ax.imshow(table, cmap="viridis", vmin=0, aspect="auto")
        ax.set_xticks(range(len(table[0])))
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert id")
        ax.set_title(f"{variant}: expert load (MI {r['mi']:.3f} bits)", fontsize=9)
        fig.colorbar(image, ax=ax, label="share of slots")
        fig.tight_layout()
        fig.savefig(out / "plots" / f"expert_load_{_file_name(variant)}.png", dpi=120)
        plt.close(fig)
