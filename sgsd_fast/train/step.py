"""One optimizer update from scored rollouts: loss, gradient accumulation, clipping, optimizer, schedule.

The student runs ONE forward/backward per rollout micro-batch, shared by all K teachers: its
final hidden states go straight into the fused loss op together with the lm_head weight, so no
logit matrix is ever built. Each micro-batch's loss is scaled so the accumulated gradient equals
the gradient of the full-batch loss:

* ``sgsd``: the loss is a mean over rollouts -> scale by (rollouts in micro-batch) / B;
* ``opsd`` and ``sampled_rkl``: a pooled mean over valid tokens -> scale by (valid tokens in
  micro-batch) / (valid tokens in batch).

A non-finite loss, hidden state or gradient norm skips the update (gradients dropped, no
optimizer step) instead of crashing; the trainer counts it. The learning-rate schedule still
advances, so the schedule is a function of the step index alone (and resume stays exact).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from sgsd_fast.config import TrainConfig
from sgsd_fast.models import lm_head_weight
from sgsd_fast.ops.linear_logprobs import linear_logprobs
from sgsd_fast.ops.sgsd import sgsd_loss
from sgsd_fast.losses import sampled_token_rkl
from sgsd_fast.train.teachers import IGNORE_INDEX, forward_hidden, pack


# ---- optimizer and schedule ------------------------------------------------------------------


def resolve_optim(name: str, device: torch.device) -> str:
    if name == "auto":
        return "paged_adamw_8bit" if device.type == "cuda" else "adamw_8bit"
    return name


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
    """Everything the loss needs about one batch of B scored rollouts (T = longest completion).

    teacher_logp [B, K, T] with teacher_weights [B, K] for sgsd; teacher_logp [B, 1, T] for
    sampled_rkl; teacher_hidden [B, T, H] with teacher_head [V, H] for opsd.
    """

    prompt_ids: Sequence[Sequence[int]]
    completion_ids: Sequence[Sequence[int]]
    mask: torch.Tensor  # [B, T] bool
    rewards: torch.Tensor  # [B]
    teacher_logp: torch.Tensor | None = None
    teacher_weights: torch.Tensor | None = None
    teacher_hidden: torch.Tensor | None = None
    teacher_head: torch.Tensor | None = None


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)


def _micro_loss(method: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, sl: slice,
                inp: StepInputs, cfg: TrainConfig, valid_total: int) -> tuple[torch.Tensor, dict[str, float], float]:
    """(scaled loss, metrics, metric weight) of one micro-batch."""
    mask = inp.mask[sl].to(hidden.device)
    b = inp.mask.shape[0]
    if method == "sgsd":
        loss, metrics = sgsd_loss(hidden, weight, targets, inp.teacher_logp[sl], mask, inp.rewards[sl],
                                  inp.teacher_weights[sl], tau=cfg.tau_g, clip=cfg.support_clip,
                                  deadzone=cfg.deadzone, temperature=cfg.logprob_temperature,
                                  outcome_baseline=float(inp.rewards.mean()) if cfg.sgsd_outcome == "centered" else None)
        share = (sl.stop - sl.start) / b
        return loss * share, metrics, share
    valid = int(mask.sum())
    share = valid / max(1, valid_total)
    bm, t, h = hidden.shape
    flat_targets = torch.where(mask, targets, torch.full_like(targets, IGNORE_INDEX)).reshape(-1)
    if method == "sampled_rkl":
        s = linear_logprobs(hidden.reshape(-1, h), weight, flat_targets, temperature=cfg.logprob_temperature,
                            ignore_index=IGNORE_INDEX).reshape(bm, t)
        loss, metrics = sampled_token_rkl(s, inp.teacher_logp[sl, 0], mask)
        return loss * share, metrics, share
    # opsd: full-vocabulary divergence, logits at the sampling temperature (the OPSD recipe).
    from sgsd_fast.ops.linear_divergence import linear_divergence

    kind = "fkl" if cfg.opsd_beta == 0.0 else "rkl" if cfg.opsd_beta == 1.0 else "jsd"
    teacher = inp.teacher_hidden[sl].reshape(1, bm * t, h)
    total = linear_divergence(hidden.reshape(-1, h), weight, teacher, teacher_weight=inp.teacher_head, kind=kind,
                              beta=cfg.opsd_beta, temperature=cfg.temperature, entry_clip=cfg.opsd_entry_clip,
                              ignore_mask=~mask.reshape(-1), reduction="sum")
    loss = total / max(1, valid_total)
    return loss, {"loss": float(total.detach()) / max(1, valid), "valid_tokens": float(valid)}, share


def update_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                inp: StepInputs, cfg: TrainConfig, *, pad_id: int) -> StepResult:
    """Accumulate the loss over micro-batches, clip, step the optimizer (unless non-finite), advance the lr."""
    method = cfg.method
    b = len(inp.completion_ids)
    length = inp.mask.shape[1]
    weight = lm_head_weight(model)
    device = weight.device
    valid_total = int(inp.mask.sum())
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    model.train()  # dropout stays off in our configs; train mode lets gradient checkpointing work
    total_loss, metrics_acc = 0.0, {}
    # A NaN teacher score (or any non-finite input) would poison the loss: skip rather than crash.
    finite = all(bool(torch.isfinite(t).all()) for t in (inp.teacher_logp, inp.teacher_hidden) if t is not None)
    try:
        for b0 in range(0, b if finite else 0, cfg.micro_batch_size):
            sl = slice(b0, min(b0 + cfg.micro_batch_size, b))
            batch = pack(inp.prompt_ids[sl], inp.completion_ids[sl], pad_id=pad_id, length=length, device=device)
            hidden = forward_hidden(model, batch)
            if not bool(torch.isfinite(hidden).all()):
                finite = False
                break
            targets = batch.targets.clamp(min=0)  # any id at masked positions; the loss ignores them
            loss, metrics, share = _micro_loss(method, hidden, weight, targets, sl, inp, cfg, valid_total)
            if not bool(torch.isfinite(loss)):
                finite = False
                break
            loss.backward()
            total_loss += float(loss.detach())
            for key, value in metrics.items():
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
