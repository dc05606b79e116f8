"""Fused LM-head ops: per-token log-probs and multi-teacher divergences without N x V logits.

Public API (backend="auto" picks Triton on CUDA tensors and the C++ extension on CPU tensors;
backend="reference" is the naive materialized PyTorch oracle):

    linear_logprobs(hidden, weight, targets, ...)            -> logp [N] (fp32)
    linear_divergence(student_hidden, weight, teacher_hidden, ...) -> loss
    teacher_logprobs(teacher_hidden, weight, targets, ...)   -> [B, K, T] (no grad)
    sgsd_loss(student_hidden, weight, targets, teacher_logp, ...) -> (loss, metrics)
"""
from __future__ import annotations

import importlib

# Imported eagerly: the submodules share the functions' names, and a lazily imported submodule
# would shadow the function of the same name. Triton itself is only imported on first Triton use.
from sgsd_fast.ops.linear_divergence import linear_divergence
from sgsd_fast.ops.linear_logprobs import linear_logprobs

# sgsd_loss combines linear_logprobs with sgsd_fast.losses (which imports ops.reference), so it
# is resolved on first access to keep `import sgsd_fast.losses` free of an import cycle.
_LAZY = {"teacher_logprobs": "sgsd_fast.ops.sgsd", "sgsd_loss": "sgsd_fast.ops.sgsd"}

__all__ = ["linear_logprobs", "linear_divergence", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgsd_fast.ops' has no attribute {name!r}")
