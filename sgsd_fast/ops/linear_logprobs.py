"""linear_logprobs: log p(target) per row straight from hidden states and the lm_head weight.

PLACEHOLDER (foundation issue in progress): validates inputs and dispatches to the reference
backend only. The Triton and C++ backends replace this body.
"""
from __future__ import annotations

import torch

from sgsd_fast.ops import _validate as v
from sgsd_fast.ops.reference import linear_logprobs_reference


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    return_lse: bool = False,
    return_entropy: bool = False,
):
    v.check_tensor("hidden", hidden, 2, "[N, H]")
    v.check_tensor("weight", weight, 2, "[V, H]")
    v.check_float("hidden", hidden)
    v.check_float("weight", weight)
    v.check_same_dtype("hidden", hidden, "weight", weight)
    v.check_dim("weight", weight, 1, hidden.shape[1], "hidden.shape[1] (H)")
    v.check_same_device(hidden=hidden, weight=weight, targets=targets)
    v.check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)
    v.check_temperature(temperature)
    v.check_backend(backend)
    logp, lse, ent = linear_logprobs_reference(hidden, weight, targets, temperature=temperature, ignore_index=ignore_index)
    logp = logp.float() if hidden.dtype != torch.float64 else logp
    if return_lse or return_entropy:
        return logp, (lse if return_lse else None), (ent if return_entropy else None)
    return logp
