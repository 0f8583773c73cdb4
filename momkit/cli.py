"""The ``momkit`` command line: ``validate``, ``plugins``, ``info``, ``train``, ``ablate``, ``report``,
``convert``, ``diff``, ``import``, ``export``, ``sample``.

The commands that read a spec (and ``ablate``) take ``KEY=VALUE`` overrides after it: dotted field paths and
YAML values, set before validation, so a bad key or value is reported like one in the file.

A user's mistake (a bad spec, a missing file, a broken plugin installation: a :class:`momkit.SpecError`)
prints what is wrong and exits with status 2, never a traceback; any other error, such as a bug in a plugin,
keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from momkit.ablate import SuiteSpec, load_suite, report, run_suite, variant_specs
from momkit.accounting import account
from momkit.errors import SpecError
from momkit.generation import SAMPLERS, Denoising
from momkit.model import SPEC_FILE, build_block, build_blocks
from momkit.pretrained import export, load
from momkit.registry import KINDS, get_registry
from momkit.sampling import sample, write
from momkit.spec import BlockSpec, ModelSpec, flatten, load_spec, read_mapping
from momkit.train import run_model, train

USAGE_ERROR = 2
INTERRUPTED = 130


def _describe(path: str, exc: ValidationError) -> str:
    lines = [f"{path}: invalid spec ({exc.error_count()} error{'s' * (exc.error_count() > 1)})"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "(top level)"
        lines.append(f"  {where}: {err['msg']}")
    return "\n".join(lines)


@contextlib.contextmanager
def _about(path: str):
    """Give a user's mistake found inside (a :class:`SpecError`) the path of the file it is about."""
    try:
        yield
    except SpecError as exc:
        raise SpecError(f"{path}: {exc}") from None


def _overrides(items: list[str]) -> dict[str, Any]:
    """``{dotted path: value}`` of command-line ``KEY=VALUE`` items, each value read as YAML."""
    overrides = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise SpecError(f"override {item!r} must be KEY=VALUE, a dotted spec field and a value, for example "
                            f"train.lr=3e-4")
        try:
            overrides[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpecError(f"override {item!r}: the value is not valid YAML ({exc.problem})") from None
    return overrides


def _is_suite(path: str, what: str = "spec") -> bool:
    """Whether the YAML file at ``path`` (the ``what`` a command asks for) is a suite, which names a ``base``
    spec, rather than a spec."""
    with _about(path):
        return "base" in read_mapping(path, what)


def _load(path: str, overrides: list[str] = ()) -> BlockSpec | ModelSpec:
    if _is_suite(path):
        raise SpecError(f"{path} is a suite (it has a `base`), not a spec; run it with `momkit ablate {path} --out "
                        f"DIR`, or check every variant with `momkit validate {path}`")
    try:
        with _about(path):
            return load_spec(path, _overrides(list(overrides)))
    except ValidationError as exc:
        raise SpecError(_describe(path, exc)) from None


def _load_suite(path: str, overrides: list[str] = ()) -> tuple[SuiteSpec, dict[str, Any]]:
    """A suite file, its base spec (a mapping) and the command line's overrides of every variant."""
    if not _is_suite(path, "suite"):
        raise SpecError(f"{path} is not a suite: a suite names its `base` spec and gives `variants` or a `grid`; "
                        f"train a model spec with `momkit train {path}`")
    try:
        with _about(path):
            suite, base = load_suite(path)
    except ValidationError as exc:
        raise SpecError(_describe(path, exc)) from None
    return suite.model_copy(update={"overrides": {**suite.overrides, **_overrides(list(overrides))}}), base


def _check_data(spec: ModelSpec) -> None:
    """The dataset plugin's check of a model spec's modalities against its data, where it has one."""
    data = spec.dataset()
    check = get_registry().get("dataset", data.kind).check
    if check is not None:
        check(data, spec.modalities)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _experts(spec: BlockSpec) -> str:
    """``; experts: w1, w2 (8, top 1)`` for a block spec with learned experts, else nothing."""
    e = spec.routing.experts
    if e is None:
        return ""
    each = " per modality" if e.per_modality else ""
    return f"; experts: {', '.join(e.sublayers)} ({e.n_experts}{each}, top {e.top_k})"


def _pattern(spec: ModelSpec) -> str:
    """The layer pattern of a spec with ``layers``: each entry's backbone and routed sublayers, and the repeats."""
    entries = spec.blocks()[:len(spec.layers)]
    runs = itertools.groupby(f"{b.backbone.kind} (routed: {', '.join(sorted(b.routed)) or 'none'}{_experts(b)})"
                             for b in entries)
    described = ", ".join(text if n == 1 else f"{n} x {text}" for text, n in ((t, len(list(g))) for t, g in runs))
    return f"pattern [{described}] x {spec.backbone.n_layers // len(entries)}"


def _summary(spec: BlockSpec | ModelSpec) -> str:
    if isinstance(spec, ModelSpec) and spec.stacked:
        with torch.device("meta"):
            blocks = build_blocks(spec)
        return (f"valid model spec {spec.name!r}, {spec.backbone.n_layers} layers, d_model {spec.backbone.d_model}, "
                f"{_pattern(spec)}; modalities {', '.join(spec.modality_names)}; scan backend {spec.scan_backend}; "
                f"{_parameters(blocks):,} parameters in the blocks")
    with torch.device("meta"):
        block = build_block(spec)
    b = spec.backbone
    routed = ", ".join(sorted(spec.routed)) or "none (dense)"
    what = f"model spec {spec.name!r}, {b.n_layers} layers of" if isinstance(spec, ModelSpec) else "block spec,"
    return (f"valid {what} {b.kind} d_model {b.d_model}; modalities {', '.join(spec.modality_names)}; "
            f"routed: {routed}{_experts(spec)}; scan backend {spec.scan_backend}; {_parameters(block):,} parameters "
            f"per block")


def cmd_validate(args: argparse.Namespace) -> int:
    if _is_suite(args.spec):
        suite, base = _load_suite(args.spec, args.overrides)
        with _about(args.spec):
            specs = variant_specs(suite, base)
            for seeds in specs.values():
                _check_data(next(iter(seeds.values())))
        print(f"{args.spec}: valid suite, {len(specs)} variants x {len(suite.seeds)} seeds, baseline "
              f"{suite.baseline!r}: {', '.join(specs)}")
        return 0
    spec = _load(args.spec, args.overrides)
    with _about(args.spec):
        if isinstance(spec, ModelSpec):
            _check_data(spec)
        summary = _summary(spec)
    print(f"{args.spec}: {summary}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    registry = get_registry()
    rows = [(kind, e.name, e.distribution, getattr(e.descriptor, "description", ""))
            for kind in KINDS for e in registry.tables[kind].values()]
    widths = [max(len(r[i]) for r in rows + [("kind", "name", "distribution", "")]) for i in range(3)]
    print(f"{'kind':<{widths[0]}}  {'name':<{widths[1]}}  {'distribution':<{widths[2]}}  description")
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    return 0


def _model_spec(path: str, overrides: list[str] = ()) -> ModelSpec:
    if Path(path).is_dir():
        path = str(Path(path) / SPEC_FILE)
    spec = _load(path, overrides)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{path}: this command needs a model spec (with `name` and `backbone.n_layers`), "
                         f"not a block spec")
    return spec


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table with right-aligned numeric columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def cmd_info(args: argparse.Namespace) -> int:
    spec = _model_spec(args.spec, args.overrides)
    with _about(args.spec):
        acc = account(spec, seq_len=args.seq_len)
    names = spec.modality_names
    layers = (f"{spec.backbone.n_layers} layers, {_pattern(spec)}," if spec.stacked else
              f"{spec.backbone.n_layers} x {spec.backbone.kind}")
    print(f"{args.spec}: {spec.name}, {layers} d_model {spec.backbone.d_model}, modalities {', '.join(names)}\n")
    rows = [[s.name, s.routing, f"{s.total:,}", f"{s.active:,}"] for s in acc.sublayers]
    rows += [[f"adapter {n}", "per modality", f"{acc.adapters[n]:,}", ""] for n in names]
    rows += [[f"head {n}", "per modality", f"{acc.heads[n]:,}", ""] for n in names]
    rows.append(["total", "", f"{acc.total:,}", ""])
    rows += [[f"active per {n} token", "", "", f"{acc.active[n]:,}"] for n in names]
    print(_table(["parameters", "", "total", "active per token"], rows))
    parts = list(next(iter(acc.training_flops.values())))
    rows = [[part, *(f"{acc.training_flops[n][part]:.4g}" for n in names)] for part in parts]
    rows.append(["total", *(f"{sum(acc.training_flops[n].values()):.4g}" for n in names)])
    print(f"\ntraining FLOPs per token (forward + backward, sequence length {args.seq_len})")
    print(_table(["part", *names], rows))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    spec = _model_spec(args.spec, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    record = train(spec, out, max_steps=args.max_steps, device=args.device, progress=not args.quiet)
    losses = ", ".join(f"{k[5:]} {v:.4f}" for k, v in record.items() if k.startswith("loss/"))
    print(f"{out}: step {record['step']}, held-out loss {losses}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    suite, base = _load_suite(args.suite, args.overrides)
    with _about(args.suite):
        run_suite(suite, base, args.out, max_steps=args.max_steps, device=args.device, workers=args.workers,
                  launcher=args.launcher)
    print((Path(args.out) / "summary.md").read_text())
    print(f"tables and plots in {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    spec = _model_spec(args.spec)
    kind = spec.dataset().kind
    registry = get_registry()
    dataset = registry.get("dataset", kind)
    if dataset.convert is None:
        able = [name for name, d in registry.datasets.items() if d.convert is not None]
        raise SpecError(f"{args.spec}: dataset {kind!r} has no converter; datasets with one: {able or 'none'}")
    try:
        out = dataset.convert(args.input, args.out, spec.modalities, source=args.source, columns=args.columns,
                              on_error=args.on_error, batch_size=args.batch_size, device=args.device,
                              split=args.split, glob=args.glob, images=args.images)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last finished batch", file=sys.stderr)
        return INTERRUPTED
    header = json.loads((out / "header.json").read_text())
    skipped = sum(header.get("skipped", {}).values())
    print(f"{args.input} -> {out}: {header['documents']} documents, {header['positions']} positions"
          + (f", {skipped} bad items skipped (listed in {out / 'skipped.jsonl'})" if skipped else ""))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    model = load(args.source, _model_spec(args.spec) if args.spec else None)
    model.save(args.out)
    how = f"upcycled into {args.spec}" if args.spec else "imported"
    print(f"{args.source} -> {args.out}: {how}, {model.spec.backbone.n_layers} x {model.spec.backbone.kind}, "
          f"modalities {', '.join(model.spec.modality_names)}, {_parameters(model):,} parameters")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if not (Path(args.dir) / SPEC_FILE).is_file():
        raise SpecError(f"{args.dir} is not a momkit model directory (no {SPEC_FILE}); make one with momkit import "
                        f"or take a finished run's model/ directory")
    with _about(args.dir):
        export(load(args.dir), args.out, to=args.to)
    print(f"{args.dir} -> {args.out} ({args.to})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    model = run_model(args.dir) if (Path(args.dir) / "metrics.jsonl").is_file() else load(args.dir)
    if args.device:
        model.to(args.device)
    samples = sample(model, args.prompt, per_prompt=args.per_prompt, modality=args.modality, count=args.count,
                     temperature=args.temperature, seed=args.seed,
                     denoising=Denoising(steps=args.steps, sampler=args.sampler, guidance=args.guidance))
    for path in write(samples, args.out or Path(args.dir) / "samples"):
        print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report(args.dir)
    print((Path(args.dir) / "summary.md").read_text())
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


_ABSENT = object()


def _shown(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = (flatten(_load(path).model_dump(mode="json")) for path in (args.a, args.b))
    differ = [key for key in dict.fromkeys([*a, *b]) if a.get(key, _ABSENT) != b.get(key, _ABSENT)]
    if not differ:
        print(f"{args.a} and {args.b} are the same spec")
    for key in differ:
        print(f"{key}: {_shown(a.get(key, _ABSENT))} -> {_shown(b.get(key, _ABSENT))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="momkit", description="Modality-routed sequence models.")
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"nargs": "*", "metavar": "KEY=VALUE",
                 "help": "set spec fields before validation, e.g. train.lr=3e-4 backbone.d_model=512"}
    p = sub.add_parser("validate", help="check a spec, or every variant of a suite, against the installed plugins")
    p.add_argument("spec", help="path of a YAML spec or suite")
    p.add_argument("overrides", **overrides)
    p.set_defaults(run=cmd_validate)
    p = sub.add_parser("plugins", help="list every registered name and the distribution providing it")
    p.set_defaults(run=cmd_plugins)
    p = sub.add_parser("info", help="parameters (total, active per token) and training FLOPs per token of a "
                                    "model spec or model directory, by sublayer and modality")
    p.add_argument("spec", help="path of a YAML model spec, or a model directory")
    p.add_argument("overrides", **overrides)
    p.add_argument("--seq-len", type=_positive, default=2048, help="sequence length for attention FLOPs "
                                                                   "(default 2048)")
    p.set_defaults(run=cmd_info)
    p = sub.add_parser("train", help="train a model spec on its data (resumes an interrupted run)")
    p.add_argument("spec", help="path of a YAML model spec")
    p.add_argument("overrides", **overrides)
    p.add_argument("--out", help="run directory (default runs/<spec name>)")
    p.add_argument("--max-steps", type=_positive, help="stop after this many steps")
    p.add_argument("--device", help="override train.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_train)
    p = sub.add_parser("ablate", help="train every variant x seed of a suite, then write tables and plots")
    p.add_argument("suite", help="path of a YAML suite")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="set spec fields of every variant, after the suite's own overrides, e.g. train.steps=50")
    p.add_argument("--out", required=True, help="suite directory (re-running resumes and skips finished runs)")
    p.add_argument("--max-steps", type=_positive, help="stop each run after this many steps")
    p.add_argument("--device", help="override train.device of every run")
    p.add_argument("--workers", type=_positive, default=1, help="runs at once, each in its own process and, "
                                                                "with GPUs, on its own GPU (default 1)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local processes, or one Slurm job per run through submitit (pip install "
                        "'momkit[slurm]'); the suite's `slurm` mapping sets the jobs' parameters")
    p.set_defaults(run=cmd_ablate)
    p = sub.add_parser("convert", help="convert raw or pre-tokenized documents into the spec's dataset format "
                                       "(jsonl: memory-mapped shards), through each modality's encoder")
    p.add_argument("spec", help="path of the YAML model spec whose data.kind and modalities (with encoders) apply")
    p.add_argument("input", help="input: a JSON-lines file, a text file or folder, an image-caption or audio "
                                 "folder, COCO annotations, WebDataset tar shards, parquet files or a hub dataset")
    p.add_argument("out", help="output directory (an interrupted conversion resumes when run again)")
    p.add_argument("--source", help="how to read the input: jsonl, text, hf, captions, coco, audio, webdataset "
                                    "(default: guessed from it)")
    p.add_argument("--columns", help="FIELD=MODALITY,... in document order, e.g. caption=text,image=image "
                                     "(default: each field to the modality whose encoder reads its kind)")
    p.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="at a bad item (unreadable image, empty text, id out of range): stop and name it, or "
                        "skip it, counted and listed in skipped.jsonl")
    p.add_argument("--batch-size", type=_positive, default=64, help="records encoded at once (default 64): "
                                                                     "bounds the memory held")
    p.add_argument("--device", default="auto", help="where encoders run: auto (CUDA if available), cpu, cuda")
    p.add_argument("--split", help="split of a Hugging Face dataset (default train)")
    p.add_argument("--glob", help="files of a text folder (default **/*.txt)")
    p.add_argument("--images", help="image folder of COCO annotations (default: beside the annotations file)")
    p.set_defaults(run=cmd_convert)
    p = sub.add_parser("import", help="read a pretrained model (momkit or transformers or mamba_ssm checkpoint "
                                      "directory, or hub id), optionally upcycle it into a spec, and save it as a "
                                      "momkit model directory")
    p.add_argument("source", help="checkpoint directory or hub id")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--spec", help="YAML model spec to upcycle into (its routed copies start as the dense weights)")
    p.set_defaults(run=cmd_import)
    p = sub.add_parser("export", help="write a dense momkit model directory as a checkpoint of another library")
    p.add_argument("dir", help="momkit model directory (momkit import, or a finished run's model/)")
    p.add_argument("--to", choices=["transformers"], default="transformers", help="target library")
    p.add_argument("--out", required=True, help="directory to write")
    p.set_defaults(run=cmd_export)
    p = sub.add_parser("sample", help="draw images (or another modality) after text prompts with a trained model")
    p.add_argument("dir", help="a run directory (its model, or while it trains its last checkpoint), or a model "
                               "directory")
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    p.add_argument("--per-prompt", type=_positive, default=4, help="samples of each prompt (a row of the grid)")
    p.add_argument("--modality", help="modality to sample (default: the one the spec's dataset draws as images)")
    p.add_argument("--count", type=_positive, help="positions of one sample (default: the decoder's image)")
    p.add_argument("--steps", type=_positive, default=50, help="denoising steps of a continuous modality")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="diffusion sampler")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of discrete tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the sampled tokens")
    p.add_argument("--device", help="device to sample on (cpu, cuda, cuda:N)")
    p.add_argument("--out", help="output directory (default DIR/samples)")
    p.set_defaults(run=cmd_sample)
    p = sub.add_parser("report", help="rebuild a suite directory's tables and plots from its run logs")
    p.add_argument("dir", help="suite directory written by momkit ablate")
    p.set_defaults(run=cmd_report)
    p = sub.add_parser("diff", help="list the fields in which two specs differ (defaults filled in)")
    p.add_argument("a", help="path of a YAML spec")
    p.add_argument("b", help="path of another YAML spec")
    p.set_defaults(run=cmd_diff)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments. ``KEY=VALUE`` overrides may also follow the options (argparse alone takes
    a command's positional list only before them); anything else left over is an error."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return args.run(args)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and the last checkpoint are kept; run the same command again to "
              "resume", file=sys.stderr)
        return INTERRUPTED
