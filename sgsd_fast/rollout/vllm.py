"""An optional vLLM rollout engine (a `RolloutEngine`, like `HFRolloutEngine`).

vLLM is a CUDA-only extra (`pip install sgsd-fast[vllm]`). It keeps its own copy of the weights,
so after every optimizer step the trainer calls `sync_weights(model)` to push the policy into it
(LoRA adapters are merged on the fly). The weight-loading hook differs between vLLM releases;
`sync_weights` tries the known locations and fails loudly when none exists rather than sampling
from stale weights.

Status: written against vLLM's public `LLM` / `SamplingParams` API; it has not been run in this
project's CI (no GPU there). The HF engine is the tested default.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sgsd_fast.models import is_peft_model
from sgsd_fast.rollout.base import RolloutBatch, check_prompts

__all__ = ["VLLMRolloutEngine"]


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError("rollout_engine='vllm' needs vLLM on a CUDA machine: pip install 'sgsd-fast[vllm]' "
                          "(or use the default rollout_engine='hf')") from err
    return vllm


def _policy_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the policy in plain HF naming; LoRA weights merged, adapters kept."""
    if is_peft_model(model):
        model.merge_adapter()
        try:
            for name, tensor in model.get_base_model().state_dict().items():
                if "lora_" not in name:
                    yield name.replace(".base_layer", ""), tensor
        finally:
            model.unmerge_adapter()
    else:
        yield from model.state_dict().items()


class VLLMRolloutEngine:
    """`generate(prompts, seed=, greedy=) -> RolloutBatch` served by vLLM.

    Args:
        model_path: what vLLM loads at start (the same checkpoint the policy was loaded from).
        tokenizer: the policy's tokenizer (prompt ids are reported with it).
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k 0 = off).
        gpu_memory_utilization: share of the GPU vLLM may take (the trainer needs the rest).
    """

    def __init__(self, model_path: str, tokenizer: Any, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto") -> None:
        if not torch.cuda.is_available():
            raise ValueError("rollout_engine='vllm' needs a CUDA device; use rollout_engine='hf' on CPU")
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            enable_prefix_caching=True)

    def sync_weights(self, model: nn.Module) -> None:
        """Load the policy's current weights into vLLM's copy (call after each optimizer step)."""
        weights = ((name, tensor.detach()) for name, tensor in _policy_state(model))
        engine = self.llm.llm_engine
        executor = getattr(engine, "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        runner = getattr(getattr(worker, "worker", worker), "model_runner", None)
        target = getattr(runner, "model", None)
        if target is None or not hasattr(target, "load_weights"):
            raise RuntimeError("this vLLM version exposes no in-process load_weights hook; run with "
                               "rollout_engine='hf' or pin a vLLM release whose LLMEngine has model_executor."
                               "driver_worker.model_runner.model")
        target.load_weights(weights)
        self.llm.reset_prefix_cache()

    def generate(self, prompts: Sequence[str], *, seed: int | None = None, greedy: bool = False) -> RolloutBatch:
        """One completion per prompt. With a seed, prompt i samples with seed + i: vLLM seeds each
        request on its own, so one shared seed would give a repeated prompt (a GRPO group) the
        same completion every time."""
        check_prompts(prompts, seed)
        params = [self._sampling_params(
            n=1, max_tokens=self.max_new_tokens, seed=None if seed is None else seed + i,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=-1 if greedy or self.top_k == 0 else self.top_k,
            skip_special_tokens=True,
        ) for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return RolloutBatch(
            prompt_ids=[list(o.prompt_token_ids) for o in outputs],
            completion_ids=[list(o.outputs[0].token_ids) for o in outputs],
            completion_texts=[o.outputs[0].text for o in outputs],
            truncated=[o.outputs[0].finish_reason == "length" for o in outputs],
            seconds=seconds,
        )
