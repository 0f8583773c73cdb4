"""The directory of one training run, and every file name in it.

- ``spec.yaml``: the spec the run trains (a run of a different spec in the same directory is refused);
- ``metrics.jsonl``: one JSON object per line, ``{"split": "train" | "eval", "step", "flops", "tokens",
  "loss", "loss/<modality>", ...}``, training lines adding the learning rate and the wall-clock ``time``
  (Unix seconds), evaluation lines ``"ppl/<modality>"`` for discrete modalities;
- ``checkpoint/``: model and optimiser (``torch.distributed.checkpoint``) and ``progress.json``, the counters of
  the last saved step, replaced whole at every save;
- ``model/``: the trained model (``spec.yaml`` and ``model.safetensors``, see :meth:`momkit.Model.save`), which
  :func:`momkit.load` and a spec's ``init_from`` read, written when the run has finished all its steps, before
- ``result.json``: the final evaluation, written when the run has finished all its steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from momkit.errors import SpecError
from momkit.spec import ModelSpec


def _identity(spec: ModelSpec) -> dict:
    """The fields of ``spec`` that make the run what it is: all but ``train.loggers``."""
    data = spec.model_dump(mode="json")
    data["train"].pop("loggers")
    return data


class RunDir:
    """The files of the run in directory ``path`` (which need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def spec_file(self) -> Path:
        return self.path / "spec.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def progress_file(self) -> Path:
        """The counters saved with the checkpoint, inside :attr:`checkpoint_dir`."""
        return self.checkpoint_dir / "progress.json"

    @property
    def model_dir(self) -> Path:
        """The trained model, a model directory (:meth:`momkit.Model.save`) written when the run finishes."""
        return self.path / "model"

    @property
    def result_file(self) -> Path:
        return self.path / "result.json"

    def check_spec(self, spec: ModelSpec) -> None:
        """A ``SpecError`` if the directory holds a run of another spec (the same fields in another order, a
        field added since at its default, or other ``train.loggers``, which do not change the run, make the
        same spec)."""
        if self.spec_file.exists() and self._stored_spec() != _identity(spec):
            raise SpecError(f"{self.path} holds a run of a different spec; use another directory or remove it")

    def _stored_spec(self) -> dict | None:
        """The stored spec validated again (so a field added since, at its default, is the same spec), or
        ``None`` if it no longer validates."""
        try:
            return _identity(ModelSpec.model_validate(yaml.safe_load(self.spec_file.read_text())))
        except ValueError:
            return None

    def write_spec(self, spec: ModelSpec) -> None:
        """Create the directory and write ``spec`` into it."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.spec_file.write_text(spec.to_yaml())

    @property
    def finished(self) -> bool:
        """Whether the run has finished all its steps (its result is written)."""
        return self.result_file.exists()

    def result(self) -> dict:
        """The final evaluation of a finished run."""
        return json.loads(self.result_file.read_text())

    def write_result(self, record: dict) -> None:
        self.result_file.write_text(json.dumps(record, indent=1))

    @property
    def has_checkpoint(self) -> bool:
        return self.progress_file.exists()

    def eval_curve(self) -> list[dict]:
        """The evaluation lines of ``metrics.jsonl``, in order (none if the run has not started)."""
        if not self.metrics_file.exists():
            return []
        return [r for r in map(json.loads, self.metrics_file.read_text().splitlines()) if r["split"] == "eval"]
