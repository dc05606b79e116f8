"""Run logging: metrics.jsonl (always), the `report_to` trackers (`trackers`), and a PNG plot of the curves.

metrics.jsonl holds one JSON object per line: training rows carry ``"step"`` and eval rows carry
``"eval_step"`` as well; both are flat dicts of numbers so `pandas.read_json(lines=True)` or `jq`
read them directly.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sgsd_fast.train.trackers import open_trackers

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_curves.png"


def _jsonable(value: Any) -> Any:
    # NaN/inf are not JSON; write them as null (a skipped step's loss is NaN by design).
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends rows to `run_dir/metrics.jsonl` and forwards them to the `report_to` trackers."""

    def __init__(self, run_dir: str | os.PathLike, *, report_to: str = "auto",
                 config: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.trackers = open_trackers(report_to, run_dir, config or {})

    def rewrite(self, rows: Iterable[dict[str, Any]]) -> None:
        """Replace the file's contents (on resume: drop rows logged after the restored checkpoint)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w") as fh:
            for row in rows:
                fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")
        for tracker in self.trackers:
            tracker.log(row)

    def log_image(self, path: str | os.PathLike) -> None:
        """Send a picture (the curves PNG at the end of a run) to the trackers, named after the file."""
        for tracker in self.trackers:
            tracker.log_image(Path(path).stem, Path(path))

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def plot_curves(rows: list[dict[str, Any]], out_path: str | os.PathLike) -> Path:
    """Reward, loss and eval accuracy against the step, as one PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if "eval_step" not in r]
    evals = [r for r in rows if "eval_step" in r]

    def series(data: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
        pts = [(r[x], r[y]) for r in data if r.get(y) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    xs, ys = series(train, "step", "reward")
    axes[0].plot(xs, ys, marker=".", label="reward (success rate)")
    xs, ys = series(train, "step", "format_rate")
    if xs:
        axes[0].plot(xs, ys, marker=".", alpha=0.6, label="answer stated (format rate)")
    axes[0].set(title="rollouts", xlabel="step", ylim=(-0.05, 1.05))
    xs, ys = series(train, "step", "loss")
    axes[1].plot(xs, ys, marker=".", color="tab:red")
    axes[1].set(title="loss", xlabel="step")
    for key, label in (("eval/accuracy", "greedy accuracy"), ("eval/avg_at_k", "avg@k"),
                       ("eval/format_rate", "format rate")):
        xs, ys = series(evals, "eval_step", key)
        if xs:
            axes[2].plot(xs, ys, marker="o", label=label)
    axes[2].set(title="held-out evaluation", xlabel="step", ylim=(-0.05, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
