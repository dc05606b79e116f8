"""The naive SGSD baseline: what the public reference code does, written plainly.

Full-vocabulary fp32 log-softmax tensors for the student and for every teacher, a gather of the
sampled ids, then the gated objective of SPEC §3 on the [B, K, T] log-probs. Kept independent of
the project's fused ops and of `sgsd_fast.losses` on purpose: it is the yardstick they are timed
against and cross-checked with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gated_terms(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    tau: float = 1.0,
    clip: float = 3.0,
    deadzone: float = 0.05,
) -> torch.Tensor:
    """Per (rollout, teacher) contribution a_k·ρ_k·(1/N)·Σ_t M_t ℓ_t^k, shape [B, K].

    student_logp [B, T] (with grad), teacher_logp [B, K, T], mask [B, T] bool, rewards [B],
    teacher_weights [B, K] (the argument order of `sgsd_fast.ops.sgsd_gated_loss`). The SGSD loss
    is `gated_terms(...).sum(1).mean()`; a single teacher's slice gives that teacher's share, which
    is how the per-teacher-row naive step splits it.
    """
    m = mask.to(student_logp.dtype)[:, None, :]
    delta = teacher_logp.detach().to(student_logp.dtype) - student_logp[:, None, :]
    n_tok = m.sum(-1).clamp(min=1.0)
    with torch.no_grad():
        support = (m * delta.clamp(-clip, clip)).sum(-1) / n_tok
        stance = torch.where(support.abs() > deadzone, support.sign(), torch.zeros_like(support))
        outcome = torch.where(rewards > 0, 1.0, -1.0).to(student_logp.dtype)[:, None]
        polarity = outcome * stance
    token_loss = math.log(2.0) - F.softplus(-(delta**2) / (2.0 * tau))
    return teacher_weights.to(student_logp.dtype) * polarity * (m * token_loss).sum(-1) / n_tok


def full_log_softmax(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """fp32 log-softmax over the whole vocabulary, [..., V]: the tensor the fused ops never build."""
    return torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)


def gather_ids(logsm: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log-prob of each target id from a [..., V] log-softmax tensor."""
    return logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def naive_sgsd_loss(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """SGSD loss from hidden states, fully materialized.

    student_hidden [B, T, H], teacher_hidden [K, B, T, H]: the student's [B, T, V] and all K
    teachers' [K, B, T, V] fp32 log-softmax tensors exist at once, as in the reference code.
    """
    student_logp = gather_ids(full_log_softmax(student_hidden, weight, temperature), targets)
    with torch.no_grad():
        teacher_logsm = full_log_softmax(teacher_hidden, weight, temperature)
        teacher_logp = gather_ids(teacher_logsm, targets.expand(teacher_hidden.shape[0], *targets.shape))
    teacher_logp = teacher_logp.permute(1, 0, 2)
    return gated_terms(student_logp, teacher_logp, mask, rewards, teacher_weights).sum(1).mean()


def naive_teacher_logprobs(teacher_hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           *, temperature: float = 1.0) -> torch.Tensor:
    """[B, K, T] teacher log-probs through the stacked [K, B, T, V] fp32 log-softmax (no grad)."""
    with torch.no_grad():
        logsm = full_log_softmax(teacher_hidden, weight, temperature)
        return gather_ids(logsm, targets.expand(teacher_hidden.shape[0], *targets.shape)).permute(1, 0, 2)
