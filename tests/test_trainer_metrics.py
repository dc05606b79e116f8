"""metrics.jsonl rows, the optional TensorBoard sink, and the PNG plot."""
from __future__ import annotations

import importlib.util

import pytest

from sgsd_fast.train.metrics import MetricsLogger, plot_curves, read_metrics


def test_rows_round_trip_and_rewrite(tmp_path):
    log = MetricsLogger(tmp_path, report_to="none")
    log.log({"step": 1, "loss": float("nan"), "reward": 0.5})
    log.log({"step": 2, "loss": 0.25, "reward": 1.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 1, "loss": None, "reward": 0.5}, {"step": 2, "loss": 0.25, "reward": 1.0}]
    log.rewrite(rows[:1])  # what a resume does with rows after its checkpoint
    assert read_metrics(tmp_path / "metrics.jsonl") == rows[:1]
    log.close()


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_tensorboard_requested_but_missing_is_a_clear_error(tmp_path):
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLogger(tmp_path, report_to="tensorboard")
    MetricsLogger(tmp_path, report_to="auto").close()  # auto quietly skips it


def test_plot_has_all_panels(tmp_path):
    rows = [{"step": s, "loss": 0.1 * s, "reward": s / 4, "format_rate": 0.5} for s in range(1, 5)]
    rows += [{"step": 0, "eval_step": 0, "eval/accuracy": 0.1, "eval/format_rate": 0.4},
             {"step": 4, "eval_step": 4, "eval/accuracy": 0.3, "eval/format_rate": 0.6}]
    out = plot_curves(rows, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
