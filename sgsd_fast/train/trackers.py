"""Experiment trackers behind `report_to`: TensorBoard, Weights & Biases, Trackio, MLflow, several at once.

Each tracker receives the same four things, the ones the HF Trainer's callbacks send: the run's
config once, every metrics row (training rows at their step, evaluation rows at their eval step),
the curves PNG at the end, and a close. They are thin on purpose: each library's own environment
variables keep their meaning (``WANDB_MODE=offline`` runs Weights & Biases without a network,
``WANDB_PROJECT``, ``TRACKIO_PROJECT``, ``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME``), and
the run is named after the run directory. Without a tracking URI, MLflow writes to
``<run_dir>/mlruns`` rather than the current directory.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sgsd_fast.config import missing_tracker, report_to_names

DEFAULT_PROJECT = "sgsd-fast"


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "eval_step")}


def _step(row: dict[str, Any]) -> int:
    return int(row.get("eval_step", row.get("step", 0)))


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, row: dict[str, Any]) -> None:
        for key, value in _scalars(row).items():
            self.writer.add_scalar(key, value, _step(row))
        self.writer.flush()

    def log_image(self, name: str, path: Path) -> None:
        import matplotlib.image

        self.writer.add_image(name, matplotlib.image.imread(path)[..., :3], dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """wandb.init / log / Image / finish (offline with WANDB_MODE=offline: files under run_dir/wandb)."""

    module = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import importlib

        self.lib = importlib.import_module(self.module)
        self.run = self._init(run_dir, config)

    def _init(self, run_dir: Path, config: dict[str, Any]) -> Any:
        return self.lib.init(project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT), name=run_dir.name,
                             dir=str(run_dir), config=config)

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(_scalars(row), step=_step(row))

    def log_image(self, name: str, path: Path) -> None:
        self.run.log({name: self.lib.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(WandbTracker):
    """Trackio mirrors the wandb API (init / log / Image / finish) and stores runs locally by default."""

    module = "trackio"

    def _init(self, run_dir: Path, config: dict[str, Any]) -> Any:
        return self.lib.init(project=os.environ.get("TRACKIO_PROJECT", DEFAULT_PROJECT), name=run_dir.name,
                             config=config)


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import mlflow

        self.lib = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        if os.environ.get("MLFLOW_EXPERIMENT_NAME") is None:
            mlflow.set_experiment(DEFAULT_PROJECT)
        self.run = mlflow.start_run(run_name=run_dir.name)
        mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in config.items()})

    def log(self, row: dict[str, Any]) -> None:
        self.lib.log_metrics(_scalars(row), step=_step(row))

    def log_image(self, name: str, path: Path) -> None:
        self.lib.log_artifact(str(path))

    def close(self) -> None:
        self.lib.end_run()


#: One class per name of config.TRACKER_PACKAGES (a test keeps the two in step).
TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
            "mlflow": MlflowTracker}


def open_trackers(report_to: str, run_dir: str | os.PathLike, config: dict[str, Any]) -> list[Any]:
    """The trackers `report_to` names (as validated by TrainConfig), started with the run's config."""
    names = report_to_names(report_to)
    for name in names:
        if (hint := missing_tracker(name)) is not None:
            raise ImportError(f"report_to: {hint}; or use report_to='none'")
    return [TRACKERS[name](Path(run_dir), config) for name in names]
