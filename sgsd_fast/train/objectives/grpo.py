"""GRPO (SPEC §6, the reference RL baseline): group-normalized outcome advantages, no teacher at all."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd_fast.losses import grpo_advantages, grpo_loss
from sgsd_fast.train.objectives.base import MicroBatch, MicroLoss, Payload, Rollouts, TokenMean


@dataclass
class GRPOPayload(Payload):
    advantages: torch.Tensor  # [B] A_i of each rollout within its group of num_generations


class GRPO(TokenMean):
    """The `num_generations` adjacent rollouts of a problem form a group; A_i = (r_i - mean) / (std + 1e-4)
    (`scale_rewards` off: r_i - mean, Dr. GRPO); loss: -sum_i sum_t M_t A_i s_t / sum_i sum_t M_t over
    the whole batch, through the same fused log-prob op and the same token mask (EOS kept) as OPSD."""

    name = "grpo"
    needs_teachers = False

    def prepare(self, rollouts: Rollouts) -> GRPOPayload:
        return GRPOPayload(advantages=grpo_advantages(rollouts.rewards, self.cfg.num_generations,
                                                      scale=self.cfg.scale_rewards))

    def loss(self, mb: MicroBatch, payload: GRPOPayload) -> MicroLoss:
        s = mb.student_logprobs(self.cfg.logprob_temperature)
        loss, metrics = grpo_loss(s, payload.advantages[mb.rows], mb.mask)
        return MicroLoss(loss * self.units(mb.mask), metrics)
