"""What every rollout engine returns and promises: `RolloutBatch` and the `RolloutEngine` protocol."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from torch import nn


@dataclass
class RolloutBatch:
    """Rollouts in the order of the prompts that produced them.

    prompt_ids: the prompt's token ids (no padding). completion_ids: generated ids, ending with
    the EOS id unless truncated. completion_texts: completions decoded without special tokens.
    truncated: no EOS within the token budget. seconds: wall time spent generating.
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    truncated: list[bool]
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(ids) for ids in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second (0.0 when nothing was timed)."""
        return self.num_completion_tokens / self.seconds if self.seconds > 0 else 0.0


class RolloutEngine(Protocol):
    """A sampler of completions for rendered prompts (HF `generate` or vLLM).

    The trainer calls `sync_weights(policy)` before every step's rollouts, so an engine that keeps
    its own copy of the weights (vLLM) samples from the current policy; an engine that samples
    from the policy module itself (HF) does nothing there.
    """

    def generate(self, prompts: Sequence[str], *, seed: int | None = None, greedy: bool = False) -> RolloutBatch:
        """One completion per prompt, in prompt order; `seed` makes sampling reproducible."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the next `generate` sample from `model`'s current weights."""
        ...


def check_prompts(prompts: Sequence[str], seed: int | None) -> None:
    """The arguments every engine's `generate` accepts: non-empty strings and an int seed (or None)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of str, not a single str")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts[{i}] must be a non-empty str, got {prompt!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be None or an int, got {seed!r}")


def group_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of problem `index` (its position in the step's whole batch) at `step`.

    A hash rather than arithmetic on the three numbers, so no two (step, index) pairs of a run
    share a seed; 63 bits, which torch and vLLM both accept.
    """
    digest = hashlib.blake2b(f"sgsd_fast.rollout:{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2  # < 2**62: seed + j (a group's j-th rollout) stays < 2**63


def generate_groups(engine: RolloutEngine, prompts: Sequence[str], *, group_size: int,
                    seeds: Sequence[int]) -> RolloutBatch:
    """Sample each group of `group_size` adjacent prompts (one problem's rollouts) by itself, with its seed.

    What a group samples then depends only on its prompt, its seed and the weights, never on
    which other prompts share the process or the batch: how multi-process runs sample the same
    rollouts as a single process (`rollout_seeding='problem'`). An engine with `per_request_seeds`
    (vLLM) gets one call with a seed per prompt instead, which keeps its batching.
    """
    if len(prompts) != group_size * len(seeds):
        raise ValueError(f"{len(prompts)} prompts are not {len(seeds)} groups of group_size={group_size}")
    if getattr(engine, "per_request_seeds", False):  # vLLM seeds every request: one batched call
        return engine.generate(prompts, seeds=[seed + j for seed in seeds for j in range(group_size)])
    parts = [engine.generate(prompts[g * group_size:(g + 1) * group_size], seed=seed) for g, seed in enumerate(seeds)]
    return RolloutBatch(prompt_ids=[ids for p in parts for ids in p.prompt_ids],
                        completion_ids=[ids for p in parts for ids in p.completion_ids],
                        completion_texts=[t for p in parts for t in p.completion_texts],
                        truncated=[t for p in parts for t in p.truncated],
                        seconds=sum(p.seconds for p in parts))
