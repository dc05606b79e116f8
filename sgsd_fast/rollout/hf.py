"""Rollouts with Hugging Face `generate` (KV cache, left padding, exact completion ids): the tested engine.

The completion of each prompt is the token ids generated after it, up to and including the
first EOS; the padding HF appends to sequences that finished early is dropped. A rollout with no
EOS within `max_new_tokens` is flagged `truncated` (it is still a valid rollout for the losses).

With ``share_prefix`` (the default) the tokens every prompt of a batch starts with -- the chat
system prompt and worked example, 72 of the embedded job's ~110 prompt tokens -- are run once and
their KV cache is repeated over the batch; the rows are laid out ``[prefix][left pad][rest]``, so
the padding sits after the prefix, masked. The completions are those of the plain layout up to
floating-point rounding (the same tokens on a 50-problem check of the embedded job); prefill is
most of the cost of short completions on a CPU: the embedded job's 200-problem evaluation took
~116 s without sharing and 45 s with it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sgsd_fast.models import prefix_cache, shared_prefix_length
from sgsd_fast.rollout.base import RolloutBatch, check_prompts

__all__ = ["HFRolloutEngine"]


def _eos_ids(model: nn.Module, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the generation config's EOS ids, else the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise ValueError("neither the model's generation_config nor the tokenizer defines an EOS token id")
    ids = [configured] if isinstance(configured, int) else list(configured)
    return sorted(set(ids))


class HFRolloutEngine:
    """Batched sampling from a transformers causal LM (a `RolloutEngine`).

    Args:
        model: the policy (a transformers model, possibly peft-wrapped).
        tokenizer: its tokenizer (must define a pad or EOS token).
        max_new_tokens: completion token budget.
        temperature, top_p, top_k: sampling parameters (``top_k=0`` disables top-k).
        batch_size: prompts per `generate` call; prompts are grouped by length to limit padding.
        share_prefix: run each batch's common prompt prefix once (see the module docstring).

    Prompts are tokenized without adding special tokens: they are expected to be fully rendered
    (see `sgsd_fast.prompts.render_prompt`).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        batch_size: int = 16,
        share_prefix: bool = True,
    ) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax decoding), got {temperature!r}")
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.batch_size = batch_size
        self.share_prefix = bool(share_prefix)
        self.eos_ids = _eos_ids(model, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.pad_id: int = pad

    def sync_weights(self, model: nn.Module) -> None:
        """Nothing to do: this engine samples from the policy module itself, never from a copy."""

    def _generation_config(self, greedy: bool) -> Any:
        from transformers import GenerationConfig

        sampling = {} if greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=not greedy,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
            **sampling,
        )

    def _left_pad(self, batch: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _split_completion(self, generated: list[int]) -> tuple[list[int], bool]:
        """Generated ids (after the padded prompt) -> (completion up to and incl. EOS, truncated)."""
        eos = set(self.eos_ids)
        for position, token in enumerate(generated):
            if token in eos:
                return generated[: position + 1], False
        # No EOS: the sequence was still running at the budget, so HF appended no padding to it.
        return generated, True

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int | None = None, greedy: bool = False) -> RolloutBatch:
        """One completion per prompt.

        Args:
            prompts: rendered prompt strings. Repeated prompts get independent samples (each row
                of a batch draws its own tokens), which is how a GRPO group is sampled.
            seed: makes sampling reproducible (the global RNG state is restored afterwards);
                None samples from the global RNG.
            greedy: argmax decoding (ignores temperature/top-p/top-k).
        """
        check_prompts(prompts, seed)

        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        completions: list[list[int]] = [[] for _ in prompts]
        truncated = [False] * len(prompts)
        device = next(self.model.parameters()).device
        config = self._generation_config(greedy)
        # Longest first, so each batch holds prompts of similar length (less padding).
        order = sorted(range(len(prompts)), key=lambda i: -len(prompt_ids[i]))

        was_training = self.model.training
        # eval() turns dropout off and makes HF's gradient-checkpointed layers run plainly with
        # the KV cache (they only checkpoint in training mode with grad enabled).
        self.model.eval()
        devices = [device] if device.type == "cuda" else []
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                for first in range(0, len(order), self.batch_size):
                    rows = order[first : first + self.batch_size]
                    batch = [prompt_ids[i] for i in rows]
                    shared = shared_prefix_length(batch) if self.share_prefix else 0
                    input_ids, attention_mask = self._left_pad([ids[shared:] for ids in batch], device)
                    cache = {}
                    if shared:
                        prefix = torch.tensor(batch[0][:shared], dtype=torch.long, device=device)
                        cache = prefix_cache(self.model, prefix, len(rows))
                        input_ids = torch.cat([prefix.expand(len(rows), -1), input_ids], dim=1)
                        attention_mask = torch.cat([torch.ones_like(input_ids[:, :shared]), attention_mask], dim=1)
                    output = self.model.generate(
                        input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **cache
                    )
                    new_tokens = output[:, input_ids.shape[1] :].tolist()
                    for row, generated in zip(rows, new_tokens):
                        completions[row], truncated[row] = self._split_completion(generated)
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - start

        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            completion_ids=completions,
            completion_texts=texts,
            truncated=truncated,
            seconds=seconds,
        )
