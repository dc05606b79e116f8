"""Training configuration: one dataclass, YAML files and `--key value` command-line overrides.

The conventions follow TRL's `TrlParser`: YAML keys are the dataclass field names (or their Hugging
Face / TRL aliases, `ALIASES`), the command line overrides the YAML file, booleans are written
`--flag true|false` or as a bare `--flag`, list fields take several values, optional values accept `none`.
Every field carries a help string (shown by `sgsd-fast train --help`), and the whole config is
validated up front so that a bad value fails in a second with the field's name instead of an hour
into a run. The defaults are the embedded CPU job (SmolLM2-135M-Instruct on the built-in task);
`configs/paper_qwen3_1p7b.yaml` holds the paper's GPU configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import types
import typing
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The objectives of `sgsd_fast.train.objectives` (a test keeps the two in step).
METHODS = ("sgsd", "opsd", "sampled_rkl", "grpo")
TEACHER_PARAMS = ("live", "frozen", "ema")
OPTIMIZERS = ("auto", "adamw_8bit", "paged_adamw_8bit", "adamw_torch")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
RETRIEVAL_MODES = ("similarity", "random")
ROLLOUT_ENGINES = ("hf", "vllm")
#: Trackers `report_to` can name, with the package each needs (sgsd_fast.train.trackers implements them).
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
REPORT_TO = ("auto", "none", *TRACKER_PACKAGES)
ANSWER_FORMATS = ("boxed", "answer_is")  # keys of sgsd_fast.prompts.ANSWER_FORMATS
# Names the layers above define; config sits below them, so it keeps copies (a test keeps them in step).
ENCODERS = ("tfidf", "policy", "sentence-transformers", "st")  # what sgsd_fast.skills.make_encoder accepts
TASK_LEVELS = (1, 2, 3, 4, 5)  # keys of sgsd_fast.data.tasks.LEVELS
SGSD_OUTCOMES = ("sign", "advantage")
ROLLOUT_SEEDINGS = ("auto", "step", "problem")
VLLM_MODES = ("colocate", "server")
DATA_PARALLEL = ("ddp", "fsdp")


#: Old field names still read from YAML files, checkpoints and the command line (with a FutureWarning).
DEPRECATED_FIELDS = {"teacher_weights": "teacher_params"}

#: The Hugging Face TrainingArguments / TRL names users type by habit, accepted everywhere a field
#: name is (YAML keys, `--flags`) as spellings of ours, silently: both are current names. Only
#: names whose meaning matches ours exactly are listed (TRL's per_device_train_batch_size counts
#: prompts per device, not our rollouts per micro-batch, so it is not an alias).
ALIASES = {
    "model_name_or_path": "model",
    "torch_dtype": "dtype",
    "use_liger_kernel": "liger",
    "dataset_name": "dataset",
    "dataset_train_split": "dataset_split",
    "dataset_test_split": "eval_split",
    "max_completion_length": "max_new_tokens",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range; the message names the field."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help string (the TRL/HF convention: `metadata={"help": ...}`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything one `sgsd-fast train` run needs. Defaults = the embedded CPU job."""

    # ---- model -------------------------------------------------------------------------------
    model: str = _f("smollm2", "Model to train: 'smollm2' (the bundled SmolLM2-135M-Instruct GGUF), a Hugging Face "
                    "model id or a local model directory.")
    gguf_file: str | None = _f(None, "GGUF file name inside `model` (for GGUF checkpoints).")
    dtype: str = _f("auto", f"Parameter dtype, one of {DTYPES}; 'auto' = bfloat16 on CUDA, float32 on CPU.")
    device: str = _f("auto", f"Device, one of {DEVICES}; 'auto' = cuda when available.")
    attn_implementation: str = _f("auto", "Attention implementation passed to transformers ('auto', 'sdpa', "
                                  "'eager', 'flash_attention_2').")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass (saves memory, ~20% slower).")
    liger: bool = _f(False, "Patch RMSNorm/RoPE/SwiGLU with Liger kernels (CUDA only).")
    use_peft: bool = _f(True, "Train a LoRA adapter instead of all weights (the embedded default and the paper: full "
                        "fine-tuning with Adam moved every weight by ~lr and raised held-out entropy ~25x more "
                        "than LoRA r=16 at the same lr).")
    lora_r: int = _f(16, "LoRA rank (with use_peft).")
    lora_alpha: int = _f(32, "LoRA alpha (with use_peft).")
    lora_dropout: float = _f(0.0, "LoRA dropout (with use_peft). Keep 0 so one student pass serves all teachers exactly.")
    lora_target_modules: str = _f("all-linear", "Module names for LoRA (several: `--lora_target_modules q_proj "
                                  "v_proj`, comma-separated, or a YAML list), or 'all-linear'.", multi=True)
    load_in_4bit: bool = _f(False, "QLoRA: load the frozen base in 4 bits with bitsandbytes (NF4, double "
                            "quantization, bf16 compute on CUDA / fp32 on CPU) and train the LoRA adapter on top; "
                            "the lm_head stays unquantized for the fused ops. Needs use_peft.")
    load_in_8bit: bool = _f(False, "Load the frozen base in 8 bits with bitsandbytes (LLM.int8) under the LoRA "
                            "adapter, lm_head unquantized. Needs use_peft; excludes load_in_4bit.")

    # ---- data --------------------------------------------------------------------------------
    dataset: str = _f("builtin", "Training problems: 'builtin' (the generated arithmetic task), a JSONL/parquet "
                      "file, or a Hugging Face dataset (local or already cached).")
    problem_field: str = _f("problem", "Column holding the problem text (file/HF datasets).")
    answer_field: str = _f("answer", "Column holding the reference answer (file/HF datasets).")
    dataset_config: str | None = _f(None, "Configuration name of a Hugging Face `dataset` (e.g. 'main' for "
                                    "openai/gsm8k).")
    dataset_split: str = _f("train", "Split to read from a Hugging Face dataset.")
    dataset_limit: int | None = _f(None, "Use at most this many training problems from `dataset`.")
    eval_dataset: str = _f("builtin", "Held-out problems: 'builtin' (disjoint from the built-in training split) "
                           "or a file/HF dataset, same formats as `dataset`.")
    eval_dataset_config: str | None = _f(None, "Configuration name of a Hugging Face `eval_dataset` (none = "
                                         "dataset_config when eval_dataset is the same dataset).")
    eval_split: str = _f("test", "Split to read from a Hugging Face `eval_dataset`.")
    builtin_levels: list[int] = _f([1], "Difficulty levels of the built-in task (train and eval); level 1 is the "
                                   "one a 135M model solves part of the time.")
    num_train_problems: int = _f(2000, "Number of built-in training problems to generate.")
    eval_seed: int = _f(0, "Seed of the built-in held-out problems. Separate from `seed`, so runs with different "
                        "training seeds are scored on the same problems (paired comparisons).")
    num_eval_problems: int = _f(200, "Number of held-out problems used by each evaluation. The built-in eval split "
                                "draws one problem per distinct computation; 200 problems resolve a change of "
                                "about +-7 points (paired 95% CI), 40 only a collapse.")

    # ---- method ------------------------------------------------------------------------------
    answer_format: str = _f("answer_is", f"How prompts ask for the answer, one of {ANSWER_FORMATS}: 'boxed' (SPEC §5: "
                            "'... inside \\boxed{{}}', the paper config) or 'answer_is' (one worked example turn, "
                            "then 'end with: The answer is <number>'; the embedded job: SmolLM2-135M never writes a box "
                            "and follows this format in ~98% of its answers). Student and teachers use the same one.")
    method: str = _f("sgsd", f"Objective, one of {METHODS}: 'sgsd' (skill-conditioned gated self-distillation), "
                     "'opsd' (answer-conditioned teacher, full-vocab clipped divergence), 'sampled_rkl' "
                     "(answer-conditioned teacher, sampled-token reverse KL), 'grpo' (group-normalized outcome "
                     "advantages, no teacher; needs num_generations >= 2).")

    # ---- rollouts ----------------------------------------------------------------------------
    prompts_per_step: int = _f(8, "Problems per optimizer step.")
    num_generations: int = _f(1, "Rollouts per problem per step (TRL's name); a problem's rollouts are adjacent in "
                              "the batch and sampled independently, so a step has prompts_per_step * "
                              "num_generations rollouts. GRPO needs >= 2 (its group baseline).")
    max_new_tokens: int = _f(32, "Maximum completion length; longer rollouts are truncated (and still trained on).")
    temperature: float = _f(0.5, "Sampling temperature of the rollouts (the paper: 1.1 for Qwen3-1.7B). With the "
                            "answer_is format SmolLM2-135M solves ~45% of level-1 problems greedily and ~28% of its "
                            "samples at 0.7; 0.5 keeps the success rate of the rollouts inside 30-70%.")
    top_p: float = _f(0.95, "Nucleus sampling threshold of the rollouts (1.0 = off).")
    top_k: int = _f(20, "Top-k sampling of the rollouts (0 = off).")
    generation_batch_size: int = _f(50, "Prompts generated together (a 200-problem evaluation in 4 batches).")
    share_prompt_prefix: bool = _f(True, "Run the tokens every prompt of a batch starts with (system prompt, worked "
                                   "example, teacher preamble) once and reuse their KV cache, in generation and in "
                                   "the teacher and student passes: the same results up to float rounding; the "
                                   "embedded job's steps ~25 s -> ~14 s and its 200-problem evaluations ~116 s -> "
                                   "~45 s. Not used with data_parallel 'fsdp' (a rank's prefix pass would be a "
                                   "collective the others may not run), nor by the student under "
                                   "gradient_checkpointing (checkpointed layers drop the cache).")
    rollout_engine: str = _f("hf", f"Rollout backend, one of {ROLLOUT_ENGINES}: 'hf' (transformers generate, CPU or GPU, "
                             "tested) or 'vllm' (CUDA with vLLM installed; weights synced before each step; untested "
                             "in CI).")
    vllm_gpu_memory_utilization: float = _f(0.3, "Share of GPU memory vLLM may take (rollout_engine='vllm').")
    student_chat_template: bool = _f(True, "Render the student prompt with the tokenizer's chat template.")
    student_thinking: bool | None = _f(None, "Chat-template 'thinking' flag for the student (Qwen3: false); "
                                       "none = the template's default.")
    teacher_chat_template: bool = _f(True, "Render the teacher prompt with the tokenizer's chat template.")
    teacher_thinking: bool | None = _f(None, "Chat-template 'thinking' flag for the teachers (Qwen3: true).")

    # ---- teachers ----------------------------------------------------------------------------
    num_teachers: int = _f(2, "K: teachers (retrieved skill/mistake pairs) per rollout. The paper uses 8; the CPU "
                           "default uses 2 because every teacher is one more forward pass over the batch with a "
                           "prompt ~3x longer than the student's (at K=4 the teachers took ~45% of a CPU step).")
    teacher_params: str = _f("frozen", f"Teacher parameters, one of {TEACHER_PARAMS}: current weights without grad "
                              "(the SGSD paper's setting), the initial weights (the OPSD recipe and this default: with "
                              "live teachers and nearly all rollouts failing, the embedded CPU job drifted into "
                              "degenerate text within 25 steps; with LoRA the adapter is disabled, without LoRA a "
                              "full copy is kept), or an exponential moving average.")
    ema_decay: float = _f(0.99, "EMA decay for teacher_params='ema'.")
    skill_bank: str = _f("starter", "Skill bank: 'starter' (the bundled static bank), a .json export or a .db bank. "
                         "The run works on its own copy, the source is never modified.")
    retrieval: str = _f("similarity", f"Teacher-context retrieval, one of {RETRIEVAL_MODES}.")
    encoder: str = _f("tfidf", "Text encoder for retrieval (see sgsd_fast.skills.make_encoder); 'tfidf' needs "
                      "no download.")
    encoder_model: str | None = _f(None, "Model path or cached id for encoder='sentence-transformers' (the paper "
                                   "uses a 0.6B embedding model).")
    teacher_micro_batch_size: int = _f(8, "Rollouts per teacher forward pass.")

    # ---- loss --------------------------------------------------------------------------------
    sgsd_outcome: str = _f("advantage", f"SGSD outcome o, one of {SGSD_OUTCOMES}: 'sign' (the paper's exact "
                           "objective: +1 for a success, -1 for a failure) or 'advantage' (a variant, the embedded "
                           "default: o = r - mean reward of the step's batch, so successes and failures balance; "
                           "see sgsd_fast.ops.sgsd_gated_loss and benchmarks/results/learning.md).")
    tau_g: float = _f(1.0, "SGSD gate temperature tau_g.")
    support_clip: float = _f(3.0, "SGSD clip c of the per-token log-ratio when measuring teacher support.")
    deadzone: float = _f(0.05, "SGSD dead zone epsilon: teachers with |support| <= epsilon are ignored.")
    logprob_temperature: float = _f(1.0, "Temperature tau_s applied to logits in the SGSD / sampled_rkl / GRPO "
                                    "log-probs.")
    opsd_beta: float = _f(0.0, "OPSD generalized JSD beta: 0 = forward KL (the recipe), 1 = reverse KL.")
    opsd_entry_clip: float | None = _f(0.05, "OPSD per-vocabulary-entry clip of the divergence summands (none = off).")
    scale_rewards: bool = _f(True, "GRPO: divide each group's centered rewards by their std (+1e-4); false = Dr. GRPO "
                             "(mean baseline only).")

    # ---- optimization ------------------------------------------------------------------------
    max_steps: int = _f(30, "Optimizer steps (30 on the embedded job: more accurate than 20 at the same seeds, "
                         "benchmarks/results/learning.md; ~14 s a step on 2 CPU cores).")
    learning_rate: float = _f(1e-4, "Peak learning rate (1e-4 for LoRA r=16 on the embedded job; the paper: 5e-6 "
                              "for LoRA r=64 on Qwen3-1.7B).")
    optim: str = _f("auto", f"Optimizer, one of {OPTIMIZERS}; 'auto' = paged_adamw_8bit on CUDA, adamw_8bit on CPU "
                    "(adamw_torch where bitsandbytes is not installed).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(1.0, "Gradient-norm clip (0 = off).")
    lr_scheduler_type: str = _f("constant", f"Learning-rate schedule after warmup, one of {SCHEDULERS}.")
    warmup_steps: int = _f(2, "Linear warmup steps.")
    micro_batch_size: int = _f(8, "Rollouts per student forward/backward (gradient accumulation inside a step).")
    seed: int = _f(0, "Base seed; step s samples its rollouts with seed + s, so resuming is exact.")
    max_consecutive_skipped_steps: int = _f(3, "Stop the run with an error after this many consecutive steps skipped "
                                            "for a non-finite loss or gradient (0 = never): by then the weights "
                                            "are usually ruined (e.g. by a far too large learning_rate), and "
                                            "nothing more is saved.")

    # ---- scaling out: data parallel and vLLM ------------------------------------------------
    rollout_seeding: str = _f("auto", f"How rollouts are seeded, one of {ROLLOUT_SEEDINGS}: 'step' samples the whole "
                              "batch with seed + s (the single-process behaviour of earlier releases); 'problem' "
                              "samples each problem's num_generations rollouts with their own seed from (seed, step, "
                              "the problem's index in the step), so the rollouts are the same whatever the number of "
                              "processes; 'auto' = 'step' in one process, 'problem' under torchrun / accelerate "
                              "launch. Set 'problem' on a 1-process run to reproduce a multi-process one.")
    data_parallel: str = _f("ddp", f"How a multi-process run holds the model, one of {DATA_PARALLEL}: 'ddp' keeps "
                            "the whole model, its gradients and optimizer states on every rank (DistributedDataParallel); "
                            "'fsdp' shards all three over the ranks with FSDP2 (`fully_shard` on every decoder layer and "
                            "on the root that holds the embeddings, final norm and lm_head), gathering each layer for "
                            "its forward and backward and the lm_head whole for the fused log-prob ops (README 'Scaling "
                            "out'). Checkpoints are the same either way. No effect in one process.")
    fsdp_param_dtype: str | None = _f(None, "FSDP2 mixed precision (data_parallel 'fsdp'): the dtype the gathered "
                                      "parameters compute in, one of ('float32', 'bfloat16', 'float16'), while the "
                                      "shards and optimizer states keep `dtype` and gradients are reduce-scattered in "
                                      "float32; `--dtype float32 --fsdp_param_dtype bfloat16` is float32 master "
                                      "weights with bfloat16 compute. none = compute in `dtype`.")
    vllm_mode: str = _f("colocate", f"vLLM placement (rollout_engine='vllm'), one of {VLLM_MODES}: 'colocate' runs an "
                        "engine inside each training process on its GPU (weights copied in memory each step); "
                        "'server' uses a `trl vllm-serve` process on other GPUs (weights broadcast over NCCL by "
                        "rank 0; no per-request seeds, so its rollouts are not reproducible).")
    vllm_max_model_len: int = _f(4096, "Longest prompt + completion vLLM reserves KV cache for; the model's own "
                                 "maximum (40,960 for Qwen3) would not fit a colocated share of the GPU.")
    vllm_enable_sleep_mode: bool = _f(False, "Colocated vLLM frees its weights and KV cache during the update and "
                                      "takes them back before the next generation (vLLM sleep mode, CUDA).")
    vllm_server_host: str = _f("127.0.0.1", "Host of the `trl vllm-serve` process (vllm_mode='server').")
    vllm_server_port: int = _f(8000, "HTTP port of the vLLM server (vllm_mode='server').")
    vllm_group_port: int = _f(51216, "TCP port of the NCCL group weights are pushed through (vllm_mode='server').")

    # ---- online self-evolution ---------------------------------------------------------------
    online_update_every: int = _f(0, "Online skill-bank update every N steps (0 = off).")
    online_success_threshold: float = _f(0.8, "Skip the online update when the step's success rate is at least this.")
    online_max_new: int = _f(5, "At most this many new dynamic items per kind per online update.")
    online_cap: int = _f(30, "Cap of dynamic items per kind.")
    online_max_new_tokens: int = _f(384, "Generation budget of the policy when it writes new skill/mistake notes.")

    # ---- evaluation --------------------------------------------------------------------------
    eval_every: int = _f(0, "Evaluate every N steps (0 = only at the start and the end).")
    eval_at_start: bool = _f(True, "Evaluate before the first step (the 'before' of the summary).")
    eval_samples: int = _f(0, "k for avg@k: sampled completions per held-out problem (0 = greedy accuracy only).")
    eval_temperature: float = _f(1.0, "Sampling temperature for avg@k.")
    eval_max_new_tokens: int | None = _f(None, "Completion length for evaluation (none = max_new_tokens).")
    verifier_workers: int = _f(2, "Processes verifying answers.")
    verifier_timeout_s: float = _f(5.0, "Per-answer verification timeout; a timeout counts as reward 0.")
    reject_repetition: bool = _f(True, "A completion that loops (a line or a 6-word run repeated 3+ times) gets "
                                 "reward 0 in training and counts as wrong in evaluation: a gain made of loops is "
                                 "not a gain (see sgsd_fast.verify.repetition).")
    answer_phrase: bool = _f(True, "Also read an 'answer is ...' phrase when a completion has no \\boxed{} or "
                             "'Answer:' line. On for the embedded SmolLM2 job (that model never writes a box); "
                             "SPEC §5 is strict, so turn it off for real reasoning runs (the paper config does).")

    # ---- output ------------------------------------------------------------------------------
    output_dir: str | None = _f(None, "Run directory (none = runs/<timestamp>).")
    save_every: int = _f(10, "Checkpoint every N steps (0 = only at the end and on Ctrl-C).")
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints (none = all).")
    report_to: str = _f("auto", f"Experiment trackers besides metrics.jsonl: one or several (comma- or "
                        f"space-separated) of {tuple(TRACKER_PACKAGES)}, or 'none', or 'auto' (= TensorBoard when "
                        "installed). Each gets the config, every metrics row, the eval results and the curves PNG; "
                        "WANDB_MODE=offline runs wandb without a network.", multi=True)
    progress: bool = _f(True, "Show a progress bar.")
    log_completions: int = _f(1, "Completions per step written to completions.jsonl (0 = none).")

    def __post_init__(self) -> None:
        self.validate()

    # -- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first bad field.

        Everything that can be known without loading a model is checked here (values, names of
        levels and encoders, installed trackers), so a bad value fails in a second, not after a
        model download. Paths that must be writable are checked by the trainer before it loads
        the model (`check_output_dir`): configs are also built freely where nothing is written.
        """
        _check_types(self)

        def need(cond: bool, name: str, expected: str) -> None:
            if not cond:
                raise ConfigError(f"config field {name!r}: expected {expected}, got {getattr(self, name)!r}")

        for name, tp in _field_types().items():  # inf / nan pass every range check below
            value = getattr(self, name)
            if _base_type(tp)[0] is float and value is not None:
                need(math.isfinite(value), name, "a finite number")

        for name, choices in (("method", METHODS), ("answer_format", ANSWER_FORMATS), ("sgsd_outcome", SGSD_OUTCOMES),
                              ("teacher_params", TEACHER_PARAMS), ("optim", OPTIMIZERS),
                              ("lr_scheduler_type", SCHEDULERS), ("dtype", DTYPES), ("device", DEVICES),
                              ("retrieval", RETRIEVAL_MODES),
                              ("rollout_engine", ROLLOUT_ENGINES), ("encoder", ENCODERS)):
            need(getattr(self, name) in choices, name, f"one of {choices}")
        names = _split_names(self.report_to)
        need(bool(names) and all(n in REPORT_TO for n in names), "report_to",
             f"one or several of {REPORT_TO}")
        need(len(names) == 1 or not {"auto", "none"} & set(names), "report_to", "'auto' or 'none' alone")
        for name in names:
            need(missing_tracker(name) is None, "report_to", f"installed trackers only ({missing_tracker(name)})")
        for name in ("prompts_per_step", "num_generations", "max_new_tokens", "generation_batch_size", "num_teachers",
                     "teacher_micro_batch_size", "max_steps", "micro_batch_size", "lora_r", "lora_alpha",
                     "num_train_problems", "num_eval_problems", "verifier_workers", "online_max_new", "online_cap",
                     "online_max_new_tokens"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "top_k", "online_update_every", "eval_every", "eval_samples", "save_every",
                     "log_completions", "max_consecutive_skipped_steps"):
            need(getattr(self, name) >= 0, name, "an integer >= 0")
        for name in ("temperature", "eval_temperature", "tau_g", "support_clip", "learning_rate",
                     "logprob_temperature", "verifier_timeout_s"):
            need(getattr(self, name) > 0, name, "a number > 0")
        for name in ("deadzone", "weight_decay", "max_grad_norm", "adam_epsilon"):
            need(getattr(self, name) >= 0, name, "a number >= 0")
        # An upper bound too: 1e30 passes "> 0" and ruins the weights in the first step.
        need(self.learning_rate <= 1, "learning_rate", "a number in (0, 1]")
        need(self.method != "grpo" or self.num_generations >= 2, "num_generations",
             "an integer >= 2 with method='grpo' (a group of one has no baseline)")
        need(0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        need(0 < self.vllm_gpu_memory_utilization < 1, "vllm_gpu_memory_utilization", "a number in (0, 1)")
        need(self.rollout_engine != "vllm" or self.device != "cpu", "rollout_engine", "'hf' when device is 'cpu'")
        for name, choices in (("rollout_seeding", ROLLOUT_SEEDINGS), ("vllm_mode", VLLM_MODES),
                              ("data_parallel", DATA_PARALLEL)):
            need(getattr(self, name) in choices, name, f"one of {choices}")
        self._validate_fsdp(need)
        for name in ("vllm_max_model_len", "vllm_server_port", "vllm_group_port"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        need(self.rollout_engine != "vllm" or self.vllm_mode == "server" or
             (self.model != "smollm2" and self.gguf_file is None), "model",
             "a Hugging Face id or a local model directory with a colocated vLLM engine (vLLM cannot load the "
             "bundled GGUF; e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
        need(0 <= self.ema_decay < 1, "ema_decay", "a number in [0, 1)")
        need(0 <= self.adam_beta1 < 1, "adam_beta1", "a number in [0, 1)")
        need(0 <= self.adam_beta2 < 1, "adam_beta2", "a number in [0, 1)")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)")
        need(0 <= self.opsd_beta <= 1, "opsd_beta", "a number in [0, 1]")
        need(0 <= self.online_success_threshold <= 1, "online_success_threshold", "a number in [0, 1]")
        need(self.opsd_entry_clip is None or self.opsd_entry_clip > 0, "opsd_entry_clip", "a number > 0 or none")
        need(self.dataset_limit is None or self.dataset_limit >= 1, "dataset_limit", "an integer >= 1 or none")
        need(self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1, "eval_max_new_tokens",
             "an integer >= 1 or none")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit",
             "an integer >= 1 or none")
        need(len(self.builtin_levels) > 0 and all(lv in TASK_LEVELS for lv in self.builtin_levels)
             and len(set(self.builtin_levels)) == len(self.builtin_levels), "builtin_levels",
             f"a non-empty list of distinct levels from {list(TASK_LEVELS)}")
        need(self.encoder not in ("sentence-transformers", "st") or self.encoder_model is not None, "encoder_model",
             "a model path or cached id when encoder='sentence-transformers'")
        for name in ("load_in_4bit", "load_in_8bit"):
            need(not getattr(self, name) or self.use_peft, name,
                 "false unless use_peft is true (quantized base weights are frozen: QLoRA trains a LoRA adapter)")
            need(not getattr(self, name) or importlib.util.find_spec("bitsandbytes") is not None, name,
                 "false: bitsandbytes is not installed (pip install bitsandbytes)")
        need(not (self.load_in_4bit and self.load_in_8bit), "load_in_8bit", "false when load_in_4bit is true")
        need(self.lora_target_modules.strip() != "", "lora_target_modules", "'all-linear' or module names")
        for name in ("dataset", "eval_dataset"):
            value = getattr(self, name)
            need(value == "builtin" or not _looks_like_file(value) or Path(value).exists(), name,
                 "'builtin', an existing JSONL/parquet file, or a Hugging Face dataset name")
        need(self.skill_bank == "starter" or Path(self.skill_bank).is_file(), "skill_bank",
             "'starter' or an existing .json/.db skill bank file")
        need(self.model == "smollm2" or not self.model.startswith((".", "/", "~")) or Path(self.model).exists(),
             "model", "'smollm2', a Hugging Face model id or an existing local directory")

    def prefix_sharing(self, *, student: bool = False) -> bool:
        """Whether a pass runs its batch's shared prompt prefix once (`share_prompt_prefix`).

        Never under data_parallel 'fsdp': every forward of a sharded policy is a collective, and
        whether a batch has a prefix to share depends on each rank's own prompts. Not for the
        student's update under gradient checkpointing: checkpointed layers drop the KV cache.
        """
        return (self.share_prompt_prefix and self.data_parallel != "fsdp"
                and not (student and self.gradient_checkpointing))

    def _validate_fsdp(self, need: Callable[[bool, str, str], None]) -> None:
        """What data_parallel 'fsdp' excludes. Every forward of a sharded policy is a collective of all
        ranks (each layer is all-gathered), so nothing may run the policy on one rank alone or an
        unequal number of times, and whatever reads whole weight tensors outside a forward would
        see this rank's shard only."""
        fsdp = self.data_parallel == "fsdp"
        need(self.fsdp_param_dtype is None or (fsdp and self.fsdp_param_dtype in DTYPES[1:]), "fsdp_param_dtype",
             f"none, or one of {DTYPES[1:]} with data_parallel 'fsdp'")
        if not fsdp:
            return
        need(self.teacher_params != "ema", "teacher_params",
             "'live' or 'frozen' with data_parallel 'fsdp' (the EMA teacher's copy of the weights is not sharded)")
        need(self.use_peft or self.teacher_params == "live", "teacher_params",
             "'live' with data_parallel 'fsdp' and use_peft false (a frozen teacher without LoRA is a whole "
             "unsharded copy of the model on every rank; with LoRA it is the base, adapter disabled)")
        for name in ("load_in_4bit", "load_in_8bit"):
            need(not getattr(self, name), name, "false with data_parallel 'fsdp' (bitsandbytes-quantized weights "
                 "are not sharded here)")
        need(self.rollout_engine == "hf", "rollout_engine",
             "'hf' with data_parallel 'fsdp' (the vLLM weight sync reads whole tensors, a rank holds shards)")
        need(self.online_update_every == 0, "online_update_every",
             "0 with data_parallel 'fsdp' (rank 0 alone writes the notes with the policy, whose forward needs "
             "every rank)")
        need(self.encoder != "policy", "encoder",
             "not 'policy' with data_parallel 'fsdp' (retrieval would run the sharded policy outside the "
             "passes every rank makes together)")

    # -- conversion ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. parsed YAML); unknown keys are an error that suggests the closest field.
        Deprecated field names (`DEPRECATED_FIELDS`) are renamed, with a FutureWarning, and `ALIASES` silently."""
        values = canonical_fields(values)
        check_field_names(values)
        return cls(**{k: coerce_field(k, v) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainConfig:
        return cls.from_dict(read_yaml(path))


def check_field_names(values: dict[str, Any], *, where: str = "") -> None:
    """ConfigError for the first key of `values` (canonical spellings) that is no TrainConfig field,
    suggesting the closest one; `where` prefixes the message (e.g. "--config 'x.yaml': ")."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}unknown config field {key!r}{hint}")


def canonical_fields(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with deprecated names (FutureWarning) and `ALIASES` replaced by our field names;
    a field given under two spellings is a ConfigError naming both."""
    out = rename_deprecated(values)
    for alias, name in ALIASES.items():
        if alias in out:
            if name in out:
                raise ConfigError(f"config fields {alias!r} and {name!r} are the same field; give only one")
            out[name] = out.pop(alias)
    return out


def _split_names(value: str) -> list[str]:
    return [n for n in value.replace(",", " ").split() if n]


def missing_tracker(name: str) -> str | None:
    """How to install tracker `name` when its package is missing (None when it is there or no package)."""
    package = TRACKER_PACKAGES.get(name)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return f"{name!r} needs the {package} package: pip install {package}, or pip install 'sgsd-fast[trackers]'"


def report_to_names(report_to: str) -> tuple[str, ...]:
    """The trackers a validated `report_to` value starts: 'auto' = TensorBoard when installed, 'none' = none."""
    names = _split_names(report_to)
    if names == ["auto"]:
        return ("tensorboard",) if importlib.util.find_spec("tensorboard") is not None else ()
    return tuple(n for n in names if n != "none")


def rename_deprecated(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with deprecated field names replaced by the current ones (one FutureWarning each).

    FutureWarning, not DeprecationWarning: the people who must act are the ones writing YAML files
    and command lines, and Python shows FutureWarning to them by default.
    """
    out = dict(values)
    for old, new in DEPRECATED_FIELDS.items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"config fields {old!r} (deprecated) and {new!r} are both given; keep only {new!r}")
        warnings.warn(f"config field {old!r} is deprecated; use {new!r}", FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def read_yaml(path: str | os.PathLike, *, what: str = "--config", allow_empty: bool = True) -> dict[str, Any]:
    """Read a YAML mapping of config fields. A missing, undecodable or malformed file, a non-mapping,
    or an empty file unless `allow_empty` (an empty --config overrides nothing; an empty saved
    config is damage), is a ConfigError naming `what` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}: file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: {str(p)!r} is not UTF-8 text ({err})") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{what}: {str(p)!r} is not valid YAML ({' '.join(str(err).split())})") from err
    if data is None and allow_empty:
        return {}
    if data is None:
        raise ConfigError(f"{what}: {str(p)!r} is empty (expected a mapping of field: value)")
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: {str(p)!r} must hold a mapping of field: value, got {type(data).__name__}")
    return data


def check_output_dir(path: str | os.PathLike) -> None:
    """Create the run directory if needed and prove it writable (a probe file), or raise ConfigError
    naming it: an unwritable directory would otherwise fail only after the model has loaded."""
    p = Path(path)
    probe = p / f".write-test-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"config field 'output_dir': {str(p)!r} is not a writable directory "
                          f"({err.strerror or err})") from err


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def coerce_field(name: str, value: Any) -> Any:
    """A YAML or command-line value converted to the type of config field `name` (ConfigError naming it)."""
    return _coerce(name, value, _field_types()[name], _FIELDS[name].metadata.get("multi", False))


def _looks_like_file(value: str) -> bool:
    return value.endswith((".jsonl", ".json", ".parquet")) or value.startswith((".", "/", "~"))


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None` annotations."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"config field {name!r}: expected true or false, got {value!r}")


def _list_items(value: Any) -> list[Any]:
    """A YAML list, a command-line `nargs='+'` list or a comma-separated string as its items."""
    values = value if isinstance(value, (list, tuple)) else [value]
    parts = [part for v in values for part in (v.split(",") if isinstance(v, str) else [v])]
    return [part.strip() if isinstance(part, str) else part for part in parts
            if not isinstance(part, str) or part.strip()]


def _coerce(name: str, value: Any, tp: Any, multi: bool = False) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise ConfigError naming the field.
    `multi`: a str field holding a comma-separated list, which also accepts a list (joined with ',')."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"config field {name!r}: must not be empty (expected {getattr(inner, '__name__', inner)})")
    try:
        if inner is bool:
            return _parse_bool(name, value)
        if typing.get_origin(inner) is list:
            (item,) = typing.get_args(inner)
            items = _list_items(value)
            if any(isinstance(v, (bool, list, dict)) for v in items):
                raise ValueError
            return [item(v) for v in items]
        if inner is str and multi and isinstance(value, (list, tuple)):
            items = _list_items(value)
            if not items or any(not isinstance(v, str) for v in items):
                raise ValueError
            return ",".join(items)
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        expected = getattr(inner, "__name__", str(inner))
        raise ConfigError(f"config field {name!r}: expected {expected}{' or none' if optional else ''}, "
                          f"got {value!r}") from None
    return value


def _check_types(cfg: TrainConfig) -> None:
    """Catch wrongly typed values passed from Python (YAML/CLI values are coerced before)."""
    hints = _field_types()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        inner, optional = _base_type(hints[f.name])
        if value is None:
            if not optional:
                raise ConfigError(f"config field {f.name!r}: must not be none")
            continue
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str)}.get(inner, lambda v: isinstance(v, list))(value)
        if not ok:
            raise ConfigError(f"config field {f.name!r}: expected {getattr(inner, '__name__', inner)}, "
                              f"got {value!r} ({type(value).__name__})")


# ---- command line ----------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, only: Collection[str] | None = None) -> None:
    """One `--field VALUE` option per config field, defaults suppressed so only given ones override.

    As in HfArgumentParser: a bare boolean flag means true (`--use_peft`), list fields and the
    comma-list fields take several values (`--lora_target_modules q_proj v_proj`), and the
    `ALIASES` are extra spellings of the same option (listed in --help next to ours).
    only: the fields to offer (default all), for commands that read a few (`sgsd-fast plan`).
    """
    hints = typing.get_type_hints(TrainConfig)
    aliases: dict[str, list[str]] = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(f"--{alias}")
    group = parser.add_argument_group("config fields (override the YAML file; HF/TRL aliases after a comma)")
    for f in dataclasses.fields(TrainConfig):
        if only is not None and f.name not in only:
            continue
        inner, optional = _base_type(hints[f.name])
        is_list = typing.get_origin(inner) is list or f.metadata.get("multi", False)
        metavar = "VALUE" if is_list else {bool: "true|false", int: "INT", float: "FLOAT", str: "STR"}[inner]
        if optional:
            metavar += "|none"
        kw: dict[str, Any] = {"nargs": "?", "const": "true"} if inner is bool else {"nargs": "+"} if is_list else {}
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        group.add_argument(f"--{f.name}", *aliases.get(f.name, []), dest=f.name, default=argparse.SUPPRESS,
                           metavar=metavar, help=f"{f.metadata['help']} (default: {default})".replace("%", "%%"),
                           **kw)
    for old, new in DEPRECATED_FIELDS.items():
        if only is not None and new not in only:
            continue
        group.add_argument(f"--{old}", dest=old, default=argparse.SUPPRESS, metavar="STR",
                           help=f"Deprecated alias of --{new}.")


def config_from_args(ns: argparse.Namespace, base: dict[str, Any] | None = None) -> TrainConfig:
    """Merge: dataclass defaults < `base` (e.g. a checkpoint's config) < --config YAML < command-line fields.

    Deprecated names and aliases are renamed within each source before merging, so a newer source's
    value wins whichever spelling either source used (an old checkpoint's `teacher_weights` <
    `--teacher_params`, a YAML `model_name_or_path` < `--model`).
    """
    values: dict[str, Any] = canonical_fields(base or {})
    if getattr(ns, "config", None):
        values.update(canonical_fields(read_yaml(ns.config)))
    names = {f.name for f in dataclasses.fields(TrainConfig)} | set(DEPRECATED_FIELDS)
    values.update(canonical_fields({k: v for k, v in vars(ns).items() if k in names}))
    return TrainConfig.from_dict(values)


def parse_config(argv: list[str]) -> TrainConfig:
    """`--config file.yaml --key value ...` -> validated TrainConfig (convenience for scripts and tests)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config", default=None)
    add_config_arguments(parser)
    ns, rest = parser.parse_known_args(argv)
    if rest:
        raise ConfigError(f"unknown command-line option(s) {rest}; see `sgsd-fast train --help`")
    return config_from_args(ns)
