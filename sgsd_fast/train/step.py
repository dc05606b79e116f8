"""One optimizer update from scored rollouts: loss, gradient accumulation, clipping, optimizer, schedule.

The student runs ONE forward/backward per rollout micro-batch, shared by all K teachers: its
final hidden states go straight into the objective's fused loss op together with the lm_head
weight, so no logit matrix is ever built. The objective (`sgsd_fast.train.objectives`) returns
each micro-batch's loss summed over its units (rollouts for SGSD, valid tokens for OPSD, sampled
RKL and GRPO); dividing by the batch's count of those units makes the accumulated gradient equal
the gradient of the full-batch loss.

A non-finite loss, hidden state or gradient norm skips the update (gradients dropped, no
optimizer step) instead of crashing; the trainer counts it. The learning-rate schedule still
advances, so the schedule is a function of the step index alone (and resume stays exact).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsd_fast.config import TrainConfig
from sgsd_fast.models import lm_head_weight
from sgsd_fast.train.batch import forward_hidden, pack
from sgsd_fast.train.objectives import MicroBatch, Objective, Payload


# ---- optimizer and schedule ------------------------------------------------------------------


def resolve_optim(name: str, device: torch.device) -> str:
    """'auto' = bitsandbytes 8-bit AdamW (paged on CUDA), or torch's AdamW where bitsandbytes is not
    installed (it is a dependency only on the platforms it ships wheels for)."""
    if name != "auto":
        return name
    if importlib.util.find_spec("bitsandbytes") is None:
        return "adamw_torch"
    return "paged_adamw_8bit" if device.type == "cuda" else "adamw_8bit"


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: bitsandbytes 8-bit (paged on CUDA) by default, or torch's AdamW."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    kw = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
              weight_decay=cfg.weight_decay)
    name = resolve_optim(cfg.optim, device)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, **kw)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at 0-based `step`: linear warmup reaching 1 at step `warmup_steps`, then
    constant / linear decay / cosine decay toward 0 at `max_steps`. Warmup starts above 0 so the
    first step is not wasted."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.lr_scheduler_type == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.lr_scheduler_type == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))


# ---- the update -----------------------------------------------------------------------------


@dataclass
class StepInputs:
    """One batch of B verified rollouts (T = longest completion) and the objective's payload for it."""

    prompt_ids: Sequence[Sequence[int]]
    completion_ids: Sequence[Sequence[int]]
    mask: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B]
    payload: Payload  # what `objective.prepare` built (teacher scores, advantages, ...)


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)


def update_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                objective: Objective, inp: StepInputs, cfg: TrainConfig, *, pad_id: int) -> StepResult:
    """Accumulate the objective's loss over micro-batches, clip, step the optimizer (unless
    non-finite), advance the lr."""
    b = len(inp.completion_ids)
    length = inp.mask.shape[1]
    weight = lm_head_weight(model)
    device = weight.device
    batch_units = max(1, objective.units(inp.mask))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    model.train()  # dropout stays off in our configs; train mode lets gradient checkpointing work
    total_loss, metrics_acc = 0.0, {}
    # A NaN teacher score (or any non-finite input) would poison the loss: skip rather than crash.
    finite = inp.payload.finite()
    try:
        for b0 in range(0, b if finite else 0, cfg.micro_batch_size):
            sl = slice(b0, min(b0 + cfg.micro_batch_size, b))
            batch = pack(inp.prompt_ids[sl], inp.completion_ids[sl], pad_id=pad_id, length=length, device=device)
            hidden = forward_hidden(model, batch)
            if not bool(torch.isfinite(hidden).all()):
                finite = False
                break
            mask = inp.mask[sl].to(device)
            # Any valid id at masked positions: the losses ignore them.
            mb = MicroBatch(hidden=hidden, head=weight, targets=batch.targets.clamp(min=0), mask=mask,
                            rewards=inp.rewards[sl], rows=sl)
            out = objective.loss(mb, inp.payload)
            loss = out.total / batch_units
            if not bool(torch.isfinite(loss)):
                finite = False
                break
            loss.backward()
            total_loss += float(loss.detach())
            share = objective.units(mask) / batch_units
            for key, value in out.metrics.items():
                metrics_acc[key] = metrics_acc.get(key, 0.0) + share * float(value)
    finally:
        model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = float("nan")
    if finite:
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        # After a skipped step torch warns that the scheduler moved without an optimizer step: intended.
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*")
        scheduler.step()
    return StepResult(loss=total_loss if finite else float("nan"), grad_norm=grad_norm, skipped=not finite, lr=lr,
                      metrics={f"loss/{k}": v for k, v in metrics_acc.items()} if finite else {})
