"""The SGSD gated objective (SPEC §3): on per-token log-probs, and from hidden states.

    sgsd_gated_loss(student_logp, teacher_logp, mask, rewards, teacher_weights) -> (loss, metrics)
    sgsd_loss(student_hidden, weight, targets, teacher_logp, mask, rewards, teacher_weights) -> (loss, metrics)

`sgsd_loss` is `sgsd_gated_loss` with s computed by the fused `linear_logprobs`: one student
log-prob pass serves all K teachers, and nothing V-sized survives. The teachers' side is
`teacher_logprobs` (in `linear_logprobs.py`), which reduces each teacher to one log-prob per token.

Using them in a training step::

    def teacher_states():                     # K teacher forwards, run lazily, no grad
        for ids, pos in teacher_inputs:       # [teacher prompt k] + the same completion ids
            with torch.no_grad():
                yield model(ids, position_ids=pos, output_hidden_states=True).hidden_states[-1][:, -T - 1:-1]

    q = teacher_logprobs(teacher_states(), lm_head.weight, completion_ids.masked_fill(~mask, IGNORE_INDEX))
    h = model(student_ids, output_hidden_states=True).hidden_states[-1][:, -T - 1:-1]   # [B, T, H]
    loss, metrics = sgsd_loss(h, lm_head.weight, completion_ids, q, mask, rewards, teacher_weights)
    loss.backward()
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from sgsd_fast.ops import common as c
from sgsd_fast.ops.common import IGNORE_INDEX
from sgsd_fast.ops.linear_logprobs import linear_logprobs

# Teacher weights are softmax outputs (SPEC §4); 1e-3 absorbs their fp32/fp16 rounding while still
# catching unnormalized weights (real mistakes are off by far more). bf16 weights (8-bit mantissa)
# may miss it: keep weights in fp32.
WEIGHT_SUM_TOL = 1e-3


def sgsd_gated_loss(
    student_logp: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    tau: float = 1.0,
    clip: float = 3.0,
    deadzone: float = 0.05,
    outcome_baseline: float | None = None,
    extra_metrics: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SGSD loss of a batch of B rollouts scored by K teachers, and its step metrics.

    Args:
        student_logp: [B, T] float, s_t = log p_S(y_t); carries the gradient.
        teacher_logp: [B, K, T] float, q_t^k = log p_Tk(y_t); always treated as detached.
        mask: [B, T] bool, True for tokens that count (completion tokens, SPEC §3).
        rewards: [B] verifier outcomes; r > 0 is a success (o = +1), anything else a failure (o = -1).
        teacher_weights: [B, K] float a_k >= 0. A row either sums to 1 (within 1e-3) or is all zero
            (that rollout has no teachers and contributes 0); a zero entry marks an absent teacher.
        tau: gate temperature tau_g > 0. clip: support clip c > 0. deadzone: epsilon >= 0.
        outcome_baseline: None (the paper: o = +1 if r > 0 else -1) or a finite number b, giving
            the "advantage" variant o = r - b (real-valued, 0 when r == b). With b = the mean
            reward of the step's whole batch, successes and failures weigh (1 - p) and p (p = the
            batch's success rate), so the outcome terms balance the way a baseline balances
            REINFORCE. The paper's +-1 does not balance: at a 30 % success rate failures carry
            70 % of the weight and SGSD drifts toward unlikelihood training on the model's own
            samples (issue 14's step-0 anatomy; the measured comparison is in
            benchmarks/results/learning.md). Pass the batch mean, not a micro-batch mean, so
            accumulation stays exact.
        extra_metrics: optional name -> one-element tensor (e.g. an entropy mean), read in the same
            host sync as the built-in metrics and returned with them; names must not clash.

    Returns:
        (loss, metrics). loss = mean_i sum_k a_k rho_k (1/N_i) sum_t M_t l_t^k with
        delta = q - s, N = max(1, sum_t M_t), support a~_k = (1/N) sum_t M_t clip(delta, -c, c),
        stance sigma_k = sign(a~_k) if |a~_k| > epsilon else 0 (strict: |a~_k| == epsilon gives 0),
        rho_k = o * sigma_k (no gradient), l = log 2 - softplus(-delta^2 / (2 tau)) on the UNclipped
        delta. Its gradient is sum_t A_t ds_t with A_t = -sum_k a_k rho_k M_t sigmoid(-delta^2/2tau)
        delta / (tau N B) (SPEC §3). Math is fp32 (float64 if an input is float64); masked positions
        get exactly zero gradient, and so does every rollout whose teachers all have rho = 0.

        metrics (python floats; teacher statistics are unweighted, over present teachers a_k > 0,
        and 0 when there are none): loss, support_clipped_mean, support_raw_mean, gate_row_loss
        (mean of (1/N) sum_t M_t l_t^k), clipped_token_frac (|delta| > c among masked-in tokens),
        helpful_frac / harmful_frac / neutral_frac (rho = +1 / -1 / 0), mask_keep_frac, reward_mean,
        completion_tokens_mean (sum_t M_t per rollout).

    Raises:
        TypeError / ValueError naming the argument for wrong types, shapes, devices, non-positive
        tau or clip, negative deadzone, non-finite log-probs or rewards, and invalid teacher weights.
        Value checks ride on the one host sync that reads the metrics.
    """
    _check_shapes(student_logp, teacher_logp, mask, rewards, teacher_weights)
    tau = c.check_number("tau", tau, minimum=0.0, inclusive=False)
    clip = c.check_number("clip", clip, minimum=0.0, inclusive=False)
    deadzone = c.check_number("deadzone", deadzone, minimum=0.0, inclusive=True)
    if outcome_baseline is not None:
        outcome_baseline = c.check_number("outcome_baseline", outcome_baseline, minimum=-math.inf, inclusive=False)

    dt = c.math_dtype(student_logp, teacher_logp)
    s = student_logp.to(dt)
    q = teacher_logp.detach().to(dt)
    a = teacher_weights.detach().to(dt)
    m = mask.to(dt)[:, None, :]  # [B, 1, T]
    n = mask.sum(-1).clamp(min=1).to(dt)[:, None]  # [B, 1]

    delta = q - s[:, None, :]  # [B, K, T]
    with torch.no_grad():
        d = delta.detach()
        support = (d.clamp(-clip, clip) * m).sum(-1) / n  # [B, K]
        stance = torch.where(support.abs() > deadzone, torch.sign(support), torch.zeros_like(support))
        if outcome_baseline is None:
            outcome = torch.where(rewards.detach() > 0, 1.0, -1.0).to(dt)
        else:
            outcome = rewards.detach().to(dt) - outcome_baseline
        polarity = outcome[:, None] * stance
    gate = math.log(2.0) - F.softplus(-delta.square() / (2.0 * tau))
    row = (gate * m).sum(-1) / n  # [B, K]
    loss = (a * polarity * row).sum(-1).mean()

    with torch.no_grad():
        metrics = _metrics(loss, d, support, row.detach(), polarity, a, mask, rewards, n, clip)
        metrics.update(_check_extra_metrics(extra_metrics, metrics))
        checks = _value_checks(student_logp, teacher_logp, rewards, teacher_weights)
        return loss, c.read_checked(metrics, checks, dt)


def sgsd_loss(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    teacher_logp: torch.Tensor,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    teacher_weights: torch.Tensor,
    *,
    tau: float = 1.0,
    clip: float = 3.0,
    deadzone: float = 0.05,
    temperature: float = 1.0,
    outcome_baseline: float | None = None,
    backend: str = "auto",
    extra_metrics: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`sgsd_gated_loss` with s computed from hidden states.

    Args:
        student_hidden: [B, T, H] final (normed) hidden states of the student at the positions that
            predict targets; gradient flows here and to weight.
        weight: [V, H] lm_head weight (same dtype as student_hidden).
        targets: [B, T] int64 sampled ids; any value at mask == False positions (padding, prompt).
        teacher_logp: [B, K, T] teacher log-probs of the same ids (e.g. from `teacher_logprobs`).
        mask, rewards, teacher_weights, tau, clip, deadzone, outcome_baseline: as in `sgsd_gated_loss`.
        temperature: student logits are divided by it (SPEC §2).
        backend: linear_logprobs backend ("auto", "triton", "cpu", "reference").
        extra_metrics: forwarded to `sgsd_gated_loss` (e.g. a teacher entropy mean).

    s = linear_logprobs(student_hidden, weight, targets with masked positions ignored), so
    masked positions cost no FLOPs and give s = 0. The gradient is plain autograd through that
    op: the gated loss hands it exactly grad_logp_t = A_t = -sum_k a_k rho_k M_t
    sigmoid(-delta^2 / 2 tau) delta / (tau N B) (SPEC §3), and the op's backward turns it into the
    weighted cross-entropy-shaped gradient A_t (onehot - softmax) / temperature. No N x V tensor
    exists at any time with the fused backends ("auto", "triton", "cpu").

    metrics: those of `sgsd_gated_loss` plus student_entropy_mean (entropy of the student's
    full next-token distribution, averaged over masked-in tokens; a by-product of the fused pass).
    """
    c.check_float_tensor("student_hidden", student_hidden, 3, "[B, T, H]")
    b, t, h = student_hidden.shape
    c.check_bool_mask("mask", mask, (b, t), "[B, T] (B, T from student_hidden)")
    if isinstance(targets, torch.Tensor):
        c.check_same_device(student_hidden=student_hidden, mask=mask, targets=targets)
    c.check_batch_targets(targets, (b, t), mask)
    metrics = _caller_metrics(extra_metrics)
    flat_targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX)).reshape(b * t)
    logp, _, entropy = linear_logprobs(
        student_hidden.reshape(b * t, h),
        weight,
        flat_targets,
        temperature=temperature,
        ignore_index=IGNORE_INDEX,
        backend=backend,
        return_entropy=True,
    )
    # Ignored rows have entropy 0, so the masked mean is a plain sum over the count.
    metrics["student_entropy_mean"] = entropy.sum() / mask.sum().clamp(min=1)
    return sgsd_gated_loss(
        logp.reshape(b, t),
        teacher_logp,
        mask,
        rewards,
        teacher_weights,
        tau=tau,
        clip=clip,
        deadzone=deadzone,
        outcome_baseline=outcome_baseline,
        extra_metrics=metrics,
    )


def _caller_metrics(extra_metrics) -> dict[str, torch.Tensor]:
    """A copy of the caller's extra metrics, checked before any work is done."""
    if extra_metrics is None:
        return {}
    if not isinstance(extra_metrics, Mapping):
        raise TypeError(f"extra_metrics must be a mapping of name -> tensor, got {type(extra_metrics).__name__}")
    if "student_entropy_mean" in extra_metrics:
        raise ValueError("extra_metrics must not redefine the built-in metric 'student_entropy_mean'")
    return dict(extra_metrics)


def _check_shapes(student_logp, teacher_logp, mask, rewards, teacher_weights) -> None:
    c.check_float_tensor("student_logp", student_logp, 2, "[B, T]")
    c.check_float_tensor("teacher_logp", teacher_logp, 3, "[B, K, T]")
    b, t = student_logp.shape
    k = teacher_logp.shape[1]
    if b == 0:
        raise ValueError("student_logp must hold at least one rollout (B >= 1), got shape [0, T]")
    if k == 0:
        raise ValueError("teacher_logp must hold at least one teacher (K >= 1), got shape [B, 0, T]")
    c.check_shape("teacher_logp", teacher_logp, (b, k, t), "[B, K, T] (B, T from student_logp)")
    c.check_bool_mask("mask", mask, (b, t), "[B, T]")
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a torch.Tensor of shape [B] = [{b}], got {type(rewards).__name__}")
    if rewards.dtype.is_complex:
        raise TypeError(f"rewards must be a real tensor, got {rewards.dtype}")
    c.check_shape("rewards", rewards, (b,), "[B]")
    c.check_float_tensor("teacher_weights", teacher_weights, 2, "[B, K]")
    c.check_shape("teacher_weights", teacher_weights, (b, k), "[B, K]")
    c.check_same_device(
        student_logp=student_logp,
        teacher_logp=teacher_logp,
        mask=mask,
        rewards=rewards,
        teacher_weights=teacher_weights,
    )


def _check_extra_metrics(extra, builtin: dict) -> dict[str, torch.Tensor]:
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(f"extra_metrics must be a mapping of name -> one-element tensor, got {type(extra).__name__}")
    for name, value in extra.items():
        if not isinstance(name, str) or name in builtin:
            raise ValueError(f"extra_metrics names must be strings other than the built-in ones, got {name!r}")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise TypeError(f"extra_metrics[{name!r}] must be a one-element tensor, got {value!r}")
    return {name: value.detach().reshape(()) for name, value in extra.items()}


def _value_checks(student_logp, teacher_logp, rewards, teacher_weights) -> list[tuple[torch.Tensor, str]]:
    """(lazy flag, message) pairs; evaluated together with the metrics in one host sync."""
    w = teacher_weights.detach().to(torch.float64)
    row_sum = w.sum(-1)
    bad_rows = (row_sum != 0) & ((row_sum - 1.0).abs() > WEIGHT_SUM_TOL)
    return [
        (c.nonfinite_flag(student_logp.detach()), "student_logp must be finite everywhere (NaN or inf found)"),
        (
            c.nonfinite_flag(teacher_logp.detach()),
            "teacher_logp must be finite everywhere (NaN or inf found; set padded positions to 0, they are masked)",
        ),
        (c.nonfinite_flag(rewards.detach()), "rewards must be finite (NaN or inf found)"),
        (~torch.isfinite(w).all() | (w < 0).any(), "teacher_weights must be finite and >= 0"),
        (
            bad_rows.any(),
            f"each row of teacher_weights must sum to 1 (within {WEIGHT_SUM_TOL}) or be all zero (no teachers)",
        ),
    ]


def _metrics(loss, d, support, row, polarity, a, mask, rewards, n, clip) -> dict[str, torch.Tensor]:
    """0-dim tensors only, so the caller reads them all with one host sync."""
    dt = d.dtype
    present = a > 0  # [B, K]
    num_present = present.sum().clamp(min=1).to(dt)
    masked_tokens = mask[:, None, :] & present[:, :, None]  # [B, K, T]
    raw_support = (d * mask[:, None, :].to(dt)).sum(-1) / n

    def over_present(x: torch.Tensor) -> torch.Tensor:
        return torch.where(present, x, torch.zeros_like(x)).sum() / num_present

    def count(flags: torch.Tensor) -> torch.Tensor:
        return flags.sum().to(dt)

    return {
        "loss": loss.detach(),
        "support_clipped_mean": over_present(support),
        "support_raw_mean": over_present(raw_support),
        "gate_row_loss": over_present(row),
        "clipped_token_frac": count((d.abs() > clip) & masked_tokens) / count(masked_tokens).clamp(min=1),
        "helpful_frac": count((polarity > 0) & present) / num_present,
        "harmful_frac": count((polarity < 0) & present) / num_present,
        "neutral_frac": count((polarity == 0) & present) / num_present,
        "mask_keep_frac": count(mask) / max(1, mask.numel()),
        "reward_mean": rewards.detach().to(dt).mean(),
        "completion_tokens_mean": mask.sum(-1).to(dt).mean(),
    }
