"""Built-in experiment loggers: TensorBoard, Weights & Biases and MLflow.

Each receives every metrics record of a run (see :mod:`momkit.tracking`) with the step as its x-axis, and the
training FLOPs beside it; the spec is the run's configuration, its name, seed and suite variant its tags. A
resumed run continues the same logged run. Each library is an optional extra: a spec naming a logger whose
library is missing is refused when training starts, with the ``pip install`` that fixes it.
"""

from __future__ import annotations

import json
import os

from momkit import hookimpl
from momkit.descriptors import Logger
from momkit.errors import SpecError
from momkit.spec import flatten
from momkit.tracking import LogContext, scalars

MEGA = 1e6


def _missing(logger: str, extra: str) -> SpecError:
    return SpecError(f"train.loggers names {logger}, whose library is not installed: pip install 'momkit[{extra}]'")


class TensorBoard:
    """Event files in ``RUN/tensorboard``: every scalar against the step; and in ``RUN/tensorboard/by_mflops``
    the losses against the training FLOPs in millions (``<split>_by_mflops/...``); the spec and tags as text. On
    resume, events after the resumed point are discarded (``purge_step``)."""

    def __init__(self, context: LogContext):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        resumed = context.resume_step > 0
        root = context.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(root), purge_step=context.resume_step + 1 if resumed else None)
        self.by_flops = SummaryWriter(log_dir=str(root / "by_mflops"),
                                      purge_step=int(context.resume_flops / MEGA) + 1 if resumed else None)
        if not resumed:
            self.writer.add_text("spec", "```yaml\n" + context.spec.to_yaml() + "```")
            self.writer.add_text("tags", json.dumps(context.tags))

    def log(self, record: dict) -> None:
        step, split = record["step"], record.get("split", "train")
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, step)
            if name.startswith(f"{split}/loss"):
                self.by_flops.add_scalar(name.replace(f"{split}/", f"{split}_by_mflops/", 1), value,
                                         int(record["flops"] / MEGA))

    def close(self) -> None:
        self.writer.close()
        self.by_flops.close()


class WandB:
    """A Weights & Biases run in ``RUN/wandb`` (``WANDB_MODE=offline`` works without an account), its id fixed
    by the run directory so that a resumed run continues it; project ``$WANDB_PROJECT`` (default ``momkit``)."""

    def __init__(self, context: LogContext):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "momkit"), name=context.spec.name,
                              id=context.run_id, resume="allow", dir=str(context.run_dir), config=context.config,
                              tags=[f"{k}:{v}" for k, v in context.tags.items()], reinit="finish_previous")

    def log(self, record: dict) -> None:
        self.run.log({**scalars(record), "flops": record["flops"]}, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in the tracking store of ``$MLFLOW_TRACKING_URI`` (MLflow's default without it),
    experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``momkit``): the spec's fields as parameters, the tags,
    every scalar against the step and ``flops`` beside them. Its id is kept in ``RUN/mlflow_run_id`` so that a
    resumed run continues it."""

    def __init__(self, context: LogContext):
        try:
            import mlflow
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        self.mlflow = mlflow
        id_file = context.run_dir / "mlflow_run_id"
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "momkit"))
        if id_file.exists():
            mlflow.start_run(run_id=id_file.read_text().strip())
            return
        run = mlflow.start_run(run_name=context.spec.name, tags=context.tags)
        id_file.write_text(run.info.run_id)
        mlflow.log_params({k: str(v)[:500] for k, v in flatten(context.config).items()})

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics({**scalars(record), "flops": record["flops"]}, step=record["step"])

    def close(self) -> None:
        self.mlflow.end_run()


@hookimpl
def momkit_loggers():
    return [
        Logger(name="tensorboard", description="TensorBoard event files in RUN/tensorboard", open=TensorBoard),
        Logger(name="wandb", description="a Weights & Biases run (offline mode works without an account)",
               open=WandB),
        Logger(name="mlflow", description="an MLflow run in $MLFLOW_TRACKING_URI", open=MLflow),
    ]
