"""Kernel benchmark cases: one shape, several implementations of the same computation.

A `KernelSpec` names the computation (`bench`) and its shape; `build(spec, impl, device)` returns
a zero-argument callable that runs it once (forward, plus backward where the computation is a
training loss) and returns a detached tensor used to cross-check implementations against each
other. An implementation that cannot run here raises `Unavailable` with the reason.

benches and their implementations:
- logprobs: linear_logprobs fwd+bwd. ours | naive (ops.reference, autograd) | cce (cut-cross-entropy:
  its CUDA kernels, or impl="torch_compile" on CPU) | floor (the three plain GEMMs, time only).
  With frozen_weight the lm_head gets no gradient (LoRA): two GEMMs are the floor.
- teacher_logprobs: K teachers' forward log-probs, no grad. ours | naive
- sgsd_loss: K teachers' log-probs + gated loss + student backward, from hidden states. ours | naive
- divergence: linear_divergence fwd+bwd (kind jsd, fkl or rkl). ours | naive | liger (K=1 only)
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from sgsd_fast.bench import naive

BENCHES = ("logprobs", "teacher_logprobs", "sgsd_loss", "divergence")

# GEMM units (one unit = 2·N·V·H FLOPs) that the computation needs at least: the student's
# forward + dX + dW is 3, each no-grad teacher forward is 1 (ARCHITECTURE.md, kernel notes).
_STUDENT_UNITS = {"logprobs": 3, "teacher_logprobs": 0, "sgsd_loss": 3, "divergence": 3}
_TEACHER_UNITS = {"logprobs": 0, "teacher_logprobs": 1, "sgsd_loss": 1, "divergence": 1}

# Live N x V fp32 tensors the naive version holds at its peak (rough; guards the shared CPU only).
_NAIVE_NV_TENSORS = {"logprobs": lambda k: 4, "teacher_logprobs": lambda k: k + 1,
                     "sgsd_loss": lambda k: k + 4, "divergence": lambda k: 2 * k + 5}


class Unavailable(Exception):
    """This implementation cannot run for this spec on this machine; the message says why."""


@dataclass(frozen=True)
class KernelSpec:
    """One benchmarked shape. n = tokens (B·T with B = 1 for the SGSD benches)."""

    bench: str
    n: int
    h: int
    v: int
    k: int = 1
    kind: str = "jsd"
    dtype: str = "float32"
    frozen_weight: bool = False  # logprobs only: the weight needs no gradient (as under LoRA)

    def __post_init__(self) -> None:
        if self.frozen_weight and self.bench != "logprobs":
            raise ValueError(f"KernelSpec.frozen_weight is for bench 'logprobs', got {self.bench!r}")

    def gemm_flops(self) -> float:
        """Lower bound on the FLOPs of the computation (GEMM work only)."""
        units = _STUDENT_UNITS[self.bench] - self.frozen_weight + _TEACHER_UNITS[self.bench] * self.k
        return units * 2.0 * self.n * self.v * self.h

    def executed_flops(self, impl: str, device_type: str) -> float:
        """GEMM FLOPs `impl` actually executes (>= gemm_flops): the store-free backward recomputes
        the logits (one unit more); on CPU a frozen weight's eager forward does not."""
        # linear_divergence forms its gradient during the forward: no recompute.
        recompute = impl == "ours" and self.bench in ("logprobs", "sgsd_loss") and not (
            self.bench == "logprobs" and self.frozen_weight and device_type == "cpu")
        return self.gemm_flops() + recompute * 2.0 * self.n * self.v * self.h

    def naive_bytes(self) -> int:
        """Rough peak of the naive version, for skipping shapes the machine cannot hold."""
        return _NAIVE_NV_TENSORS[self.bench](self.k) * self.n * self.v * 4

    def label(self) -> dict:
        return asdict(self)


@dataclass
class _Inputs:
    hidden: torch.Tensor  # [N, H], requires grad
    weight: torch.Tensor  # [V, H], requires grad
    targets: torch.Tensor  # [N]
    teacher_hidden: torch.Tensor  # [K, N, H]
    mask: torch.Tensor  # [N] bool
    rewards: torch.Tensor  # [1]
    teacher_weights: torch.Tensor  # [1, K]


def make_inputs(spec: KernelSpec, device: torch.device, seed: int = 0) -> _Inputs:
    """Random inputs whose logits have std ≈ 3 and whose teachers disagree moderately with the student.

    Moderate disagreement (|δ| of order 1) keeps the gated loss away from its flat regions, so
    every teacher gets a nonzero polarity, as in training.
    """
    dtype = getattr(torch, spec.dtype)
    # Drawn on the device itself: at the GPU shapes a CPU draw + copy would take seconds per case.
    g = torch.Generator(device=device).manual_seed(seed)
    rand = dict(generator=g, device=device)
    hidden = torch.randn(spec.n, spec.h, **rand)
    weight = torch.randn(spec.v, spec.h, **rand) * (3.0 / spec.h**0.5)
    teacher_hidden = hidden + 0.5 * torch.randn(spec.k, spec.n, spec.h, **rand)
    return _Inputs(
        hidden=hidden.to(dtype).requires_grad_(True),
        weight=weight.to(dtype).requires_grad_(not spec.frozen_weight),
        targets=torch.randint(0, spec.v, (spec.n,), **rand),
        teacher_hidden=teacher_hidden.to(dtype),
        mask=torch.rand(spec.n, **rand) > 0.05,
        rewards=torch.ones(1, device=device),
        teacher_weights=torch.softmax(torch.randn(1, spec.k, **rand), dim=-1),
    )


def _backward(x: _Inputs, loss: torch.Tensor) -> None:
    # Fresh gradients each call, so every implementation pays for allocating them.
    x.hidden.grad = None
    x.weight.grad = None
    loss.backward()


def _require_op(name: str):
    """The public op `sgsd_fast.ops.<name>`, or Unavailable while it does not exist yet."""
    try:
        from sgsd_fast import ops

        return getattr(ops, name)
    except (ImportError, AttributeError) as err:
        raise Unavailable(f"sgsd_fast.ops.{name} not importable ({err})") from err


def _logprobs(spec: KernelSpec, impl: str, x: _Inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    if impl == "ours":
        op = _require_op("linear_logprobs")

        def run() -> torch.Tensor:
            logp = op(x.hidden, x.weight, x.targets)
            _backward(x, logp.sum())
            return logp.detach()

        return run
    if impl == "naive":
        from sgsd_fast.ops.reference import linear_logprobs_reference

        def run() -> torch.Tensor:
            logp = linear_logprobs_reference(x.hidden, x.weight, x.targets)[0]
            _backward(x, logp.sum())
            return logp.detach()

        return run
    if impl == "cce":
        if importlib.util.find_spec("cut_cross_entropy") is None:
            raise Unavailable("cut-cross-entropy is not installed")
        from cut_cross_entropy import linear_cross_entropy

        # Its Triton kernels need CUDA; on CPU its torch.compile'd materializing implementation runs.
        cce_impl = "cce" if device.type == "cuda" else "torch_compile"

        def run() -> torch.Tensor:
            logp = -linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none", impl=cce_impl)
            _backward(x, logp.sum())
            return logp.detach().float()

        return run
    if impl == "floor":
        # The three GEMMs any fwd+bwd needs (logits, dX, dW; no dW for a frozen weight) and nothing
        # else: the time floor. Its output is one logit column, copied so that z is freed (not
        # comparable to log-probs).
        h, w = x.hidden.detach(), x.weight.detach()

        def run() -> torch.Tensor:
            z = h @ w.t()
            z @ w  # noqa: B018 - dX-shaped GEMM, timed for its cost
            if not spec.frozen_weight:
                z.t() @ h  # noqa: B018 - dW-shaped GEMM
            return z[:, 0].clone()

        return run
    raise Unavailable(f"no implementation {impl!r} for logprobs")


def _teacher_logprobs(spec: KernelSpec, impl: str, x: _Inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    targets = x.targets[None]
    teacher_hidden = x.teacher_hidden[:, None]  # [K, B=1, T=N, H]
    if impl == "ours":
        op = _require_op("teacher_logprobs")
        return lambda: op(teacher_hidden, x.weight.detach(), targets)
    if impl == "naive":
        return lambda: naive.naive_teacher_logprobs(teacher_hidden, x.weight.detach(), targets)
    raise Unavailable(f"no implementation {impl!r} for teacher_logprobs")


def _sgsd_loss(spec: KernelSpec, impl: str, x: _Inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    targets, mask = x.targets[None], x.mask[None]
    student_hidden, teacher_hidden = x.hidden[None], x.teacher_hidden[:, None]
    if impl == "ours":
        teacher_op, loss_op = _require_op("teacher_logprobs"), _require_op("sgsd_loss")

        def run() -> torch.Tensor:
            teacher_logp = teacher_op(teacher_hidden, x.weight.detach(), targets)
            loss, _ = loss_op(student_hidden, x.weight, targets, teacher_logp, mask, x.rewards, x.teacher_weights)
            _backward(x, loss)
            return loss.detach().float()

        return run
    if impl == "naive":

        def run() -> torch.Tensor:
            loss = naive.naive_sgsd_loss(student_hidden, x.weight, targets, teacher_hidden, mask, x.rewards,
                                         x.teacher_weights)
            _backward(x, loss)
            return loss.detach().float()

        return run
    raise Unavailable(f"no implementation {impl!r} for sgsd_loss")


def _divergence(spec: KernelSpec, impl: str, x: _Inputs, device: torch.device) -> Callable[[], torch.Tensor]:
    beta = {"jsd": 0.5, "fkl": 0.0, "rkl": 1.0}[spec.kind]  # GKD convention: 0 = forward KL, 1 = reverse
    if impl in ("ours", "naive"):
        if impl == "ours":
            op = _require_op("linear_divergence")
        else:
            from sgsd_fast.ops.reference import linear_divergence_reference as op

        def run() -> torch.Tensor:
            loss = op(x.hidden, x.weight, x.teacher_hidden, kind=spec.kind, beta=beta)
            _backward(x, loss)
            return loss.detach().float()

        return run
    if impl == "liger":
        if spec.k != 1:
            raise Unavailable("liger's fused linear JSD takes a single teacher")
        if importlib.util.find_spec("liger_kernel") is None:
            raise Unavailable("liger-kernel is not installed")
        from liger_kernel.transformers import LigerFusedLinearJSD

        # Same convention as ours: M = beta·P_teacher + (1-beta)·P_student, beta = 0 -> forward KL.
        module = LigerFusedLinearJSD(jsd_beta=beta)
        teacher = x.teacher_hidden[0]

        def run() -> torch.Tensor:
            loss = module(x.hidden, x.weight, teacher, x.weight.detach(), None)
            _backward(x, loss)
            return loss.detach().float()

        return run
    raise Unavailable(f"no implementation {impl!r} for divergence")


_BUILDERS = {"logprobs": _logprobs, "teacher_logprobs": _teacher_logprobs, "sgsd_loss": _sgsd_loss,
             "divergence": _divergence}


def build(spec: KernelSpec, impl: str, device: torch.device, x: _Inputs | None = None) -> Callable[[], torch.Tensor]:
    """A callable running `impl` of `spec` once on `device` (inputs made here unless given)."""
    if spec.bench not in _BUILDERS:
        raise ValueError(f"bench must be one of {BENCHES}, got {spec.bench!r}")
    return _BUILDERS[spec.bench](spec, impl, x if x is not None else make_inputs(spec, device), device)
