"""SGSD (SPEC §3): K skill-conditioned teachers, the gated objective, a mean over rollouts."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd_fast.ops import sgsd_loss
from sgsd_fast.train.objectives.base import MicroBatch, MicroLoss, Objective, Payload, Rollouts
from sgsd_fast.train.teachers import retrieve_contexts


@dataclass
class SGSDPayload(Payload):
    teacher_logp: torch.Tensor  # [B, K, T] log-probs of the completion under each teacher
    teacher_weights: torch.Tensor  # [B, K] a_k (rows sum to 1; 0 = absent teacher)
    outcome_baseline: float | None = None  # sgsd_outcome="advantage": the whole batch's mean reward

    @property
    def num_teachers(self) -> int:
        return int(self.teacher_logp.shape[1])


class SGSD(Objective):
    """Teachers: the policy reading one retrieved (skill, mistake) pair each, scoring the student's
    ids; loss: `ops.sgsd_loss` (one student pass serves all K teachers).

    `sgsd_outcome`: "sign" is the paper's outcome o = +1 / -1; "advantage" is o = r - mean r with the
    mean of the step's whole batch (taken once, over all ranks, so gradient accumulation and data
    parallelism stay exact).
    """

    name = "sgsd"
    uses_skill_bank = True
    keep_eos = False

    def prepare(self, rollouts: Rollouts) -> SGSDPayload:
        pool = self._require("teachers")
        contexts, weights = retrieve_contexts(self._require("retriever"), rollouts.problems, self.cfg.num_teachers)
        prompts = pool.skill_conditioned(rollouts.problems, contexts)
        baseline = rollouts.reward_mean() if self.cfg.sgsd_outcome == "advantage" else None
        return SGSDPayload(teacher_logp=pool.score(prompts, rollouts.completions, rollouts.length),
                           teacher_weights=weights.to(rollouts.rewards.device), outcome_baseline=baseline)

    def units(self, mask: torch.Tensor) -> int:
        return int(mask.shape[0])  # SPEC §3: loss = mean over the rollouts

    def loss(self, mb: MicroBatch, payload: SGSDPayload) -> MicroLoss:
        cfg = self.cfg
        loss, metrics = sgsd_loss(mb.hidden, mb.head, mb.targets, payload.teacher_logp[mb.rows], mb.mask, mb.rewards,
                                  payload.teacher_weights[mb.rows], tau=cfg.tau_g, clip=cfg.support_clip,
                                  deadzone=cfg.deadzone, temperature=cfg.logprob_temperature,
                                  outcome_baseline=payload.outcome_baseline)
        return MicroLoss(loss * self.units(mb.mask), metrics)
