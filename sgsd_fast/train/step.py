"""One optimizer update from scored rollouts: loss, gradient accumulation, clipping, optimizer, schedule.

The student runs ONE forward/backward per rollout micro-batch, shared by all K teachers: its
final hidden states go straight into the objective's fused loss op together with the lm_head
weight, so no logit matrix is ever built. The objective (`sgsd_fast.train.objectives`) returns
each micro-batch's loss summed over its units (rollouts for SGSD, valid tokens for OPSD, sampled
RKL and GRPO); dividing by the batch's count of those units makes the accumulated gradient equal
the gradient of the full-batch loss.

A non-finite loss, hidden state or gradient norm skips the update (gradients dropped, no
optimizer step) instead of crashing; the trainer counts it.

Data parallel (`sgsd_fast.train.distributed`): each rank holds its share of the batch; the units
are summed over ranks first, each rank's loss is multiplied by the world size because DDP (or
FSDP's reduce-scatter, for a sharded model) averages the gradients, and the per-micro-batch
finiteness decision is taken jointly, so every rank runs the same number of backward passes and
skips the same steps. The learning-rate schedule still
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
from sgsd_fast.train.batch import PackedBatch, pack, states_and_head
from sgsd_fast.train.distributed import SINGLE, Distributed, accumulate
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


def _student_pass(model: nn.Module, ddp: nn.Module | None, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's [b, T, H] states and the [V, H] lm_head weight they are scored with: through DDP
    (which then reduces the gradients) when replicated, through the FSDP root (which gathers the head
    and reduce-scatters every gradient) when sharded, plainly in one process."""
    if ddp is None:
        return states_and_head(model, batch)
    hidden = ddp(batch.input_ids, batch.attention_mask, batch.position_ids, batch.prefix_ids)
    return batch.completion_hidden(hidden), lm_head_weight(model)


def update_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                objective: Objective, inp: StepInputs, cfg: TrainConfig, *, pad_id: int,
                dist: Distributed = SINGLE, ddp: nn.Module | None = None) -> StepResult:
    """Accumulate the objective's loss over micro-batches, clip, step the optimizer (unless
    non-finite), advance the lr.

    dist, ddp: data parallel (`Distributed` and its `data_parallel(model)`, None for a model sharded
    in place by `sgsd_fast.train.sharding`); `inp` is then this rank's share of the batch, and loss,
    metrics and the update are those of the whole batch.
    """
    b = len(inp.completion_ids)
    length = inp.mask.shape[1]
    device = next(model.parameters()).device
    batch_units = max(1, dist.sum_int(objective.units(inp.mask)))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    model.train()  # dropout stays off in our configs; train mode lets gradient checkpointing work
    total_loss, metrics_acc = 0.0, {}
    # A NaN teacher score (or any non-finite input) would poison the loss: skip rather than crash.
    finite = dist.all_true(inp.payload.finite())
    share_prefix = cfg.prefix_sharing(student=True)  # not under gradient checkpointing or FSDP
    starts = list(range(0, b if finite else 0, cfg.micro_batch_size))
    try:
        for b0 in starts:
            sl = slice(b0, min(b0 + cfg.micro_batch_size, b))
            with accumulate(ddp, sync=b0 == starts[-1]):
                batch = pack(inp.prompt_ids[sl], inp.completion_ids[sl], pad_id=pad_id, length=length, device=device,
                             share_prefix=share_prefix)
                hidden, head = _student_pass(model, ddp, batch)
                loss = out = None
                mask = inp.mask[sl].to(device)
                if bool(torch.isfinite(hidden).all()):
                    # Any valid id at masked positions: the losses ignore them.
                    mb = MicroBatch(hidden=hidden, head=head, targets=batch.targets.clamp(min=0), mask=mask,
                                    rewards=inp.rewards[sl], rows=sl)
                    out = objective.loss(mb, inp.payload)
                    loss = out.total / batch_units
                if not dist.all_true(loss is not None and bool(torch.isfinite(loss))):
                    finite = False
                    break
                (loss * dist.world_size if dist.enabled else loss).backward()
            total_loss += float(loss.detach())
            share = objective.units(mask) / batch_units
            for key, value in out.metrics.items():
                metrics_acc[key] = metrics_acc.get(key, 0.0) + share * float(value)
    finally:
        model.eval()
    if finite and dist.enabled:
        keys = sorted(metrics_acc)
        total_loss, *values = dist.sum_floats([total_loss] + [metrics_acc[k] for k in keys])
        metrics_acc = dict(zip(keys, values))
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
