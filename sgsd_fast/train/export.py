"""A checkpoint as the folder other tools load: a peft adapter, or a merged plain Hugging Face model.

    export_model("runs/x/checkpoint-20", "out/adapter")               # adapter_config.json + adapter_model.safetensors
    export_model("runs/x/checkpoint-20", "out/merged", merge=True)    # config.json + model.safetensors + tokenizer

The model is rebuilt from the checkpoint's own config exactly as `sgsd-fast eval` does (so a GGUF
or a QLoRA base works too), on CPU in float32, and the weights are loaded into it. Merging a QLoRA
adapter folds it into the *unquantized* base: merging into 4-bit weights would round the update
away, and a plain model is what `from_pretrained` users expect. Either folder loads with
`transformers.AutoModelForCausalLM.from_pretrained` (an adapter folder through transformers' peft
integration, when its base is a Hugging Face id or folder).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from sgsd_fast.config import ConfigError, TrainConfig
from sgsd_fast.models import is_peft_model, load_model_and_tokenizer, savable
from sgsd_fast.train.checkpoint import load_model_weights, read_weights_checkpoint
from sgsd_fast.train.setup import lora_settings

EXPORT_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_repo_id(repo: str) -> str:
    """`repo` if it is a valid Hub repository id ('name' or 'owner/name'), else ConfigError naming
    --push_to_hub: checked with huggingface_hub's own rule before any model is loaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as err:
        raise ConfigError(f"--push_to_hub: expected a Hub repository id 'name' or 'owner/name', got {repo!r} "
                          f"({' '.join(str(err).split())})") from None
    return repo


def _target_dtype(name: str, trained: str) -> torch.dtype:
    """--dtype 'auto' = the dtype the run was configured with ('auto' there: float32, the CPU default)."""
    if name not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: expected one of {EXPORT_DTYPES}, got {name!r}")
    if name == "auto":
        name = trained if trained != "auto" else "float32"
    return getattr(torch, name)


def export_model(checkpoint: str | os.PathLike, out: str | os.PathLike, *, merge: bool = False, dtype: str = "auto",
                 push_to_hub: str | None = None, private: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """Write `checkpoint`'s model to `out` (adapter, or merged with `merge`), optionally upload it; returns `out`."""
    saved = read_weights_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out: {str(out)!r} exists and is not an empty folder")
    if push_to_hub is not None:
        check_repo_id(push_to_hub)
    # The run's data and bank do not matter here and may be gone: only the model fields are used.
    cfg = TrainConfig.from_dict({**saved, "skill_bank": "starter", "dataset": "builtin", "eval_dataset": "builtin",
                                 "output_dir": None})
    target = _target_dtype(dtype, cfg.dtype)
    if merge and not cfg.use_peft:
        raise ConfigError(f"--merge: checkpoint {str(checkpoint)!r} holds full weights (use_peft false), not an "
                          "adapter; export it without --merge")
    model, tokenizer = load_model_and_tokenizer(cfg.model, gguf_file=cfg.gguf_file, dtype="float32", device="cpu",
                                                lora=lora_settings(cfg) if cfg.use_peft else None)
    load_model_weights(model, Path(checkpoint) / "model")
    if merge:
        model = model.merge_and_unload()
    model = model.to(target)
    out.mkdir(parents=True, exist_ok=True)
    with savable(model):
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    kind = "adapter" if is_peft_model(model) else "merged model" if merge else "model"
    log(f"wrote the {kind} ({str(target).removeprefix('torch.')}) to {out}")
    if push_to_hub is not None:
        from huggingface_hub import HfApi

        api = HfApi()
        url = api.create_repo(push_to_hub, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=push_to_hub, commit_message=f"sgsd-fast export of {checkpoint}")
        log(f"pushed to {url}")
    return out
