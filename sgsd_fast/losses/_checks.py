"""Argument checks shared by the loss functions; every error names the argument and what was expected.

Value checks that need the tensors' contents (finiteness, weight sums) are returned as lazy
"violation" flags so that a loss can fold them into the single host sync it already pays for its
metrics, instead of one `.item()` per check.
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_float_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {t.dtype}")
    check_rank(name, t, ndim, shape_doc)


def check_rank(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {ndim}), got shape {tuple(t.shape)}")


def check_bool_mask(name: str, t, shape: tuple[int, ...], shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = token counts) of shape {shape_doc}, got {t.dtype}")
    check_shape(name, t, shape, shape_doc)


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], shape_doc: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {list(shape)}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_number(name: str, value, *, minimum: float, inclusive: bool) -> float:
    """A finite real number >= minimum (inclusive) or > minimum (exclusive); bools are rejected."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def math_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64 (oracle tests), else fp32 (SPEC §2: never bf16 math)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def nonfinite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: does t contain NaN or +-inf? (no host sync)."""
    if not t.dtype.is_floating_point:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    return ~torch.isfinite(t).all()


def raise_violations(flags: list[bool], messages: list[str]) -> None:
    """Raise ValueError with the first message whose flag is set (flags already on the host)."""
    for flag, message in zip(flags, messages):
        if flag:
            raise ValueError(message)
