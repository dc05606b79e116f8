"""Objectives as plain functions of per-token tensors (no model code, no I/O).

    sampled_token_rkl(student_logp, teacher_logp, mask)  -> (loss, metrics)
    grpo_advantages(rewards, group_size)                 -> advantages
    grpo_loss(student_logp, advantages, mask)            -> (loss, metrics)

The SGSD gated loss lives in `sgsd_fast.ops` with its fused form (`sgsd_gated_loss`, `sgsd_loss`),
and so do the losses computed from hidden states (the top-k divergences): this layer sits on top
of the ops and never below them.
"""
from __future__ import annotations

from sgsd_fast.losses.grpo import grpo_advantages, grpo_loss
from sgsd_fast.losses.sampled_rkl import sampled_token_rkl

__all__ = ["grpo_advantages", "grpo_loss", "sampled_token_rkl"]
