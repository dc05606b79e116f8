"""Sampled-token reverse KL as a policy-gradient advantage (SPEC §6; Thinking-Machines OPD, OPSD "tinker")."""
from __future__ import annotations

import torch

from sgsd_fast.ops import common as c


def sampled_token_rkl(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = -(sum_valid A_t s_t) / max(1, #valid) with the detached advantage A_t = q_t - s_t.

    Args:
        student_logp: [B, T] float, s_t = log p_S(y_t) of the sampled tokens; carries the gradient.
        teacher_logp: [B, T] float, q_t = log p_T(y_t); treated as detached.
        mask: [B, T] bool, True for tokens that count.

    The mean is pooled over all valid tokens of the batch (token-level, as OPSD's "pooled mean
    over valid tokens"), not a per-rollout mean then a batch mean: every token weighs the same, so
    long rollouts are not down-weighted. Its gradient, -(1/#valid) sum_t (q_t - s_t) ds_t, is the
    score-function estimate of the gradient of the reverse KL(p_S || p_T) on on-policy samples.
    All-masked batches give loss 0 with exactly zero gradients. Math is fp32 (float64 for float64
    inputs). Both log-prob tensors must be finite everywhere (put 0 at padded positions).

    metrics (python floats, means over valid tokens): loss, reverse_kl_mean (the k1 estimate
    s - q), reverse_kl_k3_mean (exp(q - s) - (q - s) - 1 >= 0, the lower-variance k3 estimate),
    student_logp_mean, teacher_logp_mean, valid_tokens.
    """
    c.check_float_tensor("student_logp", student_logp, 2, "[B, T]")
    c.check_float_tensor("teacher_logp", teacher_logp, 2, "[B, T]")
    shape = tuple(student_logp.shape)
    c.check_shape("teacher_logp", teacher_logp, shape, "[B, T] (same as student_logp)")
    c.check_bool_mask("mask", mask, shape, "[B, T] (same as student_logp)")
    c.check_same_device(student_logp=student_logp, teacher_logp=teacher_logp, mask=mask)

    dt = c.math_dtype(student_logp, teacher_logp)
    s = student_logp.to(dt)
    q = teacher_logp.detach().to(dt)
    m = mask.to(dt)
    count = mask.sum().clamp(min=1).to(dt)
    advantage = (q - s).detach()
    loss = -(advantage * s * m).sum() / count

    with torch.no_grad():
        log_ratio = (q - s) * m
        metrics = {
            "loss": loss.detach(),
            "reverse_kl_mean": -log_ratio.sum() / count,
            "reverse_kl_k3_mean": ((log_ratio.exp() - log_ratio - 1.0) * m).sum() / count,
            "student_logp_mean": (s * m).sum() / count,
            "teacher_logp_mean": (q * m).sum() / count,
            "valid_tokens": mask.sum().to(dt),
        }
        checks = [
            (c.nonfinite_flag(student_logp.detach()), "student_logp must be finite everywhere (NaN or inf found)"),
            (c.nonfinite_flag(teacher_logp.detach()), "teacher_logp must be finite everywhere (NaN or inf found)"),
        ]
        return loss, c.read_checked(metrics, checks, dt)
