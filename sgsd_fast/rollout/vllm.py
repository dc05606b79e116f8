"""Optional vLLM rollout engines (`RolloutEngine`s, like `HFRolloutEngine`): colocated and server.

vLLM is a CUDA-only extra; see the README ("Scaling out") for the version-pinned install that
keeps torch consistent with the compiled extension. vLLM keeps its own copy of the weights, so
the trainer calls `sync_weights(model)` before every step's rollouts; a LoRA policy is sent as
merged dense weights computed out of place (so one code path covers full fine-tuning and LoRA,
no vLLM LoRA runtime is needed, and the policy itself is never modified).

* `VLLMRolloutEngine` (vllm_mode='colocate'): an in-process `vllm.LLM` on the trainer's own GPU.
  Its weights are reachable only when the V1 engine core runs in this process: one process sets
  VLLM_ENABLE_V1_MULTIPROCESSING=0; under torchrun each rank runs its own engine with
  `distributed_executor_backend="external_launcher"` (what TRL's colocate mode does). Weights are
  pushed with `LLM.apply_model(lambda m: m.load_weights(...))`, vLLM's public hook onto the
  worker's model. `max_model_len` comes from the config (a model's own maximum, 40,960 tokens for
  Qwen3, would reserve more KV cache than a colocated share of the GPU holds). With sleep mode the
  engine sleeps (level 2: weights and KV cache freed) during the update and wakes the weights
  first, then the KV cache, so a sync never holds both copies' peak at once.
* `VLLMServerEngine` (vllm_mode='server'): a separate `trl vllm-serve` process on other GPUs. It
  reuses TRL's maintained client (`trl.extras.vllm_client.VLLMClient`) rather than a protocol of
  our own: the HTTP generate endpoint and the NCCL weight broadcast are version-coupled to vLLM,
  and TRL keeps them in step. Rank 0 pushes the weights (the trainer waits for it on every
  rank); every rank sends its own prompts. The server samples without per-request seeds, so
  server-mode rollouts are not reproducible run to run.

Status: written against vLLM's V1 `LLM` API (0.10.x) and TRL's client; tested in CI with fake
engine objects only (no GPU there), never against a real vLLM.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from sgsd_fast.models import is_peft_model
from sgsd_fast.rollout.base import RolloutBatch, check_prompts

__all__ = ["VLLMRolloutEngine", "VLLMServerEngine", "policy_weights"]

INSTALL_HINT = "see the README, section 'Scaling out', for the pinned install (or use the default rollout_engine='hf')"


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise ImportError(f"rollout_engine='vllm' needs vLLM on a CUDA machine; {INSTALL_HINT}") from err
    return vllm


def _import_client() -> Any:
    try:
        from trl.extras.vllm_client import VLLMClient
    except ImportError as err:
        raise ImportError(f"vllm_mode='server' needs TRL's vLLM client (pip install trl); {INSTALL_HINT}") from err
    return VLLMClient


@torch.no_grad()
def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of the policy in plain HF naming, what vLLM's `load_weights` reads.

    A LoRA layer is sent as base + delta (peft's `get_delta_weight` of each active adapter),
    computed out of place: merging and unmerging the adapter in place would leave the frozen base
    weights a rounding error away from where they were after every sync. Adapter tensors are
    skipped and `.base_layer` is dropped from the names.
    """
    if not is_peft_model(model):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    base = model.get_base_model()
    layers = {name: module for name, module in base.named_modules()
              if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")}
    for name, tensor in base.state_dict().items():
        if "lora_" in name:
            continue
        owner = name.rsplit(".base_layer.", 1)[0] if ".base_layer." in name else None
        if owner in layers and name.endswith(".base_layer.weight"):
            layer = layers[owner]
            tensor = tensor + sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)
        yield name.replace(".base_layer", ""), tensor.detach()


def _check_cuda() -> None:
    if not torch.cuda.is_available():
        raise ValueError("rollout_engine='vllm' needs a CUDA device; use rollout_engine='hf' on CPU")


def _eos_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


class VLLMRolloutEngine:
    """`generate(prompts, seed=, greedy=) -> RolloutBatch` from an in-process vLLM engine.

    Args:
        model_path: what vLLM loads at start (a Hugging Face id or local directory: the checkpoint
            the policy was loaded from; its weights are replaced at the first `sync_weights`).
        tokenizer: the policy's tokenizer.
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k 0 = off).
        gpu_memory_utilization: share of the GPU vLLM may take (the trainer needs the rest).
        max_model_len: longest prompt + completion vLLM reserves KV cache for.
        enable_sleep_mode: free vLLM's GPU memory between generation and the update.
        distributed: True under torchrun (one engine per rank, `external_launcher`).
        seed: the engine's own seed (requests carry their own seeds when given one).
    """

    per_request_seeds = True  # one generate call serves many groups, each with its own seed

    def __init__(self, model_path: str, tokenizer: Any, *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, gpu_memory_utilization: float = 0.3, dtype: str = "auto",
                 max_model_len: int = 4096, enable_sleep_mode: bool = False, distributed: bool = False,
                 seed: int = 0) -> None:
        _check_cuda()
        if distributed:
            backend: dict[str, Any] = {"distributed_executor_backend": "external_launcher"}
        else:
            # The V1 engine core then runs in this process, so apply_model reaches the weights.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            backend = {}
        vllm = _import_vllm()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.sleep_mode = enable_sleep_mode
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, enable_prefix_caching=True,
                            enable_sleep_mode=enable_sleep_mode, seed=seed, **backend)
        self._asleep = False

    def sync_weights(self, model: nn.Module) -> None:
        """Load the policy's current weights into vLLM's copy (the trainer calls it before each step's rollouts)."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed until generate
        # The in-process worker consumes the iterator inside this call: one merged tensor at a time.
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(policy_weights(model)))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights

    def generate(self, prompts: Sequence[str], *, seed: int | None = None, greedy: bool = False,
                 seeds: Sequence[int] | None = None) -> RolloutBatch:
        """One completion per prompt. With `seed`, prompt i samples with seed + i (vLLM seeds each
        request on its own, so one shared seed would give a GRPO group one completion repeated);
        `seeds` gives every prompt its own seed instead."""
        check_prompts(prompts, seed)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        per_prompt = list(seeds) if seeds is not None else [None if seed is None else seed + i
                                                            for i in range(len(prompts))]
        params = [self._sampling_params(
            n=1, max_tokens=self.max_new_tokens, seed=s,
            temperature=0.0 if greedy else self.temperature,
            top_p=1.0 if greedy else self.top_p,
            top_k=-1 if greedy or self.top_k == 0 else self.top_k,
            skip_special_tokens=True,
        ) for s in per_prompt]
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        start = time.perf_counter()
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        seconds = time.perf_counter() - start
        if self.sleep_mode:  # free the GPU for the update; the next sync wakes the weights
            self.llm.sleep(level=2)
            self._asleep = True
        return RolloutBatch(
            prompt_ids=[list(o.prompt_token_ids) for o in outputs],
            completion_ids=[list(o.outputs[0].token_ids) for o in outputs],
            completion_texts=[o.outputs[0].text for o in outputs],
            truncated=[o.outputs[0].finish_reason == "length" for o in outputs],
            seconds=seconds,
        )


class VLLMServerEngine:
    """`generate(prompts, ...) -> RolloutBatch` from a `trl vllm-serve` process (vllm_mode='server').

    Args:
        tokenizer: the policy's tokenizer (prompt ids and texts are computed with it).
        max_new_tokens, temperature, top_p, top_k: sampling settings (top_k 0 = off).
        host, server_port, group_port: where the server listens and the NCCL group's port.
        pushes_weights: True on the one process that pushes weights (rank 0); the others only generate.
        connection_timeout: seconds to wait for the server to come up.
    """

    per_request_seeds = False

    def __init__(self, tokenizer: Any, *, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, host: str = "127.0.0.1", server_port: int = 8000, group_port: int = 51216,
                 pushes_weights: bool = True, connection_timeout: float = 240.0) -> None:
        _check_cuda()
        client_cls = _import_client()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.pushes_weights = pushes_weights
        self.client = client_cls(host=host, server_port=server_port, group_port=group_port,
                                 connection_timeout=connection_timeout)
        if pushes_weights:
            self.client.init_communicator()

    def sync_weights(self, model: nn.Module) -> None:
        """Broadcast every weight to the server (rank 0; the trainer makes the other ranks wait)."""
        if not self.pushes_weights:
            return
        for name, tensor in policy_weights(model):
            self.client.update_named_param(name, tensor)
        self.client.reset_prefix_cache()

    def generate(self, prompts: Sequence[str], *, seed: int | None = None, greedy: bool = False) -> RolloutBatch:
        """One completion per prompt; `seed` is accepted for the protocol but the server cannot honour it."""
        check_prompts(prompts, seed)
        start = time.perf_counter()
        out = self.client.generate(list(prompts), n=1, temperature=0.0 if greedy else self.temperature,
                                   top_p=1.0 if greedy else self.top_p,
                                   top_k=-1 if greedy or self.top_k == 0 else self.top_k,
                                   max_tokens=self.max_new_tokens)
        seconds = time.perf_counter() - start
        # Older TRL clients return the completion ids, newer ones a dict holding them.
        completions = [list(ids) for ids in (out["completion_ids"] if isinstance(out, dict) else out)]
        eos = _eos_ids(self.tokenizer)
        return RolloutBatch(
            prompt_ids=[self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
            completion_ids=completions,
            completion_texts=self.tokenizer.batch_decode(completions, skip_special_tokens=True),
            truncated=[not (ids and ids[-1] in eos) for ids in completions],
            seconds=seconds,
        )
