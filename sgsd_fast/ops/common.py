"""What every op and loss shares: the ignore sentinel, the math-dtype rule and the argument checks.

Every check raises TypeError / ValueError naming the argument and what was expected. Value checks
that need the tensors' contents (finiteness, weight sums) are returned as lazy "violation" flags,
so a loss can fold them into the one host sync it already pays for its metrics instead of one
`.item()` per check.

Mask convention of the public ops and losses: ``mask`` is a bool tensor with True = the row or
token counts. Targets of the log-prob ops use the PyTorch cross-entropy convention instead:
``ignore_index`` (default `IGNORE_INDEX`) marks rows to skip.
"""
from __future__ import annotations

import math
import numbers
import os
import warnings

import torch

#: Target id of rows / tokens the log-prob ops skip (PyTorch's cross-entropy default).
IGNORE_INDEX = -100
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "triton", "cpu", "reference")


def math_dtype(*inputs: torch.Tensor | torch.dtype) -> torch.dtype:
    """float64 if any input (tensor or dtype) is float64 (oracle tests, gradcheck), else fp32.

    SPEC §2: the softmax and divergence math is never done in bf16/fp16.
    """
    dtypes = (x if isinstance(x, torch.dtype) else x.dtype for x in inputs)
    return torch.float64 if any(d == torch.float64 for d in dtypes) else torch.float32


# ---- shapes, dtypes, devices ------------------------------------------------------------------


def check_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    check_rank(name, t, ndim, shape_doc)


def check_rank(name: str, t: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} (rank {ndim}), got shape {tuple(t.shape)}")


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16 or float64), got {t.dtype}")


def check_float_tensor(name: str, t, ndim: int, shape_doc: str) -> None:
    """A floating tensor of rank `ndim` (type checked before rank, so the message fits the mistake)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    check_float(name, t)
    check_rank(name, t, ndim, shape_doc)


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], shape_doc: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_doc} = {list(shape)}, got {list(t.shape)}")


def check_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] must equal {what} = {expected}, got shape {tuple(t.shape)}")


def check_bool_mask(name: str, t, shape: tuple[int, ...], shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = counts) of shape {shape_doc}, got {t.dtype}")
    check_shape(name, t, shape, shape_doc)


def check_same_dtype(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} ({a.dtype}) and {name_b} ({b.dtype}) must have the same dtype")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors on one device; None entries (absent optional arguments) are skipped."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_targets(targets: torch.Tensor, n: int, vocab: int, ignore_index: int) -> None:
    check_tensor("targets", targets, 1, "[N]")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor (int64) of shape [N], got {targets.dtype}")
    if targets.shape[0] != n:
        raise ValueError(f"targets must have shape [N] = [{n}] to match hidden, got {tuple(targets.shape)}")
    if n == 0:
        return
    valid = targets != ignore_index
    # One host sync, paid once per call: an out-of-range id would otherwise read out of bounds in a kernel.
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(f"targets must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; "
                         f"found {first}")


def check_batch_targets(targets, shape: tuple[int, int] | None, mask: torch.Tensor | None) -> None:
    """[B, T] integer targets; with a mask, ids must be valid (>= 0) wherever mask is True."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an int64 torch.Tensor of shape [B, T], got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an integer tensor (int64) of shape [B, T], got {targets.dtype}")
    check_rank("targets", targets, 2, "[B, T]")
    if shape is not None:
        check_shape("targets", targets, shape, "[B, T] (B, T from student_hidden)")
    # linear_logprobs checks the upper bound; a negative id under mask == True would silently be
    # treated as ignored there, so it is caught here.
    if mask is not None and bool((mask & (targets < 0)).any()):
        raise ValueError("targets must be valid ids >= 0 wherever mask is True (found a negative id)")


def renamed(fn: str, name: str, value, old_name: str, old_value, *, stacklevel: int = 3):
    """`value`, or what the caller passed under the deprecated keyword `old_name` (with a warning)."""
    if old_value is None:
        return value
    if value is not None:
        raise ValueError(f"{fn}: pass {name} or the deprecated {old_name}, not both")
    warnings.warn(f"{fn}({old_name}=...) is deprecated: use {name}", DeprecationWarning, stacklevel=stacklevel)
    return old_value


def row_mask(fn: str, mask: torch.Tensor | None, ignore_mask: torch.Tensor | None, *,
             stacklevel: int = 3) -> torch.Tensor | None:
    """The keep-mask of an op taking ``mask`` (True = row counts), translating the old keyword.

    ``ignore_mask`` (True = row ignored) was the convention of `linear_divergence` and the top-k
    divergences before the public ops agreed on one; it still works, as ``mask=~ignore_mask``, with
    a DeprecationWarning pointing `stacklevel` frames up. The op checks the result's shape as `mask`.
    """
    if ignore_mask is not None and (not isinstance(ignore_mask, torch.Tensor) or ignore_mask.dtype != torch.bool):
        raise TypeError(f"ignore_mask must be a bool tensor (True = row ignored), got {ignore_mask!r:.60}")
    inverted = None if ignore_mask is None else ~ignore_mask
    return renamed(fn, "mask=~ignore_mask", mask, "ignore_mask", inverted, stacklevel=stacklevel + 1)


# ---- numbers and backends -----------------------------------------------------------------------


def check_number(name: str, value, *, minimum: float, inclusive: bool) -> float:
    """A finite real number >= minimum (inclusive) or > minimum (exclusive); bools are rejected."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= minimum if inclusive else value > minimum)
    if not ok:
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_temperature(temperature: float) -> None:
    # inf passes "> 0" but turns every distribution uniform: never what a caller meant.
    if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> triton on CUDA, the C++ extension on CPU (the reference ops when it cannot be built)."""
    check_backend(backend)
    if backend != "auto":
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
        if backend == "cpu" and device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        return backend
    if device.type == "cuda":
        return "triton"
    from sgsd_fast._ext import load_extension

    return "cpu" if load_extension() else "reference"


# ---- lazy value checks --------------------------------------------------------------------------


def nonfinite_flag(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: does t contain NaN or +-inf? (no host sync)."""
    if not t.dtype.is_floating_point:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    return ~torch.isfinite(t).all()


def read_checked(metrics: dict[str, torch.Tensor], checks: list[tuple[torch.Tensor, str]],
                 dtype: torch.dtype) -> dict[str, float]:
    """The 0-dim metric tensors as python floats and the lazy (flag, message) checks, in one host
    sync; raises ValueError with the message of the first flag that is set."""
    device = next(iter(metrics.values())).device
    flat = list(metrics.values()) + [flag for flag, _ in checks]
    values = torch.stack([v.to(device=device, dtype=dtype) for v in flat]).tolist()
    for flag, (_, message) in zip(values[len(metrics):], checks):
        if flag:
            raise ValueError(message)
    return dict(zip(metrics, values[: len(metrics)]))
