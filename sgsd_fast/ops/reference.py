"""Naive, fully materialized PyTorch versions of the fused ops.

They allocate the whole N x V logit matrix (that is their purpose): they are the test oracle
(float64-capable) and the baseline in the benchmarks. Math is fp32 for fp32/bf16/fp16 inputs and
float64 for float64 inputs, matching SPEC §2 ("always fp32 math").
"""
from __future__ import annotations

import math

import torch

from sgsd_fast.ops.common import IGNORE_INDEX, math_dtype


def logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """z = hidden @ weight.T / temperature, in the math dtype (never rounded to bf16)."""
    dt = math_dtype(hidden)
    return (hidden.to(dt) @ weight.to(dt).T) / temperature


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, lse, entropy) per row; ignored rows give 0 in all three and no gradient."""
    z = logits(hidden, weight, temperature)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logsm = torch.log_softmax(z, dim=-1)
    lse = torch.logsumexp(z, dim=-1)
    logp = logsm.gather(1, safe_t[:, None]).squeeze(1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    return torch.where(valid, logp, zero), torch.where(valid, lse, zero), torch.where(valid, entropy, zero)


def divergence_per_entry(
    student_logsm: torch.Tensor, teacher_logsm: torch.Tensor, kind: str, beta: float
) -> torch.Tensor:
    """The per-vocabulary-entry summand of D(teacher, student) in the GKD convention (SPEC §6).

    fkl: P (t - s); rkl: Q (s - t); jsd: beta P (t - log M) + (1 - beta) Q (s - log M),
    M = beta P + (1 - beta) Q, with beta = 0 -> fkl and beta = 1 -> rkl as special cases.
    """
    s, t = student_logsm, teacher_logsm
    if kind == "jsd" and beta == 0.0:
        kind = "fkl"
    if kind == "jsd" and beta == 1.0:
        kind = "rkl"
    if kind == "fkl":
        return t.exp() * (t - s)
    if kind == "rkl":
        return s.exp() * (s - t)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1.0 - beta)]), dim=0)
        return beta * t.exp() * (t - log_m) + (1.0 - beta) * s.exp() * (s - log_m)
    raise ValueError(f"kind must be 'fkl', 'rkl' or 'jsd', got {kind!r}")


def linear_divergence_reference(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    teacher_head: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    entry_clip: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """sum_k g_tk D_k(t) over the full vocabulary, teachers detached. mask: [N] bool, True = row counts."""
    k, n = teacher_hidden.shape[0], teacher_hidden.shape[1]
    teacher_head = weight if teacher_head is None else teacher_head
    s = torch.log_softmax(logits(student_hidden, weight, temperature), dim=-1)
    per_token = torch.zeros(n, dtype=s.dtype, device=s.device)
    if gates is None:
        gates = torch.full((n, k), 1.0 / k, dtype=s.dtype, device=s.device)
    for i in range(k):
        with torch.no_grad():
            t = torch.log_softmax(logits(teacher_hidden[i], teacher_head, temperature), dim=-1)
        entries = divergence_per_entry(s, t, kind, beta)
        if entry_clip is not None:
            entries = entries.clamp(max=entry_clip)
        per_token = per_token + gates[:, i].to(s.dtype) * entries.sum(-1)
    valid = torch.ones(n, dtype=torch.bool, device=s.device) if mask is None else mask
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / valid.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
