"""linear_divergence: gated multi-teacher full-vocabulary divergence straight from hidden states.

For every token t (row of ``student_hidden``) and teacher k, with student logits z = W h_t / T and
teacher logits y_k = W_T h^k_t / T (W_T = ``teacher_head``, default ``weight``)::

    loss_t = sum_k g_tk * sum_v min(e_v(t, k), entry_clip)

where e_v is the per-vocabulary summand of forward KL(P_k||Q), reverse KL(Q||P_k) or the
generalized JSD_beta in the GKD convention (SPEC §6; ``kind="jsd"`` with beta 0 / 1 *is* fkl / rkl)
and the clip (OPSD's per-entry clip, max only) is skipped when ``entry_clip`` is None. Only the
student side gets gradients (``student_hidden`` and ``weight``); teachers and gates are constants,
also when ``teacher_head`` is ``weight`` itself.

How it runs (``backend`` "cpu" = C++ extension, "triton" = CUDA or the Triton interpreter):
valid rows are compacted, then processed in token chunks whose [C, V] workspaces fit
``workspace_bytes``. Per chunk: one GEMM for the student logits and a max / log-sum-exp sweep,
then per teacher one GEMM and one row kernel (teacher LSE sweep + one fused loss/gradient sweep),
then one sweep that turns the accumulated dL/ds into dL/dz and two GEMMs for dX and dW. Nothing of size
N x V is allocated. The gradient sweep relies on the log-softmax chain rule
dL/dz_i = dL/ds_i - Q_i sum_j dL/ds_j (s = log Q): with s treated as free, every divergence kind,
teacher and clipped entry contributes an elementwise term, so no extra pass is needed for the JSD
or for clipping (see sgsd_fast/csrc/linear_divergence.cpp).

For reductions "mean" and "sum" the gradient is computed during the forward (the loss is
terminal; backward only scales it by grad_output, no host sync). For "none" the backward
recomputes the sweep with the incoming per-row gradient as row weights. Math is fp32 (fp64 for
float64 inputs); returned losses are fp32 (fp64), gradients come back in the input dtype.

Precision of bf16/fp16 inputs: logits are never rounded to the input dtype. On CUDA (sm80+) the
GEMMs keep low-precision operands and write fp32 (``out_dtype``); dL/dz is then rounded once to the
input dtype for the two gradient GEMMs and dW accumulates in fp32 across chunks. Elsewhere the
weights are upcast once per call (an fp32 copy of [V, H]).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from sgsd_fast.ops import common as v
from sgsd_fast.ops.common import math_dtype
from sgsd_fast.ops.reference import linear_divergence_reference

KINDS = ("fkl", "rkl", "jsd")
REDUCTIONS = ("mean", "sum", "none")
# Three fp32 [C, V] buffers per chunk when gradients are needed: at V = 151,936 this is ~147 rows.
DEFAULT_WORKSPACE_BYTES = 256 * 2**20


def linear_divergence(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    teacher_head: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    kind: str = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    entry_clip: float | None = None,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ignore_mask: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gated sum over K teachers of a full-vocabulary divergence, per token, without N x V logits.

    Args:
        student_hidden: [N, H] final hidden states of the student (gets a gradient).
        weight: [V, H] student lm_head weight (gets a gradient).
        teacher_hidden: [K, N, Ht] teacher hidden states (detached).
        teacher_head: [V, Ht] teacher lm_head (detached); None = ``weight`` (self-distillation).
        gates: [N, K] non-negative finite per-token teacher weights (constants); None = 1/K.
        kind: "fkl" (KL(P_T||P_S)), "rkl" (KL(P_S||P_T)) or "jsd" (generalized JSD_beta).
        beta: JSD mixture coefficient in [0, 1]; with kind="jsd", 0 -> fkl and 1 -> rkl.
            Ignored by "fkl" / "rkl".
        temperature: both sides' logits are divided by it (no T^2 factor).
        entry_clip: if set (> 0), each vocabulary summand is capped at it before the sum (the loss
            can then be negative, as in OPSD).
        mask: [N] bool, True = row counts; False rows get loss 0, no gradient and are not counted
            by "mean". None = every row counts.
        reduction: "mean" (sum over valid rows / max(1, #valid)), "sum", or "none" ([N] losses).
        backend: "auto" | "triton" | "cpu" | "reference".
        workspace_bytes: bound on the per-chunk [C, V] workspaces (sets the token chunk size).
        ignore_mask, teacher_weight: deprecated spellings of ``~mask`` and ``teacher_head``
            (translated, with a DeprecationWarning).

    Returns:
        fp32 scalar (fp64 for float64 inputs), or [N] for reduction="none".

    Compacting the valid rows of ``mask`` costs one host sync; the "mean" normalizer stays on the
    device.
    """
    teacher_head = v.renamed("linear_divergence", "teacher_head", teacher_head, "teacher_weight", teacher_weight)
    mask = v.row_mask("linear_divergence", mask, ignore_mask)
    _check_args(student_hidden, weight, teacher_hidden, teacher_head, gates, kind, beta, temperature,
                entry_clip, mask, reduction, workspace_bytes)
    backend = v.resolve_backend(backend, student_hidden.device)
    if backend == "reference":
        out = linear_divergence_reference(
            student_hidden, weight, teacher_hidden, teacher_head=teacher_head, gates=gates, kind=kind,
            beta=beta, temperature=temperature, entry_clip=entry_clip, mask=mask, reduction=reduction)
        return out if out.dtype == torch.float64 else out.float()

    n, k = student_hidden.shape[0], teacher_hidden.shape[0]
    md = math_dtype(student_hidden)
    if gates is None:
        gates = torch.full((n, k), 1.0 / k, dtype=md, device=student_hidden.device)
    if kind == "jsd" and beta in (0.0, 1.0):
        kind = "fkl" if beta == 0.0 else "rkl"
    if mask is None:
        valid_idx, norm = None, torch.tensor(float(max(n, 1)), dtype=md, device=student_hidden.device)
    else:
        valid_idx = torch.nonzero(mask).squeeze(1)
        norm = mask.sum().clamp(min=1).to(md)
    cfg = _Config(kind=kind, beta=float(beta), temperature=float(temperature),
                  entry_clip=None if entry_clip is None else float(entry_clip), reduction=reduction,
                  backend=backend, workspace_bytes=int(workspace_bytes))
    tw = weight if teacher_head is None else teacher_head
    return _LinearDivergence.apply(student_hidden, weight, teacher_hidden, tw, gates, valid_idx, norm, cfg)


@dataclass(frozen=True)
class _Config:
    kind: str
    beta: float
    temperature: float
    entry_clip: float | None
    reduction: str
    backend: str
    workspace_bytes: int


class _LinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx, norm, cfg):
        ctx.cfg = cfg
        ctx.dtypes = (student_hidden.dtype, weight.dtype)
        if cfg.reduction == "none":
            # grad_output is per row: the gradient pass has to wait for it (recompute in backward).
            per_token, _, _ = _sweep(student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx,
                                     None, cfg, need_x=False, need_w=False)
            ctx.save_for_backward(student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx)
            return per_token
        row_weight = 1.0 / norm if cfg.reduction == "mean" else None
        per_token, dx, dw = _sweep(student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx,
                                   row_weight, cfg, need_x=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        ctx.save_for_backward(dx, dw)
        total = per_token.sum()
        return total / norm if cfg.reduction == "mean" else total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        cfg = ctx.cfg
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return (None,) * 8  # only a teacher-side input asked for a gradient; it gets none
        if cfg.reduction == "none":
            student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx = ctx.saved_tensors
            _, dx, dw = _sweep(student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx,
                               grad_out.to(math_dtype(student_hidden)), cfg,
                               need_x=ctx.needs_input_grad[0], need_w=ctx.needs_input_grad[1])
        else:
            dx, dw = ctx.saved_tensors
            # scale in the math dtype, round to the input dtype once
            dx = None if dx is None else dx * grad_out
            dw = None if dw is None else dw * grad_out
        dx = None if dx is None else dx.to(ctx.dtypes[0])
        dw = None if dw is None else dw.to(ctx.dtypes[1])
        return dx, dw, None, None, None, None, None, None


def _gemm_dtype(t: torch.Tensor) -> torch.dtype:
    """Operand dtype of the GEMMs: bf16/fp16 stay low precision only where the GEMM can write fp32
    directly (CUDA sm80+); elsewhere operands are upcast once, since rounding logits to bf16
    before the divergence costs 5-25% gradient error."""
    if (t.device.type == "cuda" and t.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(t.device)[0] >= 8):
        return t.dtype
    return math_dtype(t)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    if a.dtype == out.dtype:
        return torch.mm(a, b, out=out)
    return torch.mm(a, b, out_dtype=out.dtype, out=out)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype)


def _rows(t: torch.Tensor, idx: torch.Tensor | None, c0: int, c1: int) -> torch.Tensor:
    return t[c0:c1] if idx is None else t.index_select(0, idx[c0:c1])


def _sweep(student_hidden, weight, teacher_hidden, teacher_head, gates, valid_idx, row_weight, cfg: _Config,
           *, need_x: bool, need_w: bool):
    """Per-row losses [N] and, if asked, dL/dX [N, H] and dL/dW [V, H] (math dtype) of
    sum_t row_weight_t * loss_t, where row_weight is None (= 1), a scalar tensor or an [N] tensor."""
    ops = _row_ops(cfg.backend)
    dev = student_hidden.device
    md = math_dtype(student_hidden)
    n, h = student_hidden.shape
    vocab = weight.shape[0]
    k = teacher_hidden.shape[0]
    n_rows = n if valid_idx is None else valid_idx.numel()
    need_grad = need_x or need_w
    per_token = torch.zeros(n, dtype=md, device=dev)
    dx = torch.zeros(n, h, dtype=md, device=dev) if need_x else None
    dw = torch.zeros(vocab, h, dtype=md, device=dev) if need_w else None
    if n_rows == 0:
        return per_token, dx, dw

    gd = _gemm_dtype(student_hidden)
    w_s = weight.detach().to(gd)
    w_t = w_s if _same_tensor(teacher_head, weight) else teacher_head.detach().to(gd)
    w_s_t, w_t_t = w_s.t(), w_t.t()
    # z_s, z_t (+ the gradient accumulator, + its low-precision copy for the CUDA half GEMMs)
    row_bytes = (3 if need_grad else 2) * vocab * torch.finfo(md).bits // 8
    if need_grad and gd != md:
        row_bytes += vocab * torch.finfo(gd).bits // 8
    chunk = max(1, min(n_rows, cfg.workspace_bytes // row_bytes))
    zs_buf = torch.empty(chunk, vocab, dtype=md, device=dev)
    zt_buf = torch.empty(chunk, vocab, dtype=md, device=dev)
    acc_buf = torch.empty(chunk, vocab, dtype=md, device=dev) if need_grad else None
    empty = torch.empty(0, dtype=md, device=dev)
    inv_t = 1.0 / cfg.temperature
    if row_weight is not None and row_weight.dim() == 1 and valid_idx is not None:
        row_weight = row_weight.index_select(0, valid_idx)

    for c0 in range(0, n_rows, chunk):
        c1 = min(c0 + chunk, n_rows)
        c = c1 - c0
        x = _rows(student_hidden, valid_idx, c0, c1).detach()
        zs = _mm(x.to(gd), w_s_t, zs_buf[:c])
        if inv_t != 1.0:
            zs.mul_(inv_t)
        stats_s = ops.stats(zs)
        g = _rows(gates, valid_idx, c0, c1).detach().to(md)
        loss = torch.zeros(c, dtype=md, device=dev)
        if need_grad:
            gg = g if row_weight is None else g * (row_weight if row_weight.dim() == 0 else row_weight[c0:c1, None])
            acc = acc_buf[:c].zero_()
            rowsum = torch.zeros(c, dtype=md, device=dev)
        for i in range(k):
            zt = _mm(_rows(teacher_hidden[i], valid_idx, c0, c1).detach().to(gd), w_t_t, zt_buf[:c])
            if inv_t != 1.0:
                zt.mul_(inv_t)
            ops.accumulate(zs, stats_s, zt, g[:, i].contiguous(), gg[:, i].contiguous() if need_grad else empty,
                           loss, acc if need_grad else empty, rowsum if need_grad else empty,
                           cfg.kind, cfg.beta, cfg.entry_clip, need_grad)
        _put_rows(per_token, valid_idx, c0, c1, loss)
        if not need_grad:
            continue
        ops.finalize(zs, stats_s, acc, rowsum, inv_t)  # acc <- dL/d(raw logits)
        dz = acc.to(gd)
        if need_x:
            _put_rows(dx, valid_idx, c0, c1, _mm(dz, w_s, torch.empty(c, h, dtype=md, device=dev)))
        if need_w:
            if dw.dtype == dz.dtype:
                dw.addmm_(dz.t(), x.to(gd))
            else:
                torch.addmm(dw, dz.t(), x.to(gd), out_dtype=md, out=dw)
    return per_token, dx, dw


def _put_rows(dst: torch.Tensor, idx: torch.Tensor | None, c0: int, c1: int, src: torch.Tensor) -> None:
    if idx is None:
        dst[c0:c1] = src
    else:
        dst.index_copy_(0, idx[c0:c1], src)


class _CppRowOps:
    """torch.ops.sgsd_fast.linear_divergence_* behind the same three calls as the Triton module."""

    @staticmethod
    def stats(logits):
        return torch.ops.sgsd_fast.linear_divergence_stats(logits)

    @staticmethod
    def accumulate(*args):
        torch.ops.sgsd_fast.linear_divergence_accumulate(*args)

    @staticmethod
    def finalize(*args):
        torch.ops.sgsd_fast.linear_divergence_finalize(*args)


def _row_ops(backend: str):
    if backend == "triton":
        from sgsd_fast.ops.triton import divergence

        return divergence
    from sgsd_fast._ext import require_extension

    require_extension()
    if not hasattr(torch.ops.sgsd_fast, "linear_divergence_accumulate"):
        raise RuntimeError("the built sgsd_fast._C predates sgsd_fast/csrc/linear_divergence.cpp; rebuild it with "
                           "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)")
    return _CppRowOps


def _check_args(student_hidden, weight, teacher_hidden, teacher_head, gates, kind, beta, temperature, entry_clip,
                mask, reduction, workspace_bytes) -> None:
    v.check_tensor("student_hidden", student_hidden, 2, "[N, H]")
    v.check_tensor("weight", weight, 2, "[V, H]")
    v.check_tensor("teacher_hidden", teacher_hidden, 3, "[K, N, Ht]")
    v.check_float("student_hidden", student_hidden)
    v.check_same_dtype("student_hidden", student_hidden, "weight", weight)
    v.check_same_dtype("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    n, h = student_hidden.shape
    v.check_dim("weight", weight, 1, h, "student_hidden.shape[1] (H)")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [V, H] with V >= 1, got {tuple(weight.shape)}")
    if teacher_hidden.shape[0] < 1:
        raise ValueError(f"teacher_hidden must have shape [K, N, Ht] with K >= 1 teachers, got "
                         f"{tuple(teacher_hidden.shape)}")
    v.check_dim("teacher_hidden", teacher_hidden, 1, n, "student_hidden.shape[0] (N)")
    if teacher_head is None:
        v.check_dim("teacher_hidden", teacher_hidden, 2, h,
                    "weight.shape[1] (H; pass teacher_head [V, Ht] for a teacher of another width)")
    else:
        v.check_tensor("teacher_head", teacher_head, 2, "[V, Ht]")
        v.check_same_dtype("student_hidden", student_hidden, "teacher_head", teacher_head)
        v.check_dim("teacher_head", teacher_head, 0, weight.shape[0], "weight.shape[0] (V)")
        v.check_dim("teacher_head", teacher_head, 1, teacher_hidden.shape[2], "teacher_hidden.shape[2] (Ht)")
    if gates is not None:
        v.check_tensor("gates", gates, 2, "[N, K]")
        v.check_float("gates", gates)
        if tuple(gates.shape) != (n, teacher_hidden.shape[0]):
            raise ValueError(f"gates must have shape [N, K] = [{n}, {teacher_hidden.shape[0]}], "
                             f"got {tuple(gates.shape)}")
        if gates.requires_grad:
            raise ValueError("gates are constants of this op (no gradient flows to them); pass gates.detach()")
    if mask is not None:
        v.check_bool_mask("mask", mask, (n,), "[N] (True = row counts)")
    v.check_same_device(student_hidden=student_hidden, weight=weight, teacher_hidden=teacher_hidden,
                        teacher_head=teacher_head, gates=gates, mask=mask)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not _is_real(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    v.check_temperature(temperature)
    if entry_clip is not None and (not _is_real(entry_clip) or not 0.0 < entry_clip < math.inf):
        raise ValueError(f"entry_clip must be None or a positive finite number, got {entry_clip!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(workspace_bytes, int) or isinstance(workspace_bytes, bool) or workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive int, got {workspace_bytes!r}")
    if gates is not None and gates.numel():
        # one host sync: a negative or non-finite gate would silently corrupt the loss
        if bool((~torch.isfinite(gates) | (gates < 0)).any()):
            raise ValueError("gates must be finite and non-negative")


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)
