"""Config -> the things a run or an evaluation is made of: model, problems, verifier, rollout engine, skill bank.

One place for it, shared by the `Trainer` and the `sgsd-fast train | eval` commands, so a
checkpoint is rebuilt for evaluation exactly as it was built for training.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sgsd_fast.config import TrainConfig
from sgsd_fast.data import Problem, generate_problems, load_problems
from sgsd_fast.models import (LoraSettings, apply_lora, checkpointing_enabled, enable_checkpointing, is_peft_model,
                              load_model_and_tokenizer)
from sgsd_fast.rollout import HFRolloutEngine, RolloutEngine, VLLMRolloutEngine, VLLMServerEngine
from sgsd_fast.skills import Retriever, SkillBank, make_encoder, starter_bank_path
from sgsd_fast.skills.store import remove_bank_files
from sgsd_fast.verify import Verifier

BANK_FILE = "skill_bank.db"


def lora_settings(cfg: TrainConfig) -> LoraSettings:
    targets = cfg.lora_target_modules
    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=targets if targets == "all-linear" else
                        tuple(t.strip() for t in targets.split(",") if t.strip()))


def build_model(cfg: TrainConfig, *, device: str | None = None) -> tuple[nn.Module, Any]:
    """(policy, tokenizer) as configured: dtype, device, attention, checkpointing, LoRA, Liger, 4/8-bit base.

    device: overrides `cfg.device` (a rank of a multi-process run loads onto cuda:LOCAL_RANK)."""
    lora = lora_settings(cfg) if cfg.use_peft else None
    return load_model_and_tokenizer(cfg.model, gguf_file=cfg.gguf_file, dtype=cfg.dtype, device=device or cfg.device,
                                    attn_implementation=cfg.attn_implementation,
                                    gradient_checkpointing=cfg.gradient_checkpointing, lora=lora, liger=cfg.liger,
                                    load_in_4bit=cfg.load_in_4bit, load_in_8bit=cfg.load_in_8bit)


def check_handed_model(cfg: TrainConfig, model: nn.Module) -> None:
    """Refuse a model object whose checkpointing contradicts the config (before the run directory exists).

    Prompt-prefix sharing is off for a checkpointed student (`TrainConfig.prefix_sharing`), so a
    model that already recomputes activations while `gradient_checkpointing` is false would train
    on gradients without the prefix's contribution; that is refused rather than guessed.
    """
    if checkpointing_enabled(model) and not cfg.gradient_checkpointing:
        raise ValueError("config field 'gradient_checkpointing' is false but the model passed to the Trainer has "
                         "activation checkpointing enabled; set gradient_checkpointing: true (or disable it on the "
                         "model)")


def adopt_model(cfg: TrainConfig, model: nn.Module) -> nn.Module:
    """A model handed to the Trainer (checked by `check_handed_model`), set up as `build_model` would:
    checkpointing, then LoRA (after seeding: the adapter's initialization draws random numbers)."""
    if cfg.gradient_checkpointing and not checkpointing_enabled(model):
        enable_checkpointing(model)
    if cfg.use_peft and not is_peft_model(model):
        model = apply_lora(model, lora_settings(cfg), gradient_checkpointing=cfg.gradient_checkpointing)
    return model


def load_train_problems(cfg: TrainConfig) -> list[Problem]:
    if cfg.dataset == "builtin":
        return generate_problems(cfg.num_train_problems, seed=cfg.seed, split="train", levels=cfg.builtin_levels)
    return load_problems(cfg.dataset, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                         split=cfg.dataset_split, config=cfg.dataset_config, limit=cfg.dataset_limit)


def load_eval_problems(cfg: TrainConfig) -> list[Problem]:
    if cfg.eval_dataset == "builtin":
        # One problem per computation: every eval problem is independent evidence.
        return generate_problems(cfg.num_eval_problems, seed=cfg.eval_seed, split="eval", levels=cfg.builtin_levels,
                                 distinct_keys=True)
    config = cfg.eval_dataset_config or (cfg.dataset_config if cfg.eval_dataset == cfg.dataset else None)
    return load_problems(cfg.eval_dataset, problem_field=cfg.problem_field, answer_field=cfg.answer_field,
                         split=cfg.eval_split, config=config, limit=cfg.num_eval_problems)


def build_verifier(cfg: TrainConfig) -> Verifier:
    """The verifier pool (close it, or use it as a context manager)."""
    return Verifier(num_workers=cfg.verifier_workers, timeout_s=cfg.verifier_timeout_s,
                    answer_phrase=cfg.answer_phrase)


def build_engine(cfg: TrainConfig, model: nn.Module, tokenizer: Any, *, rank: int = 0,
                 world_size: int = 1) -> RolloutEngine:
    """The training rollout engine (`rollout_engine`, `vllm_mode`), sampling with the configured parameters.

    rank, world_size: this process in a multi-process run (a colocated vLLM engine per rank under
    torchrun; in server mode only rank 0 pushes weights)."""
    sampling = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    if cfg.rollout_engine == "vllm" and cfg.vllm_mode == "server":
        return VLLMServerEngine(tokenizer, **sampling, host=cfg.vllm_server_host, server_port=cfg.vllm_server_port,
                                group_port=cfg.vllm_group_port, pushes_weights=rank == 0)
    if cfg.rollout_engine == "vllm":
        return VLLMRolloutEngine(cfg.model, tokenizer, **sampling,
                                 gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                 max_model_len=cfg.vllm_max_model_len, enable_sleep_mode=cfg.vllm_enable_sleep_mode,
                                 distributed=world_size > 1, seed=cfg.seed)
    return HFRolloutEngine(model, tokenizer, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                           top_p=cfg.top_p, top_k=cfg.top_k, batch_size=cfg.generation_batch_size,
                           share_prefix=cfg.prefix_sharing())


def prepare_bank(cfg: TrainConfig, run_dir: Path, start: Path | None = None) -> Path:
    """The run's own working copy of the skill bank, `run_dir/skill_bank.db`; the source is never modified.

    start: a checkpoint's bank to continue from (resume) instead of `cfg.skill_bank`. A ``.db``
    source is opened read-only, which also checks that it is a bank; a copy without a single note
    is refused here, before any model is loaded, rather than at the first step.
    """
    dst = run_dir / BANK_FILE
    remove_bank_files(dst)  # with its -wal/-shm: a stale WAL must never be replayed onto the new copy
    source = start or (starter_bank_path() if cfg.skill_bank == "starter" else Path(cfg.skill_bank))
    if source.suffix == ".db":
        with SkillBank(source, read_only=True) as bank:
            bank.backup(dst)
    else:
        with SkillBank(dst) as bank:
            bank.import_json(source)
    with SkillBank(dst, read_only=True) as bank:
        if bank.count() == 0:
            raise ValueError(f"skill bank {str(source)!r} holds no skills and no mistakes: every SGSD teacher "
                             "needs at least one note (see `sgsd-fast skills build`)")
    return dst


def build_retriever(cfg: TrainConfig, bank: SkillBank, model: nn.Module, tokenizer: Any) -> Retriever:
    """K teacher contexts per problem from `bank`, with the configured encoder (the policy's own for 'policy')."""
    encoder_kw = ({"model": model, "tokenizer": tokenizer} if cfg.encoder == "policy" else
                  {"model": cfg.encoder_model} if cfg.encoder_model is not None else {})
    return Retriever(bank, make_encoder(cfg.encoder, **encoder_kw), k=cfg.num_teachers, mode=cfg.retrieval,
                     seed=cfg.seed)
