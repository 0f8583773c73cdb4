"""Experiment loggers: the run's metrics, as ``metrics.jsonl`` receives them, sent to the loggers a spec's
``train.loggers`` names (registered through the ``momkit_loggers`` hook: TensorBoard, Weights & Biases and
MLflow are built in).

Each logger is opened once per run with a :class:`LogContext` and receives every metrics record after it is
written to ``metrics.jsonl``; :func:`scalars` flattens a record into the named numbers loggers plot.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from momkit.registry import get_registry
from momkit.spec import ModelSpec, flatten

NOT_SCALARS = ("split", "step", "time")


@dataclass
class LogContext:
    """What a logger knows of the run it logs.

    Attributes:
        run_dir: The run directory (loggers keep their files under it, ``RUN/<logger>/``).
        spec: The run's model spec.
        config: The spec as plain data, the run's configuration.
        tags: ``{"name", "seed"}``, and ``"variant"`` for a run of a suite (whose runs are named
            ``<variant>/seed<k>``).
        run_id: A stable id of the run directory, for loggers that resume a run by id.
        resume_step: The step the run continues from (0 for a fresh run); records of later steps logged
            before an interruption come again.
        resume_flops: The training FLOPs at ``resume_step``.
    """

    run_dir: Path
    spec: ModelSpec
    config: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    resume_step: int = 0
    resume_flops: float = 0.0

    @classmethod
    def of(cls, run_dir: Path, spec: ModelSpec, resume_step: int, resume_flops: float = 0.0) -> LogContext:
        tags = {"name": spec.name, "seed": str(spec.train.seed)}
        variant, _, seed = spec.name.rpartition("/")
        if variant and seed == f"seed{spec.train.seed}":
            tags["variant"] = variant
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        return cls(Path(run_dir), spec, spec.model_dump(mode="json"), tags, run_id, resume_step, resume_flops)


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a metrics record, nested mappings and lists flattened into ``a/b/0`` names, each under
    the record's split (``train/loss/text``, ``eval/expert_load/image/3``)."""
    split = record.get("split", "train")
    flat = flatten({key: value for key, value in record.items() if key not in NOT_SCALARS})
    return {f"{split}/{name.replace('.', '/')}": float(value) for name, value in flat.items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool)}


class Loggers:
    """The loggers of one run, opened together; :meth:`log` sends a record to each, :meth:`close` ends them."""

    def __init__(self, names: list[str], context: LogContext):
        registry = get_registry()
        self.sinks = []
        try:
            for name in names:
                self.sinks.append(registry.get("logger", name).open(context))
        except BaseException:
            self.close()
            raise

    def log(self, record: dict) -> None:
        for sink in self.sinks:
            sink.log(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []
