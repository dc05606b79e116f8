"""Trainer runs that meet bad inputs or faults: every check that needs no model happens before the
model loads, a broken log line or a full disk never costs the run, and a diverged run stops."""
from __future__ import annotations

import errno
import sqlite3

import pytest
import torch
from test_trainer import bank_file, make_cfg, new_model  # noqa: F401  (bank_file is a fixture)

from sgsd_fast.config import ConfigError
from sgsd_fast.models import tiny_tokenizer
from sgsd_fast.skills import SkillBank
from sgsd_fast.train import checkpoint as ckpt_module
from sgsd_fast.train.objectives import sgsd as sgsd_objective
from sgsd_fast.train import trainer as trainer_module
from sgsd_fast.train.checkpoint import CheckpointSaveError, list_checkpoints
from sgsd_fast.train.metrics import read_metrics
from sgsd_fast.train.trainer import Trainer, TrainingDiverged
from sgsd_fast.verify import Verifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def verifier():
    with Verifier(num_workers=1, timeout_s=10.0) as v:
        yield v


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def no_model(monkeypatch):
    """Fail the test if the trainer gets as far as building the model."""
    def fail(cfg):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(trainer_module, "build_model", fail)


def run_train(cfg, tok, verifier, **kw):
    log = []
    with Trainer(cfg, model=new_model(tok), tokenizer=tok, verifier=verifier, log=log.append, **kw) as trainer:
        summary = trainer.train()
    return summary, log


def test_truncated_completions_line_does_not_block_resume(tmp_path, bank_file, tok, verifier):  # noqa: F811
    cfg = make_cfg(tmp_path / "run", bank_file, max_steps=2, eval_at_start=False)
    summary, _ = run_train(cfg, tok, verifier)
    completions = tmp_path / "run" / "completions.jsonl"
    good = completions.read_text()
    with completions.open("ab") as fh:  # a step-3 append cut off by a kill, then bytes that are not UTF-8
        fh.write(b'{"step": 3, "problem_id": "x", "compl\n\xff\xfe{"step"\n')
    resumed = make_cfg(tmp_path / "run", bank_file, max_steps=3, eval_at_start=False)
    summary, log = run_train(resumed, tok, verifier, resume=summary["checkpoint"])
    assert summary["steps"] == 3
    warning = [line for line in log if "undecodable" in line]
    assert len(warning) == 1 and str(completions) in warning[0] and "dropped 2" in warning[0]
    lines = completions.read_text().splitlines()
    assert completions.read_text().startswith(good) and len(lines) == len(good.splitlines()) + 1


@pytest.mark.usefixtures("no_model")
def test_empty_eval_dataset_fails_before_the_model_loads(tmp_path, bank_file):  # noqa: F811
    empty = tmp_path / "eval.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"config field 'eval_dataset': .*eval.jsonl' gave no evaluation problems"):
        Trainer(make_cfg(tmp_path / "run", bank_file, eval_dataset=str(empty)))


@pytest.mark.usefixtures("no_model")
def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path, bank_file):  # noqa: F811
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=r"'output_dir': .*a-file/run' is not a writable directory"):
        Trainer(make_cfg(blocker / "run", bank_file))


@pytest.mark.usefixtures("no_model")
def test_unusable_skill_banks_fail_before_the_model_loads(tmp_path):
    foreign = tmp_path / "other.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (x)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match=r"other.db' is not an sgsd-fast skill bank"):
        Trainer(make_cfg(tmp_path / "run", foreign))
    empty = tmp_path / "empty.db"
    SkillBank(empty).close()
    with pytest.raises(ValueError, match=r"empty.db' holds no skills and no mistakes"):
        Trainer(make_cfg(tmp_path / "run", empty))


def test_resume_with_a_changed_method_fails_before_the_model_loads(tmp_path, bank_file, tok, verifier,  # noqa: F811
                                                                   monkeypatch):
    summary, _ = run_train(make_cfg(tmp_path / "run", bank_file, max_steps=1, eval_at_start=False), tok, verifier)
    monkeypatch.setattr(trainer_module, "build_model", None)  # any use would raise
    cfg = make_cfg(tmp_path / "run", bank_file, max_steps=2, method="opsd")
    with pytest.raises(ConfigError, match=r"different settings .*: method 'sgsd' -> 'opsd'"):
        Trainer(cfg, resume=summary["checkpoint"])


def test_consecutive_skipped_steps_stop_the_run_without_saving(tmp_path, bank_file, tok, verifier,  # noqa: F811
                                                               monkeypatch):
    real_loss = sgsd_objective.sgsd_loss

    def nan_loss(*args, **kwargs):
        loss, metrics = real_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(sgsd_objective, "sgsd_loss", nan_loss)
    cfg = make_cfg(tmp_path / "run", bank_file, max_steps=5, save_every=1, eval_at_start=False,
                   max_consecutive_skipped_steps=2)
    with pytest.raises(TrainingDiverged, match=r"step 2: the last 2 steps were all skipped .*"
                                               r"'max_consecutive_skipped_steps'.*learning_rate"):
        run_train(cfg, tok, verifier)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-1"]  # unchanged weights only
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_step" not in r]
    assert [r["skipped"] for r in rows] == [1, 1]


def test_non_finite_weights_are_never_saved(tmp_path, bank_file, tok, verifier):  # noqa: F811
    cfg = make_cfg(tmp_path / "run", bank_file, eval_at_start=False)
    with Trainer(cfg, model=new_model(tok), tokenizer=tok, verifier=verifier, log=lambda s: None) as trainer:
        with torch.no_grad():
            next(trainer.model.parameters())[0] = float("inf")
        with pytest.raises(TrainingDiverged, match="inf/NaN"):
            trainer._save(1)
    assert not list((tmp_path / "run").glob("*checkpoint*"))


def test_disk_full_at_the_final_save_keeps_the_previous_checkpoint(tmp_path, bank_file, tok, verifier,  # noqa: F811
                                                                   monkeypatch):
    real_save = torch.save

    def full_at_step_two(obj, path, *args, **kwargs):
        if ".checkpoint-2." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt_module.torch, "save", full_at_step_two)
    cfg = make_cfg(tmp_path / "run", bank_file, max_steps=2, save_every=1, eval_at_start=False)
    with pytest.raises(CheckpointSaveError, match=r"checkpoint-2' failed .*No space left.*disk full\?.*checkpoint-1"):
        run_train(cfg, tok, verifier)
    assert [p.name for p in (tmp_path / "run").iterdir() if "checkpoint" in p.name] == ["checkpoint-1"]


def test_stale_save_folders_are_cleaned_when_a_run_starts(tmp_path, bank_file, tok, verifier):  # noqa: F811
    stale = tmp_path / "run" / ".checkpoint-7.tmp-999999999"
    stale.mkdir(parents=True)
    log = []
    with Trainer(make_cfg(tmp_path / "run", bank_file), model=new_model(tok), tokenizer=tok, verifier=verifier,
                 log=log.append):
        pass
    assert not stale.exists() and any(str(stale) in line for line in log)
