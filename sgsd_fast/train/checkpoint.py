"""Atomic checkpoints and exact resume.

Layout (HF Trainer-like), one folder per saved step::

    <run_dir>/checkpoint-<step>/
        model/               save_pretrained of the weights (full, or the LoRA adapter only) and of
                             the tokenizer: a full model folder loads with from_pretrained as is
        optimizer.pt         optimizer state (bitsandbytes 8-bit state needs bitsandbytes to resume)
        scheduler.pt         lr scheduler state
        rng_state.pt         python / numpy / torch (and CUDA) RNG states
        teacher_state.pt     EMA / frozen teacher tensors when they are not the live weights
        skill_bank.db        a consistent copy of the run's skill bank (SQLite backup API)
        config.yaml          the run's TrainConfig
        trainer_state.json   step, metric history, counters; written last

Everything is written into a hidden temporary folder first and moved into place with
`os.replace`, so an interruption (Ctrl-C, crash, power loss) leaves either the previous checkpoint
or the new one, never a half-written folder that `--resume auto` could pick.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgsd_fast.models import is_peft_model

_CKPT = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def copy_sqlite(src: Path, dst: Path) -> None:
    # The backup API copies a consistent snapshot even while the bank's own connection is open.
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        target.close()
        source.close()


@contextlib.contextmanager
def _savable(model: nn.Module) -> Iterator[None]:
    """Let `save_pretrained` write a model loaded from a GGUF file.

    transformers dequantizes GGUF weights on load (the tensors in memory are plain fp32/bf16) yet
    keeps the GGUF quantizer attached, which makes `save_pretrained` refuse. The weights being
    ordinary, the quantizer (and its config entry) is detached while saving, so the folder is a
    normal checkpoint that `from_pretrained` loads without the GGUF file.
    """
    base = model.get_base_model() if is_peft_model(model) else model
    quantizer = getattr(base, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "gguf":
        yield
        return
    config = base.config
    quant_config = config.quantization_config
    base.hf_quantizer = None
    del config.quantization_config  # or the saved config.json would ask for a GGUF file again
    try:
        yield
    finally:
        base.hf_quantizer = quantizer
        config.quantization_config = quant_config


def _fsync_tree(folder: Path) -> None:
    """Flush every file (and the folders) to disk, so the rename below publishes complete data."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    config_yaml: str, teacher_state: dict[str, torch.Tensor] | None = None,
                    bank_path: str | os.PathLike | None = None, save_total_limit: int | None = None) -> Path:
    """Write checkpoint-<step> atomically and prune old ones; returns its path."""
    run = Path(run_dir)
    final = run / f"checkpoint-{step}"
    tmp = run / f".checkpoint-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with _savable(model):
        model.save_pretrained(tmp / "model", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    if teacher_state:
        torch.save(teacher_state, tmp / "teacher_state.pt")
    if bank_path is not None:
        copy_sqlite(Path(bank_path), tmp / "skill_bank.db")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1, allow_nan=True))
    _fsync_tree(tmp)
    if final.exists():  # e.g. Ctrl-C right after a periodic save of the same step
        old = run / f".checkpoint-{step}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    if save_total_limit is not None:
        for stale in list_checkpoints(run)[:-save_total_limit]:
            shutil.rmtree(stale)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir()
             if (m := _CKPT.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | None, runs_root: str | os.PathLike = "runs") -> Path:
    """`--resume PATH` (a checkpoint folder or a run folder) or `auto` (latest checkpoint of output_dir, or
    of the newest run under `runs_root` when no output_dir is given)."""
    if resume == "auto":
        if output_dir is not None:
            run = Path(output_dir)
        else:
            runs = sorted((p for p in Path(runs_root).glob("*") if list_checkpoints(p)), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise FileNotFoundError(f"--resume auto: no run with a checkpoint under {str(runs_root)!r}")
            run = runs[-1]
        ckpts = list_checkpoints(run)
        if not ckpts:
            raise FileNotFoundError(f"--resume auto: no complete checkpoint in {str(run)!r}")
        return ckpts[-1]
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(f"--resume: {resume!r} is neither a checkpoint folder (with {STATE_FILE}) "
                                f"nor a run folder containing checkpoint-<step> folders")
    return ckpts[-1]


def _read_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {str(folder)!r}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_model_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load weights written by `save_pretrained` into an already built model (full or LoRA adapter)."""
    folder = Path(folder)
    state = _read_safetensors_dir(folder)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter in {str(folder)!r} does not match the model: unexpected {unexpected[:3]}")
        return
    device = next(model.parameters()).device
    result = model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False)
    # save_pretrained drops tied copies (lm_head = embeddings); they are restored through the tie.
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in result.missing_keys if current[k].data_ptr() not in loaded]
    if result.unexpected_keys or missing:
        raise ValueError(f"weights in {str(folder)!r} do not match the model: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer_state, teacher_state or None)."""
    ckpt = Path(path)
    load_model_weights(model, ckpt / "model")
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=False))
    teacher = None
    if (ckpt / "teacher_state.pt").is_file():
        teacher = torch.load(ckpt / "teacher_state.pt", map_location=device, weights_only=True)
    return json.loads((ckpt / STATE_FILE).read_text()), teacher
