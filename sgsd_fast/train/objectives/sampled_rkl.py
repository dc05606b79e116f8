"""Sampled-token reverse KL (SPEC §6; Thinking-Machines OPD, OPSD's "tinker" mode)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd_fast.losses import sampled_token_rkl
from sgsd_fast.train.objectives.base import MicroBatch, MicroLoss, Payload, Rollouts, TokenMean


@dataclass
class SampledRKLPayload(Payload):
    teacher_logp: torch.Tensor  # [B, T] log-probs of the completion under the answer-conditioned teacher

    @property
    def num_teachers(self) -> int:
        return 1


class SampledRKL(TokenMean):
    """Teacher: the policy reading the reference answer; loss: -mean_t sg(q_t - s_t) s_t over valid tokens."""

    name = "sampled_rkl"

    def prepare(self, rollouts: Rollouts) -> SampledRKLPayload:
        pool = self._require("teachers")
        prompts = [[p] for p in pool.answer_conditioned(rollouts.problems)]
        return SampledRKLPayload(teacher_logp=pool.score(prompts, rollouts.completions, rollouts.length)[:, 0])

    def loss(self, mb: MicroBatch, payload: SampledRKLPayload) -> MicroLoss:
        s = mb.student_logprobs(self.cfg.logprob_temperature)
        loss, metrics = sampled_token_rkl(s, payload.teacher_logp[mb.rows], mb.mask)
        return MicroLoss(loss * self.units(mb.mask), metrics)
