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

_EXPORTS = {
    "linear_logprobs": "sgsd_fast.ops.linear_logprobs",
    "linear_divergence": "sgsd_fast.ops.linear_divergence",
    "teacher_logprobs": "sgsd_fast.ops.sgsd",
    "sgsd_loss": "sgsd_fast.ops.sgsd",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    # Lazy so that importing one op does not compile or import the others' Triton kernels.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sgsd_fast.ops' has no attribute {name!r}")
