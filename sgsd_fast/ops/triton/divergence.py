"""Triton row kernels of the fused multi-teacher divergence (see sgsd_fast.ops.linear_divergence).

Same contract as the C++ operators in sgsd_fast/csrc/linear_divergence.cpp: the driver computes a chunk of
logits (already divided by the temperature) with GEMMs, and these kernels sweep the vocabulary
once per row and program:

- ``stats``: per row the max m and log sum exp(z - m) (online softmax); log-probabilities are
  formed as (z - m) - log_d, which keeps the ~eps*|z| rounding of a full LSE out of them.
- ``accumulate``: one teacher; sweep 1 its LSE, sweep 2 the clipped summands into ``loss`` and,
  for the gradient, w = dL/ds (s = student log-softmax taken as free) into ``acc`` and the row
  sum of w into ``rowsum``.
- ``finalize``: ``acc <- (acc - softmax(z_s) * rowsum) * scale``: the chain rule through the
  log-softmax, dL/dz_i = dL/ds_i - Q_i sum_j dL/ds_j.

Offsets are int64 (C*V exceeds 2^31 at long context). Math runs in the buffers' dtype (fp32, or
fp64 when the caller works in float64).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

KIND_IDS = {"fkl": 0, "rkl": 1, "jsd": 2}
# 4096 fp32 elements per tile keeps a row program's registers modest on a GPU; tiny V under the
# interpreter gets the next power of two so tests do not sweep mostly-masked tiles.
_MAX_BLOCK = 4096


def _block(v: int) -> int:
    return min(_MAX_BLOCK, triton.next_power_of_2(max(v, 1)))


@triton.jit
def _row_stats(z_ptr, V, BLOCK: tl.constexpr):
    # Online softmax with a scalar running max: every tile holds at least one in-range entry, so
    # the max is finite after the first tile and masked lanes (-inf) contribute exp(-inf) = 0.
    cols = tl.arange(0, BLOCK)
    # scalars typed like the buffer, so the loop-carried types are stable for fp32 and fp64
    m = tl.max(tl.full([BLOCK], float("-inf"), z_ptr.dtype.element_ty), axis=0)
    d = tl.sum(tl.zeros([BLOCK], dtype=z_ptr.dtype.element_ty), axis=0)
    for start in range(0, V, BLOCK):
        offs = start + cols
        z = tl.load(z_ptr + offs, mask=offs < V, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    return m, tl.log(d)


@triton.jit
def _stats_kernel(z_ptr, out_ptr, V, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m, log_d = _row_stats(z_ptr + row * stride, V, BLOCK)
    tl.store(out_ptr + 2 * row, m)
    tl.store(out_ptr + 2 * row + 1, log_d)


@triton.jit
def _accumulate_kernel(
    zs_ptr, stats_ptr, zt_ptr, gate_ptr, ggate_ptr, loss_ptr, acc_ptr, rowsum_ptr,
    V, stride, beta, log_beta, log_1mb, clip,
    KIND: tl.constexpr, HAS_CLIP: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride
    zt_row = zt_ptr + row * stride
    ms = tl.load(stats_ptr + 2 * row)
    ds = tl.load(stats_ptr + 2 * row + 1)
    mt, dt = _row_stats(zt_row, V, BLOCK)
    cols = tl.arange(0, BLOCK)
    loss_acc = tl.zeros([BLOCK], dtype=zs_ptr.dtype.element_ty)
    w_acc = tl.zeros([BLOCK], dtype=zs_ptr.dtype.element_ty)
    if NEED_GRAD:
        gg = tl.load(ggate_ptr + row)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        # masked lanes: s = t = 0 gives finite e and w, zeroed below by `inb`
        s = (tl.load(zs_row + offs, mask=inb, other=0.0) - ms) - ds
        t = (tl.load(zt_row + offs, mask=inb, other=0.0) - mt) - dt
        if KIND == 0:
            p = tl.exp(t)
            e = p * (t - s)
            w = -p
        elif KIND == 1:
            q = tl.exp(s)
            e = q * (s - t)
            w = q * (s - t + 1.0)  # the +1 cancels in the chain rule unless clipping masks entries
        else:
            q = tl.exp(s)
            p = tl.exp(t)
            a = t + log_beta
            b = s + log_1mb
            hi = tl.maximum(a, b)
            log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))
            w = (1.0 - beta) * q * (s - log_m)
            e = beta * p * (t - log_m) + w
        if HAS_CLIP:
            # torch.clamp(max=c) passes the gradient where e <= c: ties agree with autograd
            keep = e <= clip
            e = tl.where(keep, e, clip)
            w = tl.where(keep, w, 0.0)
        loss_acc += tl.where(inb, e, 0.0)
        if NEED_GRAD:
            w = tl.where(inb, w, 0.0)
            w_acc += w
            a_ptrs = acc_ptr + row * stride + offs
            tl.store(a_ptrs, tl.load(a_ptrs, mask=inb, other=0.0) + gg * w, mask=inb)
    g = tl.load(gate_ptr + row)
    tl.store(loss_ptr + row, tl.load(loss_ptr + row) + g * tl.sum(loss_acc, axis=0))
    if NEED_GRAD:
        tl.store(rowsum_ptr + row, tl.load(rowsum_ptr + row) + gg * tl.sum(w_acc, axis=0))


@triton.jit
def _finalize_kernel(zs_ptr, stats_ptr, acc_ptr, rowsum_ptr, V, stride, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ms = tl.load(stats_ptr + 2 * row)
    ds = tl.load(stats_ptr + 2 * row + 1)
    r = tl.load(rowsum_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        inb = offs < V
        q = tl.exp((tl.load(zs_ptr + row * stride + offs, mask=inb, other=0.0) - ms) - ds)
        a_ptrs = acc_ptr + row * stride + offs
        tl.store(a_ptrs, (tl.load(a_ptrs, mask=inb, other=0.0) - q * r) * scale, mask=inb)


def stats(logits: torch.Tensor) -> torch.Tensor:
    """[C, 2]: row max m and log sum exp(z - m) of a contiguous [C, V] tensor."""
    c, v = logits.shape
    out = torch.empty(c, 2, dtype=logits.dtype, device=logits.device)
    if c:
        _stats_kernel[(c,)](logits, out, v, logits.stride(0), BLOCK=_block(v))
    return out


def accumulate(
    student_logits: torch.Tensor,
    student_stats: torch.Tensor,
    teacher_logits: torch.Tensor,
    gate: torch.Tensor,
    grad_gate: torch.Tensor,
    loss: torch.Tensor,
    acc: torch.Tensor,
    rowsum: torch.Tensor,
    kind: str,
    beta: float,
    entry_clip: float | None,
    need_grad: bool,
) -> None:
    """Add one teacher's gated (clipped) divergence to ``loss`` and its dL/ds to ``acc``/``rowsum``."""
    c, v = student_logits.shape
    if teacher_logits.stride() != student_logits.stride():
        raise ValueError("student_logits and teacher_logits must share one contiguous [C, V] layout")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"kind='jsd' needs beta in (0, 1) (0 and 1 map to fkl/rkl), got {beta}")
    if c == 0:
        return
    log_beta, log_1mb = (math.log(beta), math.log1p(-beta)) if kind == "jsd" else (0.0, 0.0)
    _accumulate_kernel[(c,)](
        student_logits, student_stats, teacher_logits, gate, grad_gate if need_grad else gate, loss,
        acc if need_grad else student_logits, rowsum if need_grad else loss,
        v, student_logits.stride(0), float(beta), log_beta, log_1mb,
        0.0 if entry_clip is None else float(entry_clip),
        KIND=KIND_IDS[kind], HAS_CLIP=entry_clip is not None, NEED_GRAD=need_grad, BLOCK=_block(v),
    )


def finalize(
    student_logits: torch.Tensor, student_stats: torch.Tensor, acc: torch.Tensor, rowsum: torch.Tensor, scale: float
) -> None:
    """acc <- (acc - softmax(student_logits) * rowsum) * scale, in place."""
    c, v = student_logits.shape
    if acc.stride() != student_logits.stride():
        raise ValueError("acc and student_logits must share one contiguous [C, V] layout")
    if c:
        _finalize_kernel[(c,)](student_logits, student_stats, acc, rowsum, v, student_logits.stride(0), float(scale),
                               BLOCK=_block(v))
