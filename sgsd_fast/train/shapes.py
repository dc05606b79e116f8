"""The shape of a decoder-only model from its config alone: what `sgsd-fast plan` sizes memory from.

    shape = resolve_model_shape("Qwen/Qwen3-1.7B")     # built-in table: no download, no network
    shape = resolve_model_shape("path/to/model")        # a folder with config.json (weights never read)
    shape = resolve_model_shape("path/to/config.json")
    shape.param_count(), shape.linears()               # exact parameter counts, per-layer projections

Resolution order: the embedded ``smollm2`` name and the built-in table (`BUILTIN_SHAPES`, exact values
of the published config.json files, matched case-insensitively with or without the owner and an
``-Instruct`` / ``-Base`` suffix), a local config.json or folder, then `transformers.AutoConfig` (which
needs the Hugging Face cache or a network). Supported blocks: Llama / Mistral (and SmolLM2, a Llama),
Qwen2 (q/k/v biases) and Qwen3 (per-head RMSNorm on q and k) — pre-norm attention + SwiGLU MLP.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgsd_fast.config import ConfigError

#: model_type -> (q/k/v projections carry a bias, q and k get a per-head RMSNorm)
SUPPORTED_TYPES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False),
                   "qwen3": (False, True)}
#: The projections of one block, in the order peft's 'all-linear' finds them.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a Llama-style decoder: hidden H, MLP width I, layers, query / key-value heads, head
    dim d (q has heads * d columns, k and v kv_heads * d), vocabulary V, tied lm_head."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    max_positions: int | None = None

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        return SUPPORTED_TYPES[self.model_type][0]

    @property
    def qk_norm(self) -> bool:
        return SUPPORTED_TYPES[self.model_type][1]

    def linears(self) -> dict[str, tuple[int, int]]:
        """{projection name: (in_features, out_features)} of one block."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_weight_count(self) -> int:
        """Weights of all block projections (the part 4/8-bit quantization applies to)."""
        return self.num_layers * sum(a * b for a, b in self.linears().values())

    def other_param_count(self) -> int:
        """Everything that stays unquantized: embeddings, an untied lm_head, RMSNorm weights, biases."""
        h = self.hidden_size
        per_layer = 2 * h + (2 * self.head_dim if self.qk_norm else 0) + \
            (self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0)
        embeddings = self.vocab_size * h * (1 if self.tied else 2)
        return embeddings + self.num_layers * per_layer + h  # + the final norm

    def param_count(self) -> int:
        return self.linear_weight_count() + self.other_param_count()


#: Published config.json values (hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied,
#: max_position_embeddings); the -Instruct / -Base variants share them.
BUILTIN_SHAPES = {s.name: s for s in (
    ModelShape("HuggingFaceTB/SmolLM2-135M", "llama", 576, 1536, 30, 9, 3, 64, 49152, True, 8192),
    ModelShape("HuggingFaceTB/SmolLM2-360M", "llama", 960, 2560, 32, 15, 5, 64, 49152, True, 8192),
    ModelShape("HuggingFaceTB/SmolLM2-1.7B", "llama", 2048, 8192, 24, 32, 32, 64, 49152, True, 8192),
    ModelShape("Qwen/Qwen3-0.6B", "qwen3", 1024, 3072, 28, 16, 8, 128, 151936, True, 40960),
    ModelShape("Qwen/Qwen3-1.7B", "qwen3", 2048, 6144, 28, 16, 8, 128, 151936, True, 40960),
    ModelShape("Qwen/Qwen3-4B", "qwen3", 2560, 9728, 36, 32, 8, 128, 151936, True, 40960),
    ModelShape("Qwen/Qwen3-8B", "qwen3", 4096, 12288, 36, 32, 8, 128, 151936, False, 40960),
    ModelShape("Qwen/Qwen2.5-7B", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 131072),
    ModelShape("meta-llama/Llama-3.1-8B", "llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 131072),
)}
#: The embedded default model (`sgsd_fast.models`): SmolLM2-135M-Instruct.
EMBEDDED = {"smollm2": "HuggingFaceTB/SmolLM2-135M"}
_SUFFIXES = ("-instruct", "-base")


def _table_key(name: str) -> str:
    key = name.lower().rsplit("/", 1)[-1]
    for suffix in _SUFFIXES:
        key = key.removesuffix(suffix)
    return key


_BY_KEY = {_table_key(n): s for n, s in BUILTIN_SHAPES.items()}


def shape_from_config(config: Any, name: str = "model") -> ModelShape:
    """A `ModelShape` from a transformers PretrainedConfig or a config.json mapping.

    A mapping is completed with its model_type's defaults (`AutoConfig.for_model`, local, no download),
    so a config.json that omits e.g. ``tie_word_embeddings`` or ``head_dim`` reads as transformers would.
    Raises ConfigError naming --model for an unsupported architecture or a missing size.
    """
    if isinstance(config, Mapping):
        from transformers import AutoConfig

        values = dict(config)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ConfigError(f"--model: {name!r}: its config has no 'model_type'")
        try:
            config = AutoConfig.for_model(model_type, **values)
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"--model: {name!r}: transformers cannot read this config ({err})") from None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        raise ConfigError(f"--model: {name!r} has model_type {model_type!r}; the planner models the blocks of "
                          f"{sorted(SUPPORTED_TYPES)} (dense Llama-style decoders)")
    try:
        h, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv = getattr(config, "num_key_value_heads", None) or heads
        d = getattr(config, "head_dim", None) or h // heads
        return ModelShape(name=name, model_type=model_type, hidden_size=h,
                          intermediate_size=int(config.intermediate_size), num_layers=int(config.num_hidden_layers),
                          num_heads=heads, num_kv_heads=int(kv), head_dim=int(d), vocab_size=int(config.vocab_size),
                          tied=bool(getattr(config, "tie_word_embeddings", False)),
                          max_positions=getattr(config, "max_position_embeddings", None))
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"--model: {name!r}: its config lacks a size the planner needs ({err})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"--model: {str(path)!r} is not a readable config.json ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--model: {str(path)!r} must hold a JSON object")
    return data


def resolve_model_shape(model: str) -> ModelShape:
    """The shape of `model`: 'smollm2', a built-in id, a config.json or a folder holding one, or a
    Hugging Face id transformers can resolve (cache or network). Never reads weights.

    Every failure is one ConfigError naming --model.
    """
    if not isinstance(model, str) or not model.strip():
        raise ConfigError("--model: expected 'smollm2', a Hugging Face id, a model folder or a config.json path")
    model = EMBEDDED.get(model, model)
    if _table_key(model) in _BY_KEY and not Path(model).exists():
        return _BY_KEY[_table_key(model)]
    path = Path(model).expanduser()
    if path.is_file():
        return shape_from_config(_read_json(path), model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model: folder {model!r} has no config.json")
        return shape_from_config(_read_json(path / "config.json"), model)
    if model.startswith((".", "/", "~")) or model.endswith(".json"):
        raise ConfigError(f"--model: {model!r} does not exist")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as err:
        known = ", ".join(sorted(BUILTIN_SHAPES))
        raise ConfigError(f"--model: cannot resolve {model!r} without its config.json (not in the built-in table "
                          f"[{known}], not cached, no network?): {' '.join(str(err).split())[:200]}") from None
    return shape_from_config(config, model)
