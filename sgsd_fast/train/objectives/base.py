"""What a training method is to the step and the loop: an `Objective`.

An objective does three things, and the trainer switches on none of their names:

1. `prepare(rollouts)` -> its per-batch payload (teacher scores, teacher hidden states, advantages:
   whatever its loss needs beyond the student), computed once per step without gradient;
2. `units(mask)` -> the count its batch loss is a mean over (rollouts, or valid tokens); the
   step divides every micro-batch's summed loss by the batch's count, so gradient accumulation
   gives exactly the full-batch gradient;
3. `loss(micro_batch, payload)` -> the summed loss of one student micro-batch, from the student's
   hidden states and lm_head through the fused ops (no logit matrix is ever built).

Class attributes tell the trainer what to set up: `needs_teachers` (a `TeacherPool`),
`uses_skill_bank` (a skill bank and retriever), `keep_eos` (the token-mask convention).
"""
from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sgsd_fast.config import TrainConfig
from sgsd_fast.ops import IGNORE_INDEX, linear_logprobs


@dataclass
class Rollouts:
    """One step's verified rollouts, as the objectives see them (B rollouts, T = longest completion).

    problems[i] is the problem rollout i answers; the `num_generations` rollouts of one problem
    are adjacent (a GRPO group). In a multi-process run these are this rank's share of the step
    (whole groups); `batch_reward_mean` is the mean reward of the whole step's batch over all ranks.
    """

    problems: Sequence[Any]
    completions: Sequence[Sequence[int]]
    length: int
    rewards: torch.Tensor  # [B] on the training device
    batch_reward_mean: float | None = None  # None: rewards.mean() (one process)

    def reward_mean(self) -> float:
        """The mean reward of the step's whole batch (all ranks)."""
        return float(self.rewards.mean()) if self.batch_reward_mean is None else self.batch_reward_mean


@dataclass
class MicroBatch:
    """One student micro-batch: rows `rows` of the step's batch, after the student forward."""

    hidden: torch.Tensor  # [b, T, H] final-norm student states (with grad)
    head: torch.Tensor  # [V, H] the student's lm_head weight
    targets: torch.Tensor  # [b, T] sampled ids (any valid id where mask is False)
    mask: torch.Tensor  # [b, T] bool, True = token counts
    rewards: torch.Tensor  # [b]
    rows: slice

    def student_logprobs(self, temperature: float) -> torch.Tensor:
        """s_t = log p(y_t), [b, T] fp32, by the fused op; 0 where mask is False (no FLOPs spent there)."""
        b, t, h = self.hidden.shape
        flat = torch.where(self.mask, self.targets, torch.full_like(self.targets, IGNORE_INDEX)).reshape(-1)
        return linear_logprobs(self.hidden.reshape(-1, h), self.head, flat, temperature=temperature).reshape(b, t)


@dataclass
class MicroLoss:
    """total: the micro-batch's loss summed over its units (the step divides by the batch's count);
    metrics: means over the micro-batch's units (the step averages them over the batch)."""

    total: torch.Tensor
    metrics: dict[str, float]


@dataclass
class Payload:
    """Base of the per-batch payloads: a dataclass of tensors whose first dimension is the rollout."""

    @property
    def num_teachers(self) -> int:
        """Teachers scoring each rollout (a step metric)."""
        return 0

    def finite(self) -> bool:
        """False if a float tensor holds NaN/inf (e.g. a NaN teacher score): the step is then skipped."""
        tensors = (getattr(self, f.name) for f in dataclasses.fields(self))
        return all(bool(torch.isfinite(t).all()) for t in tensors
                   if isinstance(t, torch.Tensor) and t.is_floating_point())


class Objective(ABC):
    """One training method (see the module docstring). Subclasses live one per file."""

    name: ClassVar[str]
    needs_teachers: ClassVar[bool] = True
    uses_skill_bank: ClassVar[bool] = False
    keep_eos: ClassVar[bool] = True  # SPEC §3: SGSD drops EOS from the mask, OPSD and GRPO keep it

    def __init__(self, cfg: TrainConfig, *, teachers: Any = None, retriever: Any = None) -> None:
        """teachers: a `TeacherPool` (objectives with needs_teachers); retriever: a skill-bank
        `Retriever` (objectives with uses_skill_bank). Only `prepare` uses them."""
        self.cfg = cfg
        self.teachers = teachers
        self.retriever = retriever

    @abstractmethod
    def prepare(self, rollouts: Rollouts) -> Payload:
        """The per-batch payload of `loss`, computed without gradient."""

    @abstractmethod
    def units(self, mask: torch.Tensor) -> int:
        """What the batch loss is a mean over, counted in a [b, T] mask: rows or valid tokens."""

    @abstractmethod
    def loss(self, mb: MicroBatch, payload: Payload) -> MicroLoss:
        """The micro-batch's loss summed over its `units` (gradient flows to mb.hidden and mb.head)."""

    def _require(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"method {self.name!r} needs {name}= to prepare its teacher inputs")
        return value


class TokenMean(Objective, ABC):
    """Objectives whose batch loss is a pooled mean over the batch's valid tokens (OPSD's recipe)."""

    def units(self, mask: torch.Tensor) -> int:
        return int(mask.sum())
