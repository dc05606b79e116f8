"""Training objectives as plain functions of per-token tensors (no model code, no I/O).

    sgsd_gated_loss(student_logp, teacher_logp, mask, rewards, teacher_weights, ...) -> (loss, metrics)
    sampled_token_rkl(student_logp, teacher_logp, mask)                              -> (loss, metrics)
    teacher_topk_divergence(student_hidden, weight, teacher_hidden, ...)             -> (loss, metrics)
    student_topk_tail_divergence(student_hidden, weight, teacher_hidden, ...)        -> (loss, metrics)
    grpo_advantages(rewards, group_size)                                             -> advantages
"""
from __future__ import annotations

from sgsd_fast.losses.grpo import grpo_advantages
from sgsd_fast.losses.sampled_rkl import sampled_token_rkl
from sgsd_fast.losses.sgsd_gated import sgsd_gated_loss
from sgsd_fast.losses.topk import student_topk_tail_divergence, teacher_topk_divergence

__all__ = [
    "grpo_advantages",
    "sampled_token_rkl",
    "sgsd_gated_loss",
    "student_topk_tail_divergence",
    "teacher_topk_divergence",
]
