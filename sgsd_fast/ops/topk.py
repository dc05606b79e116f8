"""Top-k distillation divergences straight from hidden states (SPEC §6).

- `teacher_topk_divergence` (OPSD, k=50): the teacher's top-k ids; student and teacher are both
  renormalized over that support and compared with the GKD divergence (fkl / rkl / jsd beta).
- `student_topk_tail_divergence` (SDPO, k=100): the student's top-k ids plus one tail bucket
  holding the remaining mass 1 - sum(top-k) of each side, compared with JSD_alpha.

Both walk the valid rows in chunks, so at most `chunk_size x V` logits (a few fp32 buffers of that
size) exist at any time; this is not a fused kernel. The student gradient of each chunk is
computed inside the forward (the loss is a scalar, so backward only rescales it), which is what
lets the chunk's logits be freed at once; teachers get no gradient. Math is fp32 (float64 for
float64 inputs); the logits are never rounded to bf16 (SPEC §2).
"""
from __future__ import annotations

import numbers
from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from sgsd_fast.ops import common as c
from sgsd_fast.ops.reference import divergence_per_entry

RowFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
_METRIC_NAMES = ("loss", "student_mass", "teacher_mass", "valid_tokens")


def teacher_topk_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    k: int = 50,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_head: torch.Tensor | None = None,
    entry_clip: float | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = 512,
    ignore_mask: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over valid rows of D(p_T^k || p_S^k) on the teacher's top-k support, renormalized.

    Args:
        student_hidden: [N, H] student final hidden states (gradient flows here and to weight).
        weight: [V, H] lm_head weight of the student.
        teacher_hidden: [N, H] hidden states of one teacher at the same token positions (no grad).
        k: support size, 1 <= k <= V (OPSD: 50).
        kind, beta: "fkl" = KL(p_T || p_S), "rkl" = KL(p_S || p_T), "jsd" = generalized JSD_beta in
            the GKD convention (beta = 0 is fkl, beta = 1 is rkl; SPEC §6), all on the support.
        temperature: logits are divided by it on both sides (OPSD: the sampling temperature 1.1).
        teacher_head: [V, H] lm_head of the teacher; None = `weight` (self-distillation), used
            detached for the teacher side.
        entry_clip: if set, each support summand is capped at this value (max only) before the sum.
        mask: [N] bool, True = row counts; False rows get no loss, no gradient and no GEMM FLOPs.
            None = every row counts.
        chunk_size: rows per chunk; peak extra memory is a few chunk_size x V fp32 buffers.
        ignore_mask, teacher_weight: deprecated spellings of ``~mask`` and ``teacher_head``
            (translated, with a DeprecationWarning).

    Returns:
        (loss, metrics): loss = sum over valid rows / max(1, #valid) (0 with zero gradients when
        all rows are ignored); metrics (python floats, means over valid rows): loss, student_mass
        and teacher_mass (probability mass of each full distribution on the support), valid_tokens.
    """
    if kind not in ("fkl", "rkl", "jsd"):
        raise ValueError(f"kind must be 'fkl', 'rkl' or 'jsd', got {kind!r}")
    beta = c.check_number("beta", beta, minimum=0.0, inclusive=True)
    if beta > 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    if entry_clip is not None:
        entry_clip = c.check_number("entry_clip", entry_clip, minimum=float("-inf"), inclusive=False)
    teacher_head = c.renamed("teacher_topk_divergence", "teacher_head", teacher_head, "teacher_weight", teacher_weight)
    mask = c.row_mask("teacher_topk_divergence", mask, ignore_mask)
    vocab = _check_common(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size)
    _check_k(k, 1, vocab, "V")

    def rows(zs: torch.Tensor, zt: torch.Tensor):
        ids = zt.topk(k, dim=-1).indices
        s_top, t_top = zs.gather(1, ids), zt.gather(1, ids)
        entries = divergence_per_entry(torch.log_softmax(s_top, -1), torch.log_softmax(t_top, -1), kind, beta)
        if entry_clip is not None:
            entries = entries.clamp(max=entry_clip)
        with torch.no_grad():
            s_mass = (torch.logsumexp(s_top, -1) - torch.logsumexp(zs, -1)).exp()
            t_mass = (torch.logsumexp(t_top, -1) - torch.logsumexp(zt, -1)).exp()
        return entries.sum(-1), s_mass, t_mass

    return _chunked(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size, rows)


def student_topk_tail_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    k: int = 100,
    alpha: float = 0.5,
    temperature: float = 1.0,
    teacher_head: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = 512,
    ignore_mask: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over valid rows of JSD_alpha over the student's top-k ids plus one tail bucket.

    Both sides use their full-vocabulary probabilities at the student's top-k ids (chosen without
    gradient) and a (k+1)-th bucket with the rest of their mass, 1 - sum(top-k). The tail is
    computed as logsumexp over the non-top-k logits minus the full LSE (not log(1 - sum), which
    loses all precision when the top-k holds almost all the mass). alpha follows the GKD
    convention of SPEC §6 (0 = forward KL(p_T || p_S), 1 = reverse KL, in between JSD_alpha; SDPO
    default 0.5). Needs 1 <= k < V so that the tail is not empty.

    Other arguments, the returned metrics (student_mass / teacher_mass = mass of each side on the
    student's top-k) and the memory bound are those of `teacher_topk_divergence`.
    """
    alpha = c.check_number("alpha", alpha, minimum=0.0, inclusive=True)
    if alpha > 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    teacher_head = c.renamed("student_topk_tail_divergence", "teacher_head", teacher_head,
                             "teacher_weight", teacher_weight)
    mask = c.row_mask("student_topk_tail_divergence", mask, ignore_mask)
    vocab = _check_common(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size)
    _check_k(k, 1, vocab - 1, "V - 1 (the tail bucket must not be empty)")

    def rows(zs: torch.Tensor, zt: torch.Tensor):
        ids = zs.detach().topk(k, dim=-1).indices
        s_lse, t_lse = torch.logsumexp(zs, -1, keepdim=True), torch.logsumexp(zt, -1, keepdim=True)
        s_top, t_top = zs.gather(1, ids) - s_lse, zt.gather(1, ids) - t_lse
        s_tail = torch.logsumexp(zs.scatter(1, ids, float("-inf")), -1, keepdim=True) - s_lse
        t_tail = torch.logsumexp(zt.scatter(1, ids, float("-inf")), -1, keepdim=True) - t_lse
        entries = divergence_per_entry(torch.cat([s_top, s_tail], 1), torch.cat([t_top, t_tail], 1), "jsd", alpha)
        with torch.no_grad():
            s_mass, t_mass = torch.logsumexp(s_top, -1).exp(), torch.logsumexp(t_top, -1).exp()
        return entries.sum(-1), s_mass, t_mass

    return _chunked(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size, rows)


def _check_k(k, low: int, high: int, high_doc: str) -> None:
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or not low <= k <= high:
        raise ValueError(f"k must be an integer in [{low}, {high_doc}] = [{low}, {high}], got {k!r}")


def _check_common(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size) -> int:
    c.check_float_tensor("student_hidden", student_hidden, 2, "[N, H]")
    c.check_float_tensor("weight", weight, 2, "[V, H]")
    c.check_float_tensor("teacher_hidden", teacher_hidden, 2, "[N, H]")
    n, h = student_hidden.shape
    c.check_shape("weight", weight, (weight.shape[0], h), "[V, H] (H from student_hidden)")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row, got shape [0, H]")
    c.check_shape("teacher_hidden", teacher_hidden, (n, h), "[N, H] (same as student_hidden)")
    tensors = {"student_hidden": student_hidden, "weight": weight, "teacher_hidden": teacher_hidden}
    if teacher_head is not None:
        c.check_float_tensor("teacher_head", teacher_head, 2, "[V, H]")
        c.check_shape("teacher_head", teacher_head, tuple(weight.shape), "[V, H] (same as weight)")
        tensors["teacher_head"] = teacher_head
    if mask is not None:
        c.check_bool_mask("mask", mask, (n,), "[N] (True = row counts)")
        tensors["mask"] = mask
    c.check_same_device(**tensors)
    c.check_number("temperature", temperature, minimum=0.0, inclusive=False)
    if not isinstance(chunk_size, numbers.Integral) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return weight.shape[0]


def _chunked(student_hidden, weight, teacher_hidden, teacher_head, mask, temperature, chunk_size, rows: RowFn):
    n = student_hidden.shape[0]
    keep = torch.ones(n, dtype=torch.bool, device=student_hidden.device) if mask is None else mask
    # Compacting the valid rows first (one host sync) spares the ignored rows their GEMM FLOPs.
    valid = keep.nonzero().squeeze(1)
    teacher_head = None if teacher_head is None else teacher_head.detach()
    loss, stats = _ChunkedStudentDivergence.apply(
        student_hidden, weight, teacher_hidden.detach(), teacher_head, valid, rows, float(temperature), chunk_size
    )
    values = torch.cat([loss.detach().reshape(1), stats]).tolist()
    return loss, dict(zip(_METRIC_NAMES, values))


class _ChunkedStudentDivergence(torch.autograd.Function):
    """Forward walks row chunks and stores d(loss)/d(student_hidden, weight); backward rescales them."""

    @staticmethod
    def forward(ctx, xs, w, xt, wt, valid, rows: RowFn, temperature: float, chunk_size: int):
        """wt: the teacher's lm_head, or None to share the student's (detached on the teacher side)."""
        dt = c.math_dtype(xs, w)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # One up-cast copy of a low-precision weight, so that no logit is ever rounded to bf16.
        wf = w.detach().to(dt)
        wtf = wf if wt is None else wt.to(dt)
        grad_x = torch.zeros(xs.shape, dtype=dt, device=xs.device) if need_x else None
        grad_w = torch.zeros(w.shape, dtype=dt, device=w.device) if need_w else None
        total = torch.zeros((), dtype=dt, device=xs.device)
        mass = torch.zeros(2, dtype=dt, device=xs.device)
        count = valid.numel()
        for start in range(0, count, chunk_size):
            idx = valid[start : start + chunk_size]
            hs = xs.detach()[idx].to(dt)
            zt = (xt[idx].to(dt) @ wtf.T) / temperature
            zs = ((hs @ wf.T) / temperature).requires_grad_(need_x or need_w)
            with torch.enable_grad():
                per_row, s_mass, t_mass = rows(zs, zt)
                chunk_loss = per_row.sum()
            if need_x or need_w:
                (dz,) = torch.autograd.grad(chunk_loss, zs)
                dz = dz / temperature
                if need_x:
                    grad_x.index_copy_(0, idx, dz @ wf)
                if need_w:
                    grad_w.addmm_(dz.T, hs)
            total += chunk_loss.detach()
            mass += torch.stack([s_mass.sum(), t_mass.sum()])
        scale = 1.0 / max(1, count)
        # Kept in the math dtype; rounded to the input dtype once, after the final rescale.
        ctx.save_for_backward(None if grad_x is None else grad_x * scale, None if grad_w is None else grad_w * scale)
        ctx.input_dtypes = (xs.dtype, w.dtype)
        stats = torch.cat([mass * scale, torch.tensor([float(count)], dtype=dt, device=xs.device)])
        ctx.mark_non_differentiable(stats)
        return total * scale, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.input_dtypes
        gx = None if grad_x is None else (grad_x * grad_loss).to(x_dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        return gx, gw, None, None, None, None, None, None
