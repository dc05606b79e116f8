"""Fused LM-head ops: per-token log-probs, multi-teacher divergences and the losses built on them,
straight from hidden states, without N x V logits.

Public API (backend="auto" picks Triton on CUDA tensors and the C++ extension on CPU tensors;
backend="reference" is the naive materialized PyTorch oracle):

    linear_logprobs(hidden, weight, targets, ...)                  -> logp [N] (fp32)
    teacher_logprobs(teacher_hidden, weight, targets, ...)         -> [B, K, T] (no grad)
    linear_divergence(student_hidden, weight, teacher_hidden, ...) -> loss
    sgsd_gated_loss(student_logp, teacher_logp, mask, rewards, teacher_weights) -> (loss, metrics)
    sgsd_loss(student_hidden, weight, targets, teacher_logp, mask, rewards, teacher_weights) -> (loss, metrics)
    teacher_topk_divergence / student_topk_tail_divergence(student_hidden, weight, teacher_hidden) -> (loss, metrics)

Conventions (`sgsd_fast.ops.common`): ``mask`` is bool with True = counts; targets use
``ignore_index`` (`IGNORE_INDEX` = -100); math is fp32 (float64 for float64 inputs).
"""
from __future__ import annotations

# The submodules share their functions' names; these imports rebind each name to the function.
from sgsd_fast.ops.common import IGNORE_INDEX, math_dtype
from sgsd_fast.ops.linear_divergence import linear_divergence
from sgsd_fast.ops.linear_logprobs import linear_logprobs, teacher_logprobs
from sgsd_fast.ops.sgsd import sgsd_gated_loss, sgsd_loss
from sgsd_fast.ops.topk import student_topk_tail_divergence, teacher_topk_divergence

__all__ = [
    "IGNORE_INDEX",
    "linear_divergence",
    "linear_logprobs",
    "math_dtype",
    "sgsd_gated_loss",
    "sgsd_loss",
    "student_topk_tail_divergence",
    "teacher_logprobs",
    "teacher_topk_divergence",
]
