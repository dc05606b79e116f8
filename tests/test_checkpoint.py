"""Checkpoint robustness: failed saves clean up, stale temporary folders are removed, resume checks
every file and the config, and `--resume auto` falls back to the newest complete checkpoint."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sgsd_fast.config import ConfigError, TrainConfig
from sgsd_fast.models import tiny_random_model, tiny_tokenizer
from sgsd_fast.skills import SkillBank, starter_bank_path
from sgsd_fast.train import checkpoint as ckpt_module
from sgsd_fast.train.checkpoint import (CheckpointSaveError, check_resume, checkpoint_problem, clean_stale_saves,
                                        list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_random_model(tok, hidden_size=16, layers=1, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()  # a non-empty optimizer state, as in a real checkpoint
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    bank = tmp_path_factory.mktemp("bank") / "bank.db"
    with SkillBank(bank) as b:
        b.import_json(starter_bank_path())
    return {"model": model, "tokenizer": tok, "optimizer": optimizer, "scheduler": scheduler, "bank_path": bank}


CFG = TrainConfig(report_to="none", method="sgsd", optim="adamw_torch")


def save(run: Path, step: int, parts, cfg: TrainConfig = CFG, **kw) -> Path:
    return save_checkpoint(run, step, trainer_state={"history": []}, config_yaml=cfg.to_yaml(), **parts, **kw)


@pytest.fixture()
def run(tmp_path, parts):
    """A run folder with two complete checkpoints (steps 1 and 2)."""
    folder = tmp_path / "run"
    save(folder, 1, parts)
    save(folder, 2, parts)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- saving --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["torch.save", "os.replace"])
def test_failed_save_cleans_up_and_keeps_the_previous_checkpoint(run, parts, monkeypatch, target):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "torch.save":
        monkeypatch.setattr(ckpt_module.torch, "save", disk_full)
    else:
        monkeypatch.setattr(ckpt_module.os, "replace", disk_full)
    with pytest.raises(CheckpointSaveError) as info:
        save(run, 3, parts)
    message = str(info.value)
    assert "disk full?" in message and "No space left on device" in message and "checkpoint-2" in message
    assert len(message.splitlines()) == 1 and isinstance(info.value, OSError)
    assert leftovers(run) == []  # the partial .checkpoint-3.tmp-PID folder is gone
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]
    assert checkpoint_problem(run / "checkpoint-2") is None


def test_torch_enospc_runtime_error_is_one_line(tmp_path, parts, monkeypatch):
    def enforce_fail(*args, **kwargs):  # what torch.save raises on a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0\nframe #0: ...")

    monkeypatch.setattr(ckpt_module.torch, "save", enforce_fail)
    with pytest.raises(CheckpointSaveError, match=r"inline_container.cc:672.*disk full\? .*no earlier checkpoint"):
        save(tmp_path, 1, parts)
    assert list(tmp_path.iterdir()) == []


def test_failed_swap_of_a_same_step_checkpoint_puts_the_old_one_back(run, parts, monkeypatch):
    real_replace = os.replace
    calls = []

    def second_replace_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_module.os, "replace", second_replace_fails)
    with pytest.raises(CheckpointSaveError):
        save(run, 2, parts)
    assert leftovers(run) == [] and checkpoint_problem(run / "checkpoint-2") is None


def test_stale_save_folders_of_dead_processes_are_cleaned(run, parts):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    live = str(os.getppid())
    (run / f".checkpoint-3.tmp-{dead}").mkdir()
    (run / f".checkpoint-3.tmp-{dead}" / "optimizer.pt").write_bytes(b"x" * 100)
    (run / f".checkpoint-4.tmp-{live}").mkdir()  # a save still running in another process
    os.replace(run / "checkpoint-2", run / f".checkpoint-2.old-{dead}")  # killed between the two renames
    messages = clean_stale_saves(run)
    assert len(messages) == 2 and any("restored" in m and "checkpoint-2" in m for m in messages)
    assert leftovers(run) == [f".checkpoint-4.tmp-{live}"]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-1", "checkpoint-2"]


# -- resume: files ---------------------------------------------------------------------------------


def truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


DAMAGE = {
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt: truncated"),
    "truncated weights": (lambda c: truncate(c / "model" / "model.safetensors"), "model.safetensors: safetensors"),
    "garbage weights": (lambda c: (c / "model" / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "no weights": (lambda c: (c / "model" / "model.safetensors").unlink(), "no .safetensors weights"),
    "empty config.yaml": (lambda c: (c / "config.yaml").write_text(""), "config.yaml' is empty"),
    "bad config.yaml": (lambda c: (c / "config.yaml").write_text("method: [sgsd\n"), "is not valid YAML"),
    "bad trainer state": (lambda c: (c / "trainer_state.json").write_text('{"step": 2,'), "not valid JSON"),
    "truncated bank": (lambda c: truncate(c / "skill_bank.db", 0.3), "truncated SQLite database"),
    "missing scheduler": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt: missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_auto_falls_back_to_the_newest_usable_checkpoint(run, damage):
    hurt, fragment = DAMAGE[damage]
    hurt(run / "checkpoint-2")
    assert fragment in checkpoint_problem(run / "checkpoint-2")
    messages = []
    assert resolve_resume("auto", str(run), log=messages.append) == run / "checkpoint-1"
    assert len(messages) == 1 and "checkpoint-1 is the newest usable" in messages[0] and fragment in messages[0]
    with pytest.raises(ValueError, match=fr"checkpoint .*checkpoint-2.* is unusable: .*{fragment[:12]}"):
        resolve_resume(str(run / "checkpoint-2"), None)  # named explicitly: no silent substitute


def test_resume_auto_with_no_usable_checkpoint_names_them_all(run):
    truncate(run / "checkpoint-1" / "optimizer.pt")
    (run / "checkpoint-2" / "config.yaml").write_text("")
    with pytest.raises(ValueError, match=r"no usable checkpoint .*checkpoint-2 .*checkpoint-1 "):
        resolve_resume("auto", str(run))


def test_resume_auto_without_output_dir_says_which_run_it_picked(tmp_path, parts):
    save(tmp_path / "runs" / "a", 1, parts)
    messages = []
    assert resolve_resume("auto", None, runs_root=tmp_path / "runs", log=messages.append).parent.name == "a"
    assert "no output_dir given" in messages[0] and str(tmp_path / "runs" / "a") in messages[0]


def test_data_damage_inside_a_file_is_named_on_load(run, parts):
    path = run / "checkpoint-2" / "optimizer.pt"
    data = bytearray(path.read_bytes())
    data[60:400] = b"\x00" * 340  # the zip directory at the end is intact, the pickle is not
    path.write_bytes(bytes(data))
    assert checkpoint_problem(run / "checkpoint-2") is None  # structure only: cheap
    with pytest.raises(ValueError, match="checkpoint file .*optimizer.pt' cannot be loaded"):
        load_checkpoint(run / "checkpoint-2", model=parts["model"], optimizer=parts["optimizer"],
                        scheduler=parts["scheduler"])


def test_checkpoint_bank_copy_is_one_self_contained_file(run):
    bank = run / "checkpoint-2" / "skill_bank.db"
    assert bank.read_bytes()[18:20] == b"\x01\x01"  # rollback journal, not WAL
    with SkillBank(bank, read_only=True) as b:
        assert b.count() == 20
    assert sorted(p.name for p in bank.parent.iterdir() if p.name.startswith("skill_bank")) == ["skill_bank.db"]


# -- resume: config ------------------------------------------------------------------------------


def test_resume_refuses_changed_structural_fields(run):
    for changed, names in (({"method": "opsd", "teacher_params": "frozen"}, ["method 'sgsd' -> 'opsd'"]),
                           ({"optim": "adamw_8bit"}, ["optim 'adamw_torch' -> 'adamw_8bit'"]),
                           ({"use_peft": False, "lora_r": 4}, ["use_peft True -> False", "lora_r 16 -> 4"]),
                           ({"model": "some/other-model"}, ["model 'smollm2' -> 'some/other-model'"])):
        cfg = TrainConfig(**{**CFG.to_dict(), **changed})
        with pytest.raises(ConfigError) as info:
            check_resume(run / "checkpoint-2", cfg)
        assert all(n in str(info.value) for n in names) and len(str(info.value).splitlines()) == 1


def test_resume_allows_harmless_fields_and_reports_the_others(run, tmp_path):
    harmless = TrainConfig(**{**CFG.to_dict(), "max_steps": 99, "output_dir": str(tmp_path), "progress": False})
    assert check_resume(run / "checkpoint-2", harmless) == []
    tuned = TrainConfig(**{**CFG.to_dict(), "learning_rate": 2e-4})
    (notice,) = check_resume(run / "checkpoint-2", tuned)
    assert "learning_rate 0.0001 -> 0.0002" in notice and "differ from an uninterrupted run" in notice


def test_locked_and_free_fields_are_config_fields():
    names = set(TrainConfig().to_dict())
    assert set(ckpt_module.RESUME_LOCKED) <= names and set(ckpt_module.RESUME_FREE) <= names
    assert not set(ckpt_module.RESUME_LOCKED) & set(ckpt_module.RESUME_FREE)


def test_saved_state_is_json(run):
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["step"] == 2


def test_final_model_copy_is_atomic_per_file_and_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import shutil

    ckpt = tmp_path / "run" / "checkpoint-3"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "config.json").write_text("{}")
    (ckpt / "model" / "model.safetensors").write_bytes(b"w" * 1000)
    assert ckpt_module.publish_final_model(ckpt, tmp_path / "run") == ["config.json", "model.safetensors"]
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"w" * 1000
    (ckpt / "model" / "model.safetensors").write_bytes(b"v" * 1000)
    real = shutil.copyfile

    def full_disk(src, dst):
        if Path(src).name == "model.safetensors":
            Path(dst).write_bytes(b"v" * 10)  # part of it written, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"'model.safetensors'.*No space left.*disk full\?") as err:
        ckpt_module.publish_final_model(ckpt, tmp_path / "run")
    assert "\n" not in str(err.value)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"w" * 1000, "the previous file was kept whole"
    assert not list((tmp_path / "run").glob(".*tmp-*"))
