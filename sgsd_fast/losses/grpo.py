"""GRPO (SPEC §6, the reference RL baseline): group-normalized advantages and the token-level loss.

    grpo_advantages(rewards, group_size)            -> A [G * n]
    grpo_loss(student_logp, advantages, mask)       -> (loss, metrics)

One on-policy update per batch, so the importance ratio is 1 and PPO's clipped surrogate reduces
to the plain policy gradient -sum_i sum_t M_t A_i s_t; no KL term (beta = 0, TRL's default).
"""
from __future__ import annotations

import numbers

import torch

from sgsd_fast.ops import common as c

#: SPEC §6 and TRL: A = (r - mean) / (std + 1e-4).
ADVANTAGE_EPS = 1e-4


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS, *,
                    scale: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive rollouts.

    Args:
        rewards: [num_groups * group_size] real rewards, grouped contiguously (the rollouts of one
            prompt are adjacent).
        group_size: rollouts per prompt, >= 2 (one rollout has no group baseline).
        eps: > 0, keeps groups whose rewards are all equal finite; their advantages are exactly 0.
        scale: divide by the group's std (GRPO); False keeps only the mean baseline (Dr. GRPO,
            which removes the std's bias toward groups that are nearly all right or all wrong).

    std_g is the Bessel-corrected sample standard deviation (divide by group_size - 1), the
    convention of DeepSeekMath's GRPO as implemented in TRL (`Tensor.std`). Returns a float tensor
    of the same shape (fp32, or float64 for float64 rewards); no gradient flows to the rewards.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(
            f"rewards must be a torch.Tensor of shape [num_groups * group_size], got {type(rewards).__name__}"
        )
    if rewards.dtype.is_complex:
        raise TypeError(f"rewards must be a real tensor, got {rewards.dtype}")
    c.check_rank("rewards", rewards, 1, "[num_groups * group_size]")
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if rewards.numel() == 0 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must have shape [num_groups * group_size] with num_groups >= 1 and group_size={group_size}, "
            f"got {list(rewards.shape)}"
        )
    eps = c.check_number("eps", eps, minimum=0.0, inclusive=False)
    r = rewards.detach().to(c.math_dtype(rewards))
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite (NaN or inf found)")
    groups = r.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if not scale:
        return centered.view(-1)
    return (centered / (groups.std(dim=1, keepdim=True) + eps)).view(-1)


def grpo_loss(student_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """loss = -(sum_i sum_t M_t A_i s_t) / max(1, sum_i sum_t M_t): the policy gradient, token-level.

    Args:
        student_logp: [B, T] float, s_t = log p(y_t) of the sampled tokens; carries the gradient.
        advantages: [B] per-rollout advantages (e.g. `grpo_advantages`), treated as constants.
        mask: [B, T] bool, True for tokens that count.

    The mean is pooled over all valid tokens of the batch (DAPO / TRL's default "token-level"
    normalization), so every token weighs the same whatever its rollout's length. A rollout with
    A = 0 (an equal-reward group) gets exactly zero gradient. Math is fp32 (float64 for float64
    inputs); student_logp must be finite everywhere (put 0 at padded positions).

    metrics (python floats): loss, advantage_abs_mean (over rollouts), zero_advantage_frac (share
    of rollouts with A = 0, i.e. no learning signal), valid_tokens.
    """
    c.check_float_tensor("student_logp", student_logp, 2, "[B, T]")
    b, t = student_logp.shape
    c.check_float_tensor("advantages", advantages, 1, "[B]")
    c.check_shape("advantages", advantages, (b,), "[B] (B from student_logp)")
    c.check_bool_mask("mask", mask, (b, t), "[B, T] (same as student_logp)")
    c.check_same_device(student_logp=student_logp, advantages=advantages, mask=mask)

    dt = c.math_dtype(student_logp, advantages)
    s = student_logp.to(dt)
    a = advantages.detach().to(dt)[:, None]
    m = mask.to(dt)
    count = mask.sum().clamp(min=1).to(dt)
    loss = -(a * s * m).sum() / count

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "advantage_abs_mean": a.abs().mean(),
            "zero_advantage_frac": (a == 0).to(dt).mean(),
            "valid_tokens": mask.sum().to(dt),
        }
        checks = [
            (c.nonfinite_flag(student_logp.detach()), "student_logp must be finite everywhere (NaN or inf found)"),
            (c.nonfinite_flag(advantages.detach()), "advantages must be finite (NaN or inf found)"),
        ]
        return loss, c.read_checked(metrics, checks, dt)
