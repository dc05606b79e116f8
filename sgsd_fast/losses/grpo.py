"""GRPO group-normalized advantages (SPEC §6, the reference RL baseline)."""
from __future__ import annotations

import numbers

import torch

from sgsd_fast.losses import _checks as c


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (r_i - mean_g) / (std_g + eps) within each group of `group_size` consecutive rollouts.

    Args:
        rewards: [num_groups * group_size] real rewards, grouped contiguously (the rollouts of one
            prompt are adjacent).
        group_size: rollouts per prompt, >= 2 (one rollout has no group baseline).
        eps: > 0, keeps groups whose rewards are all equal finite; their advantages are exactly 0.

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
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.detach().to(dt)
    if not bool(torch.isfinite(r).all()):
        raise ValueError("rewards must be finite (NaN or inf found)")
    groups = r.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    return (centered / (groups.std(dim=1, keepdim=True) + eps)).view(-1)
