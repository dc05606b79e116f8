"""Expected peak memory of one training process, by component, from the model config alone.

    settings = plan_settings({"model": "Qwen/Qwen3-1.7B", "max_new_tokens": 4096, "load_in_4bit": True})
    shape = resolve_model_shape(settings.cfg.model)      # sgsd_fast.train.shapes: sizes from the config
    plan = estimate(shape, settings)                     # a MemoryPlan, in bytes
    longest, at_context_limit = largest_rollout(shape, settings)   # the max_new_tokens that still fits

What coexists (how `Trainer.train_step` runs, `sgsd_fast.train.trainer`):

* **static**, alive the whole run: the base weights, the LoRA adapter, the optimizer state (created
  by the first step), a teacher copy (``frozen`` / ``ema`` without LoRA keep a full copy of the model).
* then one **phase** at a time, each freeing its tensors before the next starts:
  generation (HF ``generate``: KV cache of `generation_batch_size` rollouts), evaluation (the same at
  the evaluation batch and length), teachers (no-grad forwards of `teacher_micro_batch_size`
  sequences, one teacher at a time, each reduced to log-probs at once), update (gradients, which
  ``zero_grad(set_to_none=True)`` frees after the step, plus one micro-batch's activations and the
  fused loss workspace; or the optimizer step). With several micro-batches all gradients exist
  while the later ones run; with one, each block's gradients appear as its backward frees its
  activations, so they overlap as max(activations, gradients).

peak allocated = static + the largest phase; what the card must hold adds the CUDA context and a
fragmentation margin. Every rollout is assumed to reach `max_new_tokens` (the micro-batch pads to its
longest completion, so one long rollout costs as much as all of them).

Numbers and where they come from:

* dtypes: the weights in `dtype` ('auto' = bf16 on CUDA, fp32 on CPU); LoRA adapters in fp32 (peft
  upcasts bf16/fp16 adapters); a 4/8-bit base keeps embeddings, lm_head, norms and biases in fp32
  (peft's ``prepare_model_for_kbit_training`` upcasts them), so its residual stream, activations and
  KV cache are fp32 too. NF4 with double quantization: 0.5 B per weight + one uint8 absmax per
  64-block + one fp32 absmax per 256 blocks; LLM.int8: 1 B per weight + an fp32 scale per output row.
* optimizer state per trainable tensor: torch AdamW 2 states in the parameter's dtype; bitsandbytes
  8-bit AdamW 2 uint8 states + an fp32 absmax per 256-block (+ two 256-entry maps), but fp32 states
  for tensors under 4,096 elements (its ``min_8bit_size``).
* activations (`saved_bytes_per_token`): the tensors a Llama / Qwen block with SDPA saves for backward,
  counted term by term from transformers' modules (tests/test_plan.py checks the count against
  autograd's saved tensors of a real tiny model, exactly).
* the fused loss: `sgsd_fast.ops` never builds N x V logits; its workspace is bounded by
  `workspace_bytes` (256 MiB on CUDA, 32 MiB on CPU), plus the lm_head gradient when the lm_head is
  trained (full fine-tuning).
* CUDA context: `CUDA_CONTEXT_BYTES`; caching-allocator fragmentation: `FRAGMENTATION` of the phase.
  Both are assumptions (typical values), not measured here.

Checked on CPU against measured peak memory of real training steps (benchmarks/plan_validation.py,
results in benchmarks/results/plan_validation.md); LLM.int8 bases and the GPU-only pieces (the
Triton workspace, flash-attn, the CUDA context) are modelled from the code, not measured.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sgsd_fast.config import ConfigError, TrainConfig, canonical_fields
from sgsd_fast.ops.linear_divergence import DEFAULT_WORKSPACE_BYTES as DIVERGENCE_WORKSPACE_BYTES
from sgsd_fast.ops.linear_logprobs import DEFAULT_WORKSPACE_BYTES as LOGPROBS_WORKSPACE_BYTES
from sgsd_fast.ops.linear_logprobs import _cpu_blocks
from sgsd_fast.train.shapes import LINEAR_NAMES, ModelShape

GiB = 2**30
#: A torch CUDA context with cuBLAS loaded: typically 0.3-1 GB depending on GPU and driver; not
#: counted by torch.cuda.max_memory_allocated, but it takes room on the card.
CUDA_CONTEXT_BYTES = 512 * 2**20
#: Reserved-but-unused memory of the caching allocator, as a share of the peak phase: the phases
#: allocate tensors of changing sizes (the KV cache grows by torch.cat every token), the static
#: weights and states are allocated once. An assumption, not a measurement.
FRAGMENTATION = 0.10
#: bitsandbytes 8-bit optimizers keep fp32 state for tensors smaller than this (min_8bit_size).
BNB_MIN_8BIT_SIZE = 4096
_BNB_BLOCK = 256  # elements per absmax block of the 8-bit optimizer states
_NF4_BLOCK = 64  # elements per absmax block of NF4 weights (bitsandbytes' default blocksize)

#: The TrainConfig fields that change memory (read from --config YAML files and flags; the others are ignored).
PLAN_FIELDS = ("model", "dtype", "device", "attn_implementation", "gradient_checkpointing", "use_peft", "lora_r",
               "lora_target_modules", "load_in_4bit", "load_in_8bit", "method", "optim", "prompts_per_step",
               "num_generations", "max_new_tokens", "generation_batch_size", "micro_batch_size", "num_teachers",
               "teacher_params", "teacher_micro_batch_size", "num_eval_problems", "eval_samples",
               "eval_max_new_tokens")
_QUANT_FIELDS = ("load_in_4bit", "load_in_8bit")
_TEACHER_METHODS = {"sgsd": "num_teachers", "opsd": 1, "sampled_rkl": 1}  # teachers per rollout
_FLASH = ("flash_attention_2", "flash_attention_3")


@dataclass(frozen=True)
class PlanSettings:
    """A run to plan: its training config plus what only the plan needs.

    cfg: the TrainConfig (only `PLAN_FIELDS` matter). load_in_4bit / load_in_8bit live here, not in
    cfg, because TrainConfig refuses them where bitsandbytes is not installed, and a plan for a GPU
    machine is often made on another one.
    prompt_length: tokens of the longest student prompt (prompts are left-padded to it).
    teacher_prompt_length: tokens of the longest teacher prompt (None = 3 x prompt_length: a teacher
    prompt adds the skill / mistake notes or the reference answer).
    gpu_memory_gb: memory of the card in GiB (2**30 bytes; nvidia-smi's MiB / 1024).
    """

    cfg: TrainConfig = field(default_factory=TrainConfig)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    prompt_length: int = 256
    teacher_prompt_length: int | None = None
    gpu_memory_gb: float = 24.0

    def __post_init__(self) -> None:
        for name in ("prompt_length", "teacher_prompt_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name}: expected an integer >= 1, got {value!r}")
        gb = self.gpu_memory_gb
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
            raise ConfigError(f"--gpu_memory_gb: expected a number > 0 (GiB), got {gb!r}")
        for name in _QUANT_FIELDS:
            if getattr(self, name) and not self.cfg.use_peft:
                raise ConfigError(f"config field {name!r}: expected false unless use_peft is true (quantized base "
                                  f"weights are frozen: QLoRA trains a LoRA adapter), got True")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("config field 'load_in_8bit': expected false when load_in_4bit is true, got True")
        if self.cfg.attn_implementation not in ("auto", "sdpa", *_FLASH):
            raise ConfigError(f"config field 'attn_implementation': the planner models 'sdpa' and "
                              f"{' / '.join(_FLASH)}, got {self.cfg.attn_implementation!r}")
        lora_targets(self.cfg)  # names checked here, not at the first estimate

    @property
    def teacher_prompt(self) -> int:
        return self.teacher_prompt_length or 3 * self.prompt_length


def plan_settings(values: Mapping[str, Any], **plan: Any) -> PlanSettings:
    """PlanSettings from TrainConfig field values (YAML / command-line spellings and aliases accepted;
    fields outside `PLAN_FIELDS` are ignored) and the plan-only keywords of `PlanSettings`.

    The values are validated by TrainConfig itself, so a bad one fails with the same one-line message
    naming the field as `sgsd-fast train` would give.
    """
    from sgsd_fast.config import coerce_field

    values = {k: v for k, v in canonical_fields(dict(values)).items() if k in PLAN_FIELDS}
    quant = {k: coerce_field(k, values.pop(k)) for k in _QUANT_FIELDS if k in values}
    return PlanSettings(cfg=TrainConfig.from_dict(values), **quant, **plan)


# ---- the pieces ---------------------------------------------------------------------------------


def lora_targets(cfg: TrainConfig) -> tuple[str, ...]:
    """The block projections LoRA adapts ('all-linear' = all seven; peft leaves the lm_head out)."""
    if cfg.lora_target_modules.strip() == "all-linear":
        return LINEAR_NAMES
    names = tuple(n for n in cfg.lora_target_modules.replace(",", " ").split() if n)
    unknown = sorted(set(names) - set(LINEAR_NAMES))
    if unknown:
        raise ConfigError(f"config field 'lora_target_modules': the planner knows the block projections "
                          f"{list(LINEAR_NAMES)} or 'all-linear', got {unknown}")
    return names


def lora_tensors(shape: ModelShape, r: int, targets: tuple[str, ...]) -> list[int]:
    """Element counts of the LoRA tensors: per layer and target, A [r, in] and B [out, r]."""
    linears = shape.linears()
    return [n for _ in range(shape.num_layers) for t in targets for n in (r * linears[t][0], linears[t][1] * r)]


def model_tensors(shape: ModelShape) -> list[int]:
    """Element counts of every parameter tensor (what full fine-tuning trains and its optimizer holds)."""
    h = shape.hidden_size
    per_layer = [a * b for a, b in shape.linears().values()] + [h, h]
    if shape.qk_norm:
        per_layer += [shape.head_dim, shape.head_dim]
    if shape.qkv_bias:
        per_layer += [shape.q_dim, shape.kv_dim, shape.kv_dim]
    heads = [shape.vocab_size * h] * (1 if shape.tied else 2)
    return heads + per_layer * shape.num_layers + [h]


def weight_bytes(shape: ModelShape, dtype_bytes: int, quant: str | None) -> int:
    """Bytes of the base model's parameters (quant: None, '4bit' or '8bit', block projections only)."""
    if quant is None:
        return shape.param_count() * dtype_bytes
    quantized = 0
    for n_in, n_out in shape.linears().values():
        n = n_in * n_out
        if quant == "4bit":
            blocks = math.ceil(n / _NF4_BLOCK)
            # packed 4-bit pairs, uint8 absmax per block, fp32 absmax per 256 blocks (double quantization)
            quantized += n // 2 + blocks + 4 * math.ceil(blocks / 256)
        else:
            quantized += n + 4 * n_out  # int8 weights + an fp32 scale per output row
    return quantized * shape.num_layers + 4 * shape.other_param_count()


def optimizer_state_bytes(numels: list[int], param_bytes: int, optim: str) -> int:
    """AdamW state of tensors with these element counts: torch (2 states in the parameter dtype) or
    bitsandbytes 8-bit (2 uint8 states + fp32 absmax per 256 + two 256-entry fp32 maps; fp32 states
    below `BNB_MIN_8BIT_SIZE` elements)."""
    if optim == "adamw_torch":
        return 2 * param_bytes * sum(numels)
    total = 0
    for n in numels:
        if n < BNB_MIN_8BIT_SIZE:
            total += 2 * 4 * n
        else:
            total += 2 * (n + 4 * math.ceil(n / _BNB_BLOCK) + 4 * 256)
    return total


def saved_bytes_per_token(shape: ModelShape, act_bytes: int, *, trains_weights: bool, lora: tuple[str, ...] = (),
                          lora_r: int = 0, quant: str | None = None, flash: bool = False) -> int:
    """Bytes one decoder block saves for backward per token (the per-layer attention mask is extra).

    Counted from transformers' Llama / Qwen2 / Qwen3 modules; a = `act_bytes` (the residual stream's
    dtype), h = hidden, q = heads * d, kv = kv_heads * d, i = intermediate:

    * RMSNorm computes in fp32: each of the 2 norms (+ Qwen3's q_norm / k_norm over q and kv) saves its
      fp32 input and the fp32 1/rms per row: 4 * (2h [+ q + kv]) + 4 * (2 [+ heads + kv_heads]);
    * attention (SDPA): q, k, v (k and v repeated to all heads, since transformers repeats them when an
      attention mask is passed; flash-attn keeps kv), the output, an fp32 log-sum-exp per head:
      a * (q + 2q + q) + 4 * heads;
    * SwiGLU MLP: the gate output, its SiLU and the up output: 3 i * a;
    * trained weights (full fine-tuning) also save each projection's input (q/k/v share one, gate/up
      one; o_proj's is the attention output, already counted) and each norm's normalized input for
      its weight's gradient: a * (h + h + i) + a * (2h [+ q + kv]);
    * LoRA: each adapted projection saves A's output (4r, fp32) and its input for A's gradient: the
      shared input itself in an fp32 stream, else its own fp32 copy (peft casts the input to the
      adapter's fp32 per module: 4 * in_features each). LLM.int8 layers save their (fp32) inputs too.

    Frozen weights save no inputs (autograd keeps a matmul's input only when the weight needs a
    gradient), which is why LoRA on a bf16 base costs mostly its fp32 input copies.
    """
    h, i, q, kv, a = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim, act_bytes
    norm_width = 2 * h + (q + kv if shape.qk_norm else 0)
    norm_rows = 2 + (shape.num_heads + shape.num_kv_heads if shape.qk_norm else 0)
    total = 4 * norm_width + 4 * norm_rows
    total += a * (q + (2 * kv if flash else 2 * q) + q) + 4 * shape.num_heads
    total += 3 * i * a
    linears = shape.linears()
    # Inputs by owner: q/k/v read the first norm's output, gate/up the second's; o_proj reads the
    # attention output (saved by SDPA already when it is in the same dtype).
    groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
              "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in"}
    width = {"attn_in": h, "attn_out": q, "mlp_in": h, "down_in": i}
    if trains_weights:
        total += a * (h + h + i) + a * norm_width
        return total
    total += 4 * lora_r * len(lora)
    if a == 4:
        saved = {groups[t] for t in lora} | (set(groups.values()) if quant == "8bit" else set())
        total += 4 * sum(width[g] for g in saved if g != "attn_out")
    else:
        total += 4 * sum(linears[t][0] for t in lora)
    return total


def outside_saved_bytes_per_token(shape: ModelShape, act_bytes: int, *, trains_weights: bool) -> int:
    """Saved for backward per token outside the blocks: the final norm's fp32 input and 1/rms (and
    its normalized input when its weight trains), RoPE cos / sin (one pair shared by all layers), and
    the token ids when the embedding trains."""
    h, a = shape.hidden_size, act_bytes
    return 4 * h + 4 + 2 * shape.head_dim * a + ((a * h + 8) if trains_weights else 0)


def _forward_transient_per_token(shape: ModelShape, a: int, *, lora_copy: bool, flash: bool) -> int:
    """Largest set of tensors alive at once inside one block of a no-grad forward (teachers, prefill),
    per token: the residual stream and a norm output plus either attention (q, k, v, their rotated
    copies, k / v repeated to all heads, the output) or the MLP (gate SiLU, up, product), or a norm's
    fp32 copies; `lora_copy`: peft's fp32 copy of a projection input (bf16 base under LoRA)."""
    h, i, q, kv = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    attn = a * (2 * h + 2 * (q + 2 * kv) + (0 if flash else 2 * q) + q) + (4 * h if lora_copy else 0)
    mlp = a * (2 * h + 3 * i) + (4 * i if lora_copy else 0)
    norm = a * 2 * h + 4 * 2 * h
    return max(attn, mlp, norm)


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One line of the plan: `bytes` alive in `phase` ('static', a phase name, or 'overhead')."""

    name: str
    phase: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate: components (those of each phase summing to that phase's peak moment), the
    phases' totals (on top of static), and the verdict for `gpu_bytes`.

    peak_allocated_bytes is what torch.cuda.max_memory_allocated would report (on CPU: the process's
    resident growth); total_bytes adds the CUDA context and the fragmentation margin.
    """

    model: str
    components: tuple[Component, ...]
    phases: dict[str, int]
    peak_phase: str
    static_bytes: int
    peak_allocated_bytes: int
    total_bytes: int
    gpu_bytes: int
    details: dict[str, Any]

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        return out


def _resolved(settings: PlanSettings) -> dict[str, Any]:
    """device, dtype bytes, activation bytes, optimizer and quantization as the run would resolve them."""
    cfg = settings.cfg
    device = "cpu" if cfg.device == "cpu" else "cuda"  # 'auto' plans for the GPU the memory size is given for
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    w = torch.finfo(getattr(torch, dtype)).bits // 8
    quant = "4bit" if settings.load_in_4bit else "8bit" if settings.load_in_8bit else None
    # 'auto' = 8-bit AdamW where bitsandbytes is installed (Linux, Windows), paged on CUDA: same bytes.
    optim = cfg.optim if cfg.optim != "auto" else ("paged_adamw_8bit" if device == "cuda" else "adamw_8bit")
    return {"device": device, "dtype": dtype, "weight_bytes": w, "act_bytes": 4 if quant else w, "quant": quant,
            "optim": optim, "flash": cfg.attn_implementation in _FLASH}


def _loss_workspace(shape: ModelShape, r: dict[str, Any], n: int, method: str, head_trained: bool) -> dict[str, int]:
    """Bytes of the fused loss of a micro-batch of n completion tokens: {'forward', 'backward'}
    (workspace + row copies + the lm_head gradient when trained, also given alone as 'head_grad');
    'naive' = one n x V fp32 logit matrix, what the unfused path would hold (at least) instead."""
    h, v, a, w = shape.hidden_size, shape.vocab_size, r["act_bytes"], r["weight_bytes"]
    head = 4 if r["quant"] else w  # the unquantized lm_head (fp32 under a 4/8-bit base)
    rows_copy = n * h * a  # ignored rows compacted away before any GEMM
    dw = (v * h * 4 + (v * h * head if head != 4 else 0)) if head_trained else 0  # fp32 sum, then cast
    if method == "opsd":
        row_bytes = 3 * v * 4 + (v * head if r["device"] == "cuda" and head != 4 else 0)
        chunk = max(1, min(n, DIVERGENCE_WORKSPACE_BYTES // row_bytes))
        # The gradient is formed in the forward: fp32 dX for all rows; off CUDA half weights are upcast once.
        upcast = v * h * 4 if r["device"] == "cpu" and head != 4 else 0
        fwd = chunk * row_bytes + n * h * 4 + 2 * rows_copy + upcast + (v * h * 4 if head_trained else 0)
        return {"forward": fwd, "backward": n * h * a + dw, "naive": n * v * 4, "head_grad": dw}
    if r["device"] == "cpu":
        rows, tile = _cpu_blocks(v, getattr(torch, r["dtype"]) if not r["quant"] else torch.float32,
                                 LOGPROBS_WORKSPACE_BYTES["cpu"])
        block = min(rows, n) * tile * 4 + min(rows, n) * h * 4  # logit block + the fp32 rows it reads
        fwd = block + rows_copy
    else:
        per_row = v * 4 + (v * head if head != 4 else 0)
        block = max(1, min(n, LOGPROBS_WORKSPACE_BYTES["cuda"] // per_row)) * per_row
        fwd = rows_copy + 16 * n  # per-row partial maxima and sums of the vocabulary splits
    # backward: the compacted rows again, dX and its scatter into the full [N, H] gradient
    return {"forward": fwd, "backward": block + 3 * rows_copy + dw, "naive": n * v * 4, "head_grad": dw}


def _activations(shape: ModelShape, r: dict[str, Any], settings: PlanSettings, b: int, length: int,
                 checkpointing: bool) -> int:
    """Activation bytes of the student forward of b sequences of `length` tokens, kept for backward."""
    cfg, a = settings.cfg, r["act_bytes"]
    trains = not cfg.use_peft
    per_token = saved_bytes_per_token(shape, a, trains_weights=trains, lora=() if trains else lora_targets(cfg),
                                      lora_r=cfg.lora_r, quant=r["quant"], flash=r["flash"])
    tokens = b * length
    # SDPA turns transformers' bool [b, 1, L, L] padding mask into a float bias in every layer and saves it.
    layer_mask = 0 if r["flash"] else b * length * length * a
    bool_mask = 0 if r["flash"] else b * length * length
    # + the final hidden states, which the loss keeps for its backward
    outside = (outside_saved_bytes_per_token(shape, a, trains_weights=trains) + shape.hidden_size * a) * tokens \
        + bool_mask
    layer = per_token * tokens + layer_mask
    if not checkpointing:
        return shape.num_layers * layer + outside
    # Each checkpointed block keeps its input; backward recomputes one block at a time.
    return shape.num_layers * shape.hidden_size * a * tokens + layer + outside


def _generation(shape: ModelShape, r: dict[str, Any], settings: PlanSettings, b: int, new_tokens: int,
                sampling: bool) -> list[Component]:
    """The peak moment of HF generate for b prompts: the prefill, or the last decode step."""
    a, p = r["act_bytes"], settings.prompt_length
    kv_token = 2 * shape.num_layers * shape.kv_dim * a
    lora_copy = settings.cfg.use_peft and a != 4
    prefill_layers = _forward_transient_per_token(shape, a, lora_copy=lora_copy, flash=r["flash"]) * b * p
    prefill_masks = 0 if r["flash"] else b * p * p * (1 + a)
    length = p + new_tokens
    # DynamicCache grows by torch.cat: one layer's K (or V) exists twice for a moment; with a mask SDPA
    # gets K and V repeated to all heads (one layer at a time).
    regrow = b * length * shape.kv_dim * a
    repeat = 0 if r["flash"] else 2 * b * length * shape.q_dim * a
    # Logits of the last position in the model dtype, their fp32 copy; sampling adds temperature,
    # top-k / top-p (a sort: values and int64 indices) and softmax [b, V] tensors.
    logits = b * shape.vocab_size * (a + 4 + (4 * 3 + 8 if sampling else 0))
    prefill = [Component("KV cache (prompt)", "", b * p * kv_token, f"{b} x {p} tokens"),
               Component("prefill forward", "", prefill_layers + prefill_masks, "one block's tensors + masks")]
    decode = [Component("KV cache", "", b * length * kv_token,
                        f"{b} x {length} tokens x {kv_token} B (2 x layers x kv_heads x head_dim x {a} B)"),
              Component("decode step", "", regrow + repeat + logits, "cache regrowth, repeated K/V, sampling")]
    return max(prefill, decode, key=lambda cs: sum(c.bytes for c in cs))


def estimate(shape: ModelShape, settings: PlanSettings, *, max_new_tokens: int | None = None) -> MemoryPlan:
    """The memory plan of `settings` on `shape` (max_new_tokens overrides the config's, e.g. for a search)."""
    cfg = settings.cfg
    r = _resolved(settings)
    a, w, quant = r["act_bytes"], r["weight_bytes"], r["quant"]
    t = max_new_tokens if max_new_tokens is not None else cfg.max_new_tokens
    t_eval = cfg.eval_max_new_tokens or t
    rollouts = cfg.prompts_per_step * cfg.num_generations
    targets = () if not cfg.use_peft else lora_targets(cfg)

    # ---- static
    trainable = lora_tensors(shape, cfg.lora_r, targets) if cfg.use_peft else model_tensors(shape)
    param_bytes = 4 if cfg.use_peft else w  # adapters are fp32; full fine-tuning trains the dtype itself
    weights = weight_bytes(shape, w, quant)
    adapter = 4 * sum(trainable) if cfg.use_peft else 0
    k_teachers = _TEACHER_METHODS.get(cfg.method)
    if isinstance(k_teachers, str):
        k_teachers = getattr(cfg, k_teachers)
    copy, copy_note = 0, "no copy"
    if k_teachers and cfg.teacher_params != "live" and not cfg.use_peft:
        copy, copy_note = weights, "a full model copy"
    elif k_teachers and cfg.teacher_params == "ema":
        copy, copy_note = adapter, "an EMA copy of the adapter"
    quant_note = {"4bit": "NF4 + double-quant absmax, lm_head/embeddings/norms fp32",
                  "8bit": "LLM.int8, lm_head/embeddings/norms fp32"}.get(quant, r["dtype"])
    static = [
        Component("base weights", "static", weights, f"{shape.param_count() / 1e9:.3f} B params, {quant_note}"),
        Component("LoRA adapter", "static", adapter,
                  f"r={cfg.lora_r} on {len(targets)} projections x {shape.num_layers} layers, fp32" if adapter else
                  "full fine-tuning"),
        Component("optimizer state", "static", optimizer_state_bytes(trainable, param_bytes, r["optim"]),
                  f"{r['optim']} over {sum(trainable) / 1e6:.1f} M trainable params"),
        Component("teacher copy", "static", copy, f"teacher_params={cfg.teacher_params}: {copy_note}"),
    ]

    phases: dict[str, list[Component]] = {}
    # ---- generation: training rollouts, and the held-out evaluation at its own batch and length
    gen_b = min(cfg.generation_batch_size, rollouts)
    phases["generation"] = _generation(shape, r, settings, gen_b, t, sampling=True)
    eval_b = min(cfg.generation_batch_size, cfg.num_eval_problems * max(1, cfg.eval_samples))
    phases["evaluation"] = _generation(shape, r, settings, eval_b, t_eval, sampling=cfg.eval_samples > 0)

    # ---- teachers: one no-grad forward of teacher_micro_batch_size sequences at a time
    micro = min(cfg.micro_batch_size, rollouts)
    opsd_payload = rollouts * t * shape.hidden_size * a if cfg.method == "opsd" else 0
    if k_teachers:
        tb, tl = min(cfg.teacher_micro_batch_size, rollouts), settings.teacher_prompt + t
        lora_copy = cfg.use_peft and a != 4
        layers = _forward_transient_per_token(shape, a, lora_copy=lora_copy, flash=r["flash"]) * tb * tl
        masks = 0 if r["flash"] else tb * tl * tl * (1 + a)
        # The last hidden states, then (not for OPSD, which keeps them) their reduction to log-probs.
        reduce = 0 if cfg.method == "opsd" else _loss_workspace(shape, r, tb * t, "sgsd", False)["forward"]
        states = tb * tl * shape.hidden_size * a + reduce
        scores = rollouts * k_teachers * t * 4
        ema_backup = adapter if cfg.use_peft and cfg.teacher_params == "ema" else 0
        # OPSD keeps every micro-batch's hidden states (views of the full [tb, tl, H]), then concatenates.
        kept = rollouts * (tl + t) * shape.hidden_size * a if cfg.method == "opsd" else scores
        phases["teachers"] = [
            Component("teacher forward", "", max(layers + masks, states),
                      f"{tb} x {tl} tokens, one of {k_teachers} teacher(s) at a time"),
            Component("teacher outputs", "", kept + ema_backup,
                      "all rollouts' hidden states (OPSD)" if cfg.method == "opsd" else "[B, K, T] fp32 log-probs"),
        ]

    # ---- update: gradients + one micro-batch's activations and loss, or the optimizer step
    length = settings.prompt_length + t
    acts = _activations(shape, r, settings, micro, length, cfg.gradient_checkpointing)
    loss = _loss_workspace(shape, r, micro * t, cfg.method, head_trained=not cfg.use_peft)
    grads = param_bytes * sum(trainable)
    # Backward through one block: the gradients of its MLP and residual stream (fp32 in the LoRA path).
    g = 4 if cfg.use_peft else a
    block_grads = g * (2 * shape.intermediate_size + 2 * shape.hidden_size) * micro * length
    embed_grad = shape.vocab_size * shape.hidden_size * w if not cfg.use_peft else 0  # dense [V, H]
    # A tied lm_head's gradient from the loss waits for the embedding's before both are summed.
    head_held = embed_grad if shape.tied else 0
    layer_grads = grads - embed_grad * (1 if shape.tied else 2)
    # With several micro-batches every gradient exists while the later ones run; with one, each block's
    # gradients appear as its backward frees its activations, so the two overlap only as max(A, G).
    accumulates = rollouts > micro
    step_tmp = 0
    if r["optim"] == "adamw_torch":
        # torch's foreach AdamW (the CUDA default) allocates one sqrt(v) per parameter at once.
        step_tmp = param_bytes * (sum(trainable) if r["device"] == "cuda" else max(trainable))
    grad_note = "fp32 adapter grads" if cfg.use_peft else f"{r['dtype']} grads"
    all_grads = Component("gradients", "", grads, grad_note + (", kept across micro-batches" if accumulates else ""))
    no_grads = Component("gradients", "", 0, "not yet (one micro-batch: created in the backward)")
    early = all_grads if accumulates else no_grads
    act = Component("activations", "", acts, f"micro-batch {micro} x {length} tokens, "
                    f"{'with' if cfg.gradient_checkpointing else 'without'} checkpointing")
    block = Component("backward transient", "", block_grads + head_held,
                      "one block's gradients" + (" + the tied lm_head's, held" if head_held else ""))
    moments = {
        "loss forward": [early, act, Component("loss workspace", "", loss["forward"],
                                               f"fused log-probs of {micro * t} tokens, no N x V logits")],
        "loss backward": [early, act, Component("loss workspace", "", loss["backward"],
                                                f"fused backward of {micro * t} tokens" +
                                                (" + lm_head gradient" if loss["head_grad"] else ""))],
        "block backward": [all_grads if accumulates else
                           Component("gradients", "", max(0, layer_grads - acts) + (0 if shape.tied else embed_grad),
                                     grad_note + ", as the backward frees activations"), act, block],
        "embedding backward": [all_grads, Component("embedding gradient", "", (embed_grad if accumulates or shape.tied
                                                                               else 0) + (head_held if accumulates
                                                                                          else 0),
                                                    "dense [V, H] before it is summed into .grad")],
        "optimizer step": [all_grads, Component("optimizer step", "", step_tmp, "foreach AdamW: sqrt(v) of all")],
    }
    moment = max(moments, key=lambda m: sum(c.bytes for c in moments[m]))
    update = list(moments[moment])
    if opsd_payload:
        update.append(Component("teacher hidden states", "", opsd_payload, "OPSD payload, all rollouts"))
    phases["update"] = update

    totals = {name: sum(c.bytes for c in cs) for name, cs in phases.items()}
    peak_phase = max(totals, key=totals.get)
    static_bytes = sum(c.bytes for c in static)
    peak = static_bytes + totals[peak_phase]
    overhead = [Component("CUDA context", "overhead", CUDA_CONTEXT_BYTES if r["device"] == "cuda" else 0,
                          "assumed" if r["device"] == "cuda" else "none on CPU"),
                Component("fragmentation margin", "overhead", int(FRAGMENTATION * totals[peak_phase]),
                          f"{FRAGMENTATION:.0%} of the peak phase (assumed)")]
    components = static + [dataclasses.replace(c, phase=name) for name, cs in phases.items() for c in cs] + overhead
    other = _activations(shape, r, settings, micro, length, not cfg.gradient_checkpointing)
    details = {
        **{k: v for k, v in r.items() if k not in ("weight_bytes", "act_bytes")},
        "max_new_tokens": t, "eval_max_new_tokens": t_eval, "prompt_length": settings.prompt_length,
        "teacher_prompt_length": settings.teacher_prompt, "rollouts_per_step": rollouts,
        "generation_batch": gen_b, "evaluation_batch": eval_b, "micro_batch": micro,
        "update_moment": moment,
        "update_moments": {m: sum(c.bytes for c in cs) for m, cs in moments.items()},
        "activations_with_checkpointing": acts if cfg.gradient_checkpointing else other,
        "activations_without_checkpointing": other if cfg.gradient_checkpointing else acts,
        "naive_logits_bytes": loss["naive"], "head_grad_bytes": loss["head_grad"],
        "fused_loss_bytes": max(loss["forward"], loss["backward"] - loss["head_grad"]),
    }
    return MemoryPlan(model=shape.name, components=tuple(components), phases=totals, peak_phase=peak_phase,
                      static_bytes=static_bytes, peak_allocated_bytes=peak,
                      total_bytes=peak + sum(c.bytes for c in overhead), gpu_bytes=int(settings.gpu_memory_gb * GiB),
                      details=details)


def largest_rollout(shape: ModelShape, settings: PlanSettings) -> tuple[int, bool]:
    """(largest max_new_tokens whose plan fits the card, whether that is the search cap), by bisection.

    The cap is the model's context minus the longest prompt, the teachers' when the method has them
    (2**20 tokens when the config gives no limit); (0, False) when not even one token fits. Memory
    grows with the rollout length in every component, so the fit is monotone and bisection is exact.
    """
    teachers = settings.cfg.method in _TEACHER_METHODS
    prompt = max(settings.prompt_length, settings.teacher_prompt if teachers else 0)
    cap = (shape.max_positions - prompt) if shape.max_positions else 2**20
    if cap < 1 or not estimate(shape, settings, max_new_tokens=1).fits:
        return 0, False
    if estimate(shape, settings, max_new_tokens=cap).fits:
        return cap, True
    good, bad = 1, cap
    while bad - good > 1:
        mid = (good + bad) // 2
        if estimate(shape, settings, max_new_tokens=mid).fits:
            good = mid
        else:
            bad = mid
    return good, False


def _gib(n: int) -> float:
    return n / GiB


def format_plan(plan: MemoryPlan, longest: tuple[int, bool] | None = None) -> str:
    """The plan as a text table (GiB), the verdict and the longest rollout that fits."""
    d = plan.details
    lines = [f"memory plan: {plan.model} | {d['dtype']}{' ' + d['quant'] if d['quant'] else ''}, {d['optim']}, "
             f"{d['device']} | prompt {d['prompt_length']} + rollout {d['max_new_tokens']} tokens, "
             f"teacher prompt {d['teacher_prompt_length']}",
             "", f"{'component':<22} {'phase':<12} {'GiB':>7}  note (* = the peak phase)"]
    for c in plan.components:
        peak = "*" if c.phase == plan.peak_phase else ""
        lines.append(f"{c.name:<22} {c.phase + peak:<12} {_gib(c.bytes):>7.3f}  {c.note}")
    lines += ["", "phases on top of static (GiB): " + ", ".join(
        f"{name} {_gib(b):.2f}{' (peak)' if name == plan.peak_phase else ''}" for name, b in plan.phases.items()),
        f"activations of the micro-batch: {_gib(d['activations_without_checkpointing']):.2f} GiB without "
        f"gradient checkpointing, {_gib(d['activations_with_checkpointing']):.2f} GiB with",
        f"loss workspace: fused {_gib(d['fused_loss_bytes']):.3f} GiB vs {_gib(d['naive_logits_bytes']):.2f} GiB "
        f"for one naive N x V fp32 logit matrix" + (f" (+ {_gib(d['head_grad_bytes']):.2f} GiB lm_head gradient "
                                                    f"either way)" if d["head_grad_bytes"] else ""),
        f"peak allocated {_gib(plan.peak_allocated_bytes):.2f} GiB; with CUDA context and margin "
        f"{_gib(plan.total_bytes):.2f} GiB of {_gib(plan.gpu_bytes):.2f} GiB: "
        f"{'fits' if plan.fits else 'does not fit'}"]
    if longest is not None:
        tokens, capped = longest
        lines.append(f"largest rollout that fits: max_new_tokens = {tokens}" +
                     (" (the model's context limit)" if capped else "") if tokens else
                     "largest rollout that fits: none (even 1 token does not fit)")
    return "\n".join(lines)
