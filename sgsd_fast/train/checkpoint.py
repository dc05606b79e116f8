"""Atomic checkpoints and exact resume.

Layout (HF Trainer-like), one folder per saved step, and the last model of a finished run also at
the run's top level (TRL's `save_model` layout, `publish_final_model`)::

    <run_dir>/checkpoint-<step>/
        model/               save_pretrained of the weights (full, or the LoRA adapter only) and of
                             the tokenizer: a full model folder loads with from_pretrained as is
        optimizer.pt         optimizer state (bitsandbytes 8-bit state needs bitsandbytes to resume)
        scheduler.pt         lr scheduler state
        rng_state.pt         python / numpy / torch (and CUDA) RNG states (of rank 0 in a multi-process run)
        rng_state-rank<r>.pt the same for rank r >= 1 of a multi-process run
        teacher_state.pt     EMA / frozen teacher tensors when they are not the live weights
        skill_bank.db        a consistent copy of the run's skill bank (SQLite backup API)
        config.yaml          the run's TrainConfig
        trainer_state.json   step, metric history, counters; written last

Everything is written into a hidden temporary folder first and moved into place with
`os.replace`, so an interruption (Ctrl-C, crash, power loss) leaves either the previous checkpoint
or the new one, never a half-written folder that `--resume auto` could pick. A save that fails
(a full disk) removes its temporary folder at once; one left by a process that died mid-save is
removed by `clean_stale_saves` when a run starts.

Resuming checks before anything is loaded: `checkpoint_problem` reads every file's structure
(JSON, YAML, safetensors headers against the file sizes, the zip directory of the torch files,
the SQLite header), `--resume auto` falls back to the newest checkpoint that passes, and
`check_resume` compares the saved config with the current one field by field.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sqlite3
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgsd_fast.config import ConfigError, TrainConfig, coerce_field, read_yaml, rename_deprecated
from sgsd_fast.models import is_peft_model, savable

_CKPT = re.compile(r"checkpoint-(\d+)")
# Temporary folders of a save in progress: .checkpoint-<step>.tmp-<pid> (being written) and
# .checkpoint-<step>.old-<pid> (the replaced checkpoint of the same step, during the swap).
_SAVE_DIR = re.compile(r"\.checkpoint-(\d+)\.(tmp|old)-(\d+)")
STATE_FILE = "trainer_state.json"
_TORCH_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")


def rank_rng_file(rank: int) -> str:
    """The RNG file of `rank`: rank 0 keeps the single-process name, so either kind of run resumes the other."""
    return "rng_state.pt" if rank == 0 else f"rng_state-rank{rank}.pt"


# Fields a checkpoint's contents depend on: resuming with another value would fail on load
# (optimizer state, weight shapes) or silently continue a different run (objective, teacher).
RESUME_LOCKED = ("model", "gguf_file", "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                 "load_in_4bit", "load_in_8bit", "method", "optim", "teacher_params")
# Fields that only say how the run is executed, stored or reported: free to change on resume.
# Any other changed field is allowed but reported, since the continued run then differs from an
# uninterrupted one.
RESUME_FREE = ("max_steps", "output_dir", "progress", "save_every", "save_total_limit", "report_to",
               "log_completions", "eval_every", "verifier_workers", "device", "attn_implementation",
               "gradient_checkpointing", "generation_batch_size", "share_prompt_prefix", "teacher_micro_batch_size", "micro_batch_size",
               "skill_bank", "vllm_gpu_memory_utilization", "max_consecutive_skipped_steps", "vllm_mode",
               "vllm_max_model_len", "vllm_enable_sleep_mode", "vllm_server_host", "vllm_server_port",
               "vllm_group_port", "data_parallel")


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the partial folder is gone and the previous checkpoint is kept."""


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
    # The copy leaves WAL mode so it is one self-contained file, which a read-only open on resume
    # reads without creating -wal/-shm files inside the checkpoint folder.
    source, target = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        source.backup(target)
        target.execute("PRAGMA journal_mode=DELETE")
    finally:
        target.close()
        source.close()


def _fsync_tree(folder: Path) -> None:
    """Flush every file (and the folders) to disk, so the rename below publishes complete data."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _first_line(err: BaseException) -> str:
    """An exception as one line (torch's C++ errors span several)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: nn.Module, tokenizer: Any,
                    optimizer: torch.optim.Optimizer, scheduler: Any, trainer_state: dict[str, Any],
                    config_yaml: str, teacher_state: dict[str, torch.Tensor] | None = None,
                    bank_path: str | os.PathLike | None = None, save_total_limit: int | None = None,
                    rank_rng_states: dict[int, dict[str, Any]] | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint-<step> atomically and prune old ones; returns its path.

    rank_rng_states: the RNG states of ranks >= 1 of a multi-process run (rank 0, the caller,
    writes its own), one file each, so a resume restores every rank's generators.
    model_state, optimizer_state: whole state dicts to write instead of the model's and the
    optimizer's own, which hold only this rank's shards under FSDP
    (`sgsd_fast.train.sharding.full_state_dicts`); the files are the same as an unsharded run's.

    Raises CheckpointSaveError (one line, "disk full?") when any part of the save fails; the
    temporary folder is removed first, so a full disk is not kept full by the failed attempt.
    """
    run = Path(run_dir)
    final = run / f"checkpoint-{step}"
    tmp = run / f".checkpoint-{step}.tmp-{os.getpid()}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        _write(tmp, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
               trainer_state={**trainer_state, "step": step}, config_yaml=config_yaml,
               teacher_state=teacher_state, bank_path=bank_path, rank_rng_states=rank_rng_states or {},
               model_state=model_state, optimizer_state=optimizer_state)
        _publish(tmp, final, run / f".checkpoint-{step}.old-{os.getpid()}")
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(err, Exception):  # Ctrl-C: cleaned up, nothing to explain
            raise
        kept = list_checkpoints(run)
        previous = f"the previous checkpoint {str(kept[-1])!r} is kept" if kept else "no earlier checkpoint exists"
        raise CheckpointSaveError(f"saving checkpoint {str(final)!r} failed ({_first_line(err)}); disk full? "
                                  f"The partial save was removed and {previous}") from err
    if save_total_limit is not None:
        for stale in list_checkpoints(run)[:-save_total_limit]:
            shutil.rmtree(stale)
    return final


def _write(tmp: Path, *, model: nn.Module, tokenizer: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
           trainer_state: dict[str, Any], config_yaml: str, teacher_state: dict[str, torch.Tensor] | None,
           bank_path: str | os.PathLike | None, rank_rng_states: dict[int, dict[str, Any]],
           model_state: dict[str, torch.Tensor] | None, optimizer_state: dict[str, Any] | None) -> None:
    """Every file of a checkpoint into `tmp`, the trainer state last, then flushed to disk."""
    with savable(model):
        # save_pretrained keeps what a LoRA adapter needs of a given state dict (peft filters it)
        model.save_pretrained(tmp / "model", safe_serialization=True,
                              **({} if model_state is None else {"state_dict": model_state}))
    tokenizer.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng_state.pt")
    for rank, state in sorted(rank_rng_states.items()):
        torch.save(state, tmp / rank_rng_file(rank))
    if teacher_state:
        torch.save(teacher_state, tmp / "teacher_state.pt")
    if bank_path is not None:
        copy_sqlite(Path(bank_path), tmp / "skill_bank.db")
    (tmp / "config.yaml").write_text(config_yaml)
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1, allow_nan=True))
    _fsync_tree(tmp)


def _publish(tmp: Path, final: Path, old: Path) -> None:
    """Move the finished `tmp` to `final`; an existing `final` (e.g. Ctrl-C right after a periodic
    save of the same step) is swapped out through `old` and put back if the swap fails."""
    if not final.exists():
        os.replace(tmp, final)
        return
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():  # saves are synchronous: a folder of this process is a leftover
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_saves(run_dir: str | os.PathLike) -> list[str]:
    """Remove the temporary folders of saves whose process is gone; returns one message per folder.

    A process killed between the two renames of `_publish` leaves the complete previous
    checkpoint in its ``.old-`` folder and no ``checkpoint-<step>``: that folder is moved back.
    """
    run = Path(run_dir)
    if not run.is_dir():
        return []
    messages = []
    for path in sorted(run.iterdir()):
        match = _SAVE_DIR.fullmatch(path.name)
        if match is None or not path.is_dir() or _pid_alive(int(match.group(3))):
            continue
        final = run / f"checkpoint-{match.group(1)}"
        if match.group(2) == "old" and not final.exists() and (path / STATE_FILE).is_file():
            os.replace(path, final)
            messages.append(f"restored {str(final)!r} from {path.name}, left by a save that was cut off")
        else:
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"removed {str(path)!r}, left by a save that did not finish")
    return messages


def publish_final_model(checkpoint: str | os.PathLike, run_dir: str | os.PathLike) -> list[str]:
    """Copy a finished run's last model folder to the run's top level; returns the file names.

    That is where TRL's `trainer.save_model()` leaves the result (`adapter_config.json` +
    `adapter_model.safetensors`, or `config.json` + `model.safetensors`, and the tokenizer), so
    `from_pretrained(run_dir)` and scripts written for TRL find it. Each file is copied under a
    hidden name and renamed into place: an interrupted copy never leaves a truncated weight file
    under the real name. Raises CheckpointSaveError (one line) when a copy fails; the checkpoint
    itself is untouched.
    """
    src, run = Path(checkpoint) / "model", Path(run_dir)
    names = sorted(f.name for f in src.iterdir() if f.is_file())
    for name in names:
        tmp = run / f".{name}.tmp-{os.getpid()}"
        try:
            shutil.copyfile(src / name, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, run / name)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise CheckpointSaveError(f"copying the final model file {name!r} to {str(run)!r} failed "
                                      f"({_first_line(err)}); disk full? {str(checkpoint)!r} holds the model") from err
    return names


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir()
             if (m := _CKPT.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unusable (header unreadable, or shorter/longer than it says)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "truncated safetensors file (no header)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return "truncated safetensors file (header cut off)"
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "corrupt safetensors header"
    if not isinstance(header, dict):
        return "corrupt safetensors header"
    ends = [entry["data_offsets"][1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    if 8 + header_len + max(ends, default=0) != size:
        return f"safetensors file of {size} bytes does not match its header (truncated or padded)"
    return None


def _sqlite_problem(path: Path) -> str | None:
    """Why a SQLite file is unusable, from its 100-byte header (magic, page size x page count)."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        header = fh.read(100)
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return "not an SQLite database"
    page_size = struct.unpack(">H", header[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size
    pages = struct.unpack(">I", header[28:32])[0]
    if pages and page_size * pages > size:
        return f"truncated SQLite database ({size} of {page_size * pages} bytes)"
    return None


def checkpoint_problem(path: str | os.PathLike, *, weights_only: bool = False) -> str | None:
    """The first reason a checkpoint folder cannot be resumed ("<file>: <what>"), or None if it can.

    Reads structure only (headers, directories, small files), never the tensors, so checking
    every checkpoint of a run stays cheap; a file damaged inside its data is still reported by
    `load_checkpoint`, naming the file. ``weights_only=True`` checks what an evaluation reads
    (config and weights), not the optimizer, scheduler, RNG, trainer state and bank.
    """
    ckpt = Path(path)
    try:
        read_checkpoint_config(ckpt)
    except ConfigError as err:
        return str(err)
    weights = sorted((ckpt / "model").glob("*.safetensors"))
    if not weights:
        return f"{ckpt / 'model'}: no .safetensors weights"
    files = weights
    if not weights_only:
        state_file = ckpt / STATE_FILE
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                return f"{state_file}: no trainer state (expected a JSON object with an integer 'step')"
        except FileNotFoundError:
            return f"{state_file}: missing (an incomplete checkpoint)"
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return f"{state_file}: not valid JSON ({err})"
        extra = [ckpt / "teacher_state.pt"] if (ckpt / "teacher_state.pt").exists() else []
        extra += sorted(ckpt.glob("rng_state-rank*.pt"))
        files = weights + [ckpt / name for name in _TORCH_FILES] + extra
    for file in files:
        if not file.is_file():
            return f"{file}: missing"
        if file.suffix == ".safetensors":
            problem = _safetensors_problem(file)
        else:  # torch.save writes a zip archive whose directory sits at the end: truncation loses it
            problem = None if zipfile.is_zipfile(file) else "truncated or not a file written by torch.save"
        if problem is not None:
            return f"{file}: {problem}"
    bank = ckpt / "skill_bank.db"
    if not weights_only and bank.exists() and (problem := _sqlite_problem(bank)) is not None:
        return f"{bank}: {problem}"
    return None


def read_checkpoint_config(ckpt: str | os.PathLike) -> dict[str, Any]:
    """The config mapping saved in a checkpoint folder, with deprecated field names of older
    versions renamed (so the command line may use the new ones); ConfigError naming the file otherwise."""
    return rename_deprecated(read_yaml(Path(ckpt) / "config.yaml", what="checkpoint config", allow_empty=False))


def read_weights_checkpoint(ckpt: str | os.PathLike, *, what: str = "--checkpoint") -> dict[str, Any]:
    """The saved config of a checkpoint whose weights are to be used (`sgsd-fast eval`, `export`),
    after checking that it is a checkpoint folder with readable weights; errors name `what`."""
    ckpt = Path(ckpt)
    if not (ckpt / "model").is_dir() or not (ckpt / "config.yaml").is_file():
        raise ConfigError(f"{what}: {str(ckpt)!r} is not a checkpoint folder (expected model/ and config.yaml inside)")
    problem = checkpoint_problem(ckpt, weights_only=True)
    if problem is not None:
        raise ValueError(f"{what}: {str(ckpt)!r} is unusable: {problem}")
    return read_checkpoint_config(ckpt)


def resolve_resume(resume: str, output_dir: str | None, runs_root: str | os.PathLike = "runs",
                   log: Callable[[str], None] = print) -> Path:
    """`--resume PATH` (a checkpoint folder or a run folder) or `auto` (latest checkpoint of output_dir, or
    of the newest run under `runs_root` when no output_dir is given, which is said in a message).

    For a run folder (and `auto`) the newest checkpoint that passes `checkpoint_problem` wins;
    each newer one that does not is reported through `log`. A checkpoint folder named explicitly
    must itself be usable (ValueError naming the bad file otherwise).
    """
    if resume == "auto":
        if output_dir is not None:
            run = Path(output_dir)
        else:
            runs = sorted((p for p in Path(runs_root).glob("*") if list_checkpoints(p)), key=lambda p: p.stat().st_mtime)
            if not runs:
                raise FileNotFoundError(f"--resume auto: no run with a checkpoint under {str(runs_root)!r}")
            run = runs[-1]
            log(f"--resume auto: no output_dir given, continuing the newest run under {str(runs_root)!r}: {run}")
        ckpts = list_checkpoints(run)
        if not ckpts:
            raise FileNotFoundError(f"--resume auto: no complete checkpoint in {str(run)!r}")
    else:
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ValueError(f"--resume: checkpoint {resume!r} is unusable: {problem}")
            return path
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise FileNotFoundError(f"--resume: {resume!r} is neither a checkpoint folder (with {STATE_FILE}) "
                                    f"nor a run folder containing checkpoint-<step> folders")
    problems = []
    for ckpt in reversed(ckpts):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            if problems:
                log(f"--resume: {ckpt.name} is the newest usable checkpoint; skipped: {'; '.join(problems)}")
            return ckpt
        problems.append(f"{ckpt.name} ({problem})")
    raise ValueError(f"--resume: no usable checkpoint in {str(ckpts[0].parent)!r}: {'; '.join(problems)}")


def check_resume(ckpt: str | os.PathLike, cfg: TrainConfig) -> list[str]:
    """Check that the run described by `cfg` can continue from checkpoint `ckpt`, before any model
    is built; returns notices about changed fields that are allowed but alter the run.

    Raises ValueError when a file of the checkpoint is unusable, and ConfigError naming every
    `RESUME_LOCKED` field whose value differs from the one the checkpoint was trained with.
    """
    problem = checkpoint_problem(ckpt)
    if problem is not None:
        raise ValueError(f"--resume: checkpoint {str(ckpt)!r} is unusable: {problem}")
    saved = read_checkpoint_config(ckpt)
    changed = []
    for name, value in cfg.to_dict().items():
        if name in RESUME_FREE or name not in saved:
            continue
        before = coerce_field(name, saved[name])
        if before != value:
            changed.append((name, before, value))
    locked = [f"{name} {old!r} -> {new!r}" for name, old, new in changed if name in RESUME_LOCKED]
    if locked:
        raise ConfigError(f"--resume: checkpoint {str(ckpt)!r} was trained with different settings that must "
                          f"match to continue it: {', '.join(locked)} (start a new run in another output_dir to "
                          "change them)")
    return [f"--resume: continuing with changed {name} {old!r} -> {new!r}; the result will differ from an "
            "uninterrupted run" for name, old, new in changed]


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


def _load_file(file: Path, load: Callable[[Path], Any]) -> Any:
    """`load(file)`, with any failure naming the file: damaged data surfaces as whatever the
    deserializer raises (UnpicklingError, SafetensorError, EOFError, ...), a state that does not fit
    the model or optimizer as KeyError/RuntimeError, so no narrower list would be complete."""
    try:
        return load(file)
    except Exception as err:
        raise ValueError(f"checkpoint file {str(file)!r} cannot be loaded: {_first_line(err)}") from err


def load_checkpoint_weights(path: str | os.PathLike, model: nn.Module) -> None:
    """Load a checkpoint's weights (its model/ folder) into `model`; a failure names the file."""
    _load_file(Path(path) / "model", lambda f: load_model_weights(model, f))


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module | None, optimizer: torch.optim.Optimizer,
                    scheduler: Any, rank: int = 0, log: Callable[[str], None] | None = None,
                    load_optimizer: Callable[[dict[str, Any]], None] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Restore model, optimizer, scheduler and RNG states; return (trainer_state, teacher_state or None).

    model: None when its weights are in place already (`load_checkpoint_weights`; the trainer
        loads them before sharding or wrapping the model).
    rank: whose RNG file to restore. A checkpoint saved by fewer processes has none for a higher
        rank; that rank then continues from rank 0's generators (said through `log`): rollouts are
        seeded per problem in multi-process runs, so this changes no rollout.
    load_optimizer: how the saved (whole, unsharded) optimizer state goes into `optimizer`, read
        onto the CPU (`sgsd_fast.train.sharding.load_full_optimizer_state` moves each rank's shard
        to its device); default `optimizer.load_state_dict`, on the parameters' device.
    """
    ckpt = Path(path)
    rng_file = ckpt / rank_rng_file(rank)
    if not rng_file.is_file() and rank > 0:
        if log is not None:
            log(f"notice: {ckpt} holds no RNG state for rank {rank}; it continues from rank 0's")
        rng_file = ckpt / rank_rng_file(0)
    if model is not None:
        load_checkpoint_weights(ckpt, model)
    device = optimizer.param_groups[0]["params"][0].device
    put = optimizer.load_state_dict if load_optimizer is None else load_optimizer
    _load_file(ckpt / "optimizer.pt", lambda f: put(
        torch.load(f, map_location=device if load_optimizer is None else "cpu", weights_only=False)))
    _load_file(ckpt / "scheduler.pt", lambda f: scheduler.load_state_dict(torch.load(f, weights_only=False)))
    _load_file(rng_file, lambda f: set_rng_state(torch.load(f, weights_only=False)))
    teacher = None
    if (ckpt / "teacher_state.pt").is_file():
        teacher = _load_file(ckpt / "teacher_state.pt",
                             lambda f: torch.load(f, map_location=device, weights_only=True))
    return json.loads((ckpt / STATE_FILE).read_text()), teacher
