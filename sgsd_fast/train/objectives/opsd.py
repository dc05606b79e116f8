"""OPSD (SPEC §6): the answer-conditioned teacher, full-vocabulary clipped divergence, pooled over tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from sgsd_fast.ops import linear_divergence
from sgsd_fast.train.objectives.base import MicroBatch, MicroLoss, Payload, Rollouts, TokenMean


@dataclass
class OPSDPayload(Payload):
    teacher_hidden: torch.Tensor  # [B, T, H] the teacher's final-norm states at the completion positions
    teacher_head: torch.Tensor  # [V, H] the teacher's lm_head (the frozen one for params="frozen")

    @property
    def num_teachers(self) -> int:
        return 1


class OPSD(TokenMean):
    """Loss: generalized JSD_beta (beta = 0: forward KL, the recipe) with each vocabulary summand capped at
    `opsd_entry_clip`, logits at the sampling temperature, summed by the fused op (no [N, V] tensor)."""

    name = "opsd"

    def prepare(self, rollouts: Rollouts) -> OPSDPayload:
        pool = self._require("teachers")
        hidden, head = pool.hidden(pool.answer_conditioned(rollouts.problems), rollouts.completions, rollouts.length)
        return OPSDPayload(teacher_hidden=hidden, teacher_head=head)

    def loss(self, mb: MicroBatch, payload: OPSDPayload) -> MicroLoss:
        cfg = self.cfg
        b, t, h = mb.hidden.shape
        kind = "fkl" if cfg.opsd_beta == 0.0 else "rkl" if cfg.opsd_beta == 1.0 else "jsd"
        teacher = payload.teacher_hidden[mb.rows].reshape(1, b * t, h)
        total = linear_divergence(mb.hidden.reshape(-1, h), mb.head, teacher, teacher_head=payload.teacher_head,
                                  kind=kind, beta=cfg.opsd_beta, temperature=cfg.temperature,
                                  entry_clip=cfg.opsd_entry_clip, mask=mb.mask.reshape(-1), reduction="sum")
        valid = self.units(mb.mask)
        return MicroLoss(total, {"loss": float(total.detach()) / max(1, valid), "valid_tokens": float(valid)})
