"""The training methods, one `Objective` per file, and their registry.

    cls = get_objective(cfg.method)           # e.g. SGSD
    objective = cls(cfg, teachers=pool, retriever=retriever)
    payload = objective.prepare(rollouts)     # teacher inputs, once per step, no grad
    micro_loss = objective.loss(micro_batch, payload)

Adding a method: a file here with an `Objective` subclass (and its payload), one line in
`OBJECTIVES`, its name in `sgsd_fast.config.METHODS` with any fields it reads, and its test.
"""
from __future__ import annotations

from sgsd_fast.train.objectives.base import MicroBatch, MicroLoss, Objective, Payload, Rollouts
from sgsd_fast.train.objectives.grpo import GRPO
from sgsd_fast.train.objectives.opsd import OPSD
from sgsd_fast.train.objectives.sampled_rkl import SampledRKL
from sgsd_fast.train.objectives.sgsd import SGSD

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (SGSD, OPSD, SampledRKL, GRPO)}


def get_objective(method: str) -> type[Objective]:
    """The objective class of `method` (a `TrainConfig.method` value)."""
    if method not in OBJECTIVES:
        raise ValueError(f"method must be one of {tuple(OBJECTIVES)}, got {method!r}")
    return OBJECTIVES[method]


__all__ = ["OBJECTIVES", "MicroBatch", "MicroLoss", "Objective", "Payload", "Rollouts", "get_objective"]
