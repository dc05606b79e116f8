"""`report_to`: every tracker receives the config, each metrics row at its step, the eval results and the
curves PNG, several at once; a missing package is a config-time error naming `report_to`.

The trackers' packages are not installed here, so recording fakes stand in for them (injected into
sys.modules); when wandb itself is installed, its offline mode is run for real.
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest

from sgsd_fast.config import REPORT_TO, TRACKER_PACKAGES, ConfigError, TrainConfig, report_to_names
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.train.metrics import MetricsLogger
from sgsd_fast.train.trackers import TRACKERS
from sgsd_fast.train.trainer import Trainer
from sgsd_fast.verify import Verifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec reads it
    mod.__dict__.update(attrs)
    return mod


class _Run:
    def __init__(self, calls, kind):
        self.calls, self.kind = calls, kind

    def log(self, data, step=None):
        self.calls.append((self.kind, "log", data, step))

    def finish(self):
        self.calls.append((self.kind, "finish"))


@pytest.fixture
def fakes(monkeypatch):
    """Recording stand-ins for wandb, trackio, mlflow and TensorBoard; returns their shared call list."""
    calls: list[tuple] = []

    def wandb_like(kind):
        return _module(kind, init=lambda **kw: calls.append((kind, "init", kw)) or _Run(calls, kind),
                       Image=lambda path: ("image", path))

    class Writer:
        def __init__(self, log_dir):
            calls.append(("tensorboard", "init", log_dir))

        def add_text(self, tag, text):
            calls.append(("tensorboard", "text", tag, text))

        def add_scalar(self, key, value, step):
            calls.append(("tensorboard", "scalar", key, value, step))

        def add_image(self, tag, array, dataformats):
            calls.append(("tensorboard", "image", tag, array.shape[-1], dataformats))

        def flush(self):
            pass

        def close(self):
            calls.append(("tensorboard", "close"))

    mlflow = _module("mlflow", set_tracking_uri=lambda uri: calls.append(("mlflow", "uri", uri)),
                     set_experiment=lambda name: None,
                     start_run=lambda run_name: calls.append(("mlflow", "start", run_name)),
                     log_params=lambda params: calls.append(("mlflow", "params", params)),
                     log_metrics=lambda metrics, step: calls.append(("mlflow", "log", metrics, step)),
                     log_artifact=lambda path: calls.append(("mlflow", "artifact", path)),
                     end_run=lambda: calls.append(("mlflow", "finish")))
    for mod in (wandb_like("wandb"), wandb_like("trackio"), mlflow, _module("tensorboard"),
                _module("torch.utils.tensorboard", SummaryWriter=Writer)):
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return calls


def test_every_tracker_has_a_class():
    assert set(TRACKERS) == set(TRACKER_PACKAGES) and set(TRACKERS) < set(REPORT_TO)


def test_a_missing_tracker_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="'report_to'.*'wandb' needs the wandb package: pip install wandb"):
        TrainConfig(report_to="wandb")
    with pytest.raises(ConfigError, match="'report_to'.*one or several of"):
        TrainConfig(report_to="neptune")
    with pytest.raises(ConfigError, match="'report_to'.*'none' alone"):
        TrainConfig(report_to="none,tensorboard")


def test_several_trackers_get_config_rows_and_the_plot(fakes, tmp_path):
    names = "wandb trackio,mlflow tensorboard"
    assert report_to_names(TrainConfig(report_to=names).report_to) == ("wandb", "trackio", "mlflow", "tensorboard")
    png = tmp_path / "training_curves.png"
    from sgsd_fast.train.metrics import plot_curves

    plot_curves([{"step": 1, "loss": 0.5, "reward": 0.5}], png)
    logger = MetricsLogger(tmp_path, report_to=names, config={"lr": 0.1, "levels": [1, 2]})
    logger.log({"step": 1, "loss": 0.5, "reward": 0.25, "flag": True})
    logger.log({"step": 1, "eval_step": 1, "eval/accuracy": 0.75})
    logger.log_image(png)
    logger.close()
    for kind in ("wandb", "trackio"):
        mine = [c for c in fakes if c[0] == kind]
        assert mine[0][2]["config"] == {"lr": 0.1, "levels": [1, 2]} and mine[0][2]["name"] == tmp_path.name
        assert mine[1:] == [(kind, "log", {"loss": 0.5, "reward": 0.25}, 1), (kind, "log", {"eval/accuracy": 0.75}, 1),
                            (kind, "log", {"training_curves": ("image", str(png))}, None), (kind, "finish")]
    ml = [c for c in fakes if c[0] == "mlflow"]
    assert ml[0][2].startswith("file://") and ml[0][2].endswith("/mlruns")  # inside the run, not the cwd
    assert ("mlflow", "params", {"lr": 0.1, "levels": "[1, 2]"}) in ml
    assert ("mlflow", "log", {"eval/accuracy": 0.75}, 1) in ml and ("mlflow", "artifact", str(png)) in ml
    tb = [c for c in fakes if c[0] == "tensorboard"]
    assert tb[1][:2] == ("tensorboard", "text") and '"lr": 0.1' in tb[1][3]
    assert ("tensorboard", "scalar", "eval/accuracy", 0.75, 1) in tb
    assert ("tensorboard", "image", "training_curves", 3, "HWC") in tb and tb[-1] == ("tensorboard", "close")


def test_a_training_run_reports_to_wandb(fakes, tmp_path):
    tok = tiny_tokenizer()
    cfg = TrainConfig(report_to="wandb", max_steps=1, prompts_per_step=2, max_new_tokens=4, num_teachers=1,
                      micro_batch_size=2, num_train_problems=4, num_eval_problems=2, output_dir=str(tmp_path / "run"),
                      progress=False, use_peft=False, optim="adamw_torch", save_every=0, verifier_workers=1)
    with Verifier(num_workers=1) as verifier, Trainer(cfg, model=tiny_random_model(tok, hidden_size=32), tokenizer=tok,
                                                      verifier=verifier) as trainer:
        trainer.train()
    mine = [c for c in fakes if c[0] == "wandb"]
    assert mine[0][2]["config"]["max_steps"] == 1
    logged = [c for c in mine if c[1] == "log"]
    assert any("eval/accuracy" in c[2] and c[3] == 0 for c in logged)  # the evaluation before training
    assert any("loss" in c[2] and c[3] == 1 for c in logged)           # step 1
    assert any("eval/accuracy" in c[2] and c[3] == 1 for c in logged)  # the evaluation after it
    assert "training_curves" in logged[-1][2] and mine[-1] == ("wandb", "finish")


def test_real_wandb_runs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, report_to="wandb", config={"lr": 0.1})
    logger.log({"step": 1, "loss": 0.5})
    logger.log({"step": 1, "eval_step": 1, "eval/accuracy": 0.75})
    logger.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
