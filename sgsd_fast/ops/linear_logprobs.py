"""linear_logprobs and teacher_logprobs: log p(target) per row straight from hidden states and the lm_head.

Using linear_logprobs::

    import torch
    from sgsd_fast.ops import linear_logprobs

    hidden = model_output.hidden_states[-1][:, :-1].reshape(-1, H)   # [N, H], after the final norm
    targets = input_ids[:, 1:].reshape(-1)                            # [N] int64, -100 = ignored
    logp = linear_logprobs(hidden, model.lm_head.weight, targets, temperature=1.1)  # [N] fp32
    (-(advantages * logp)).sum().backward()                           # grads reach hidden and W

    # Teachers: forward only, with the log-sum-exp and the entropy of each row.
    with torch.no_grad():
        logp_t, lse_t, entropy_t = linear_logprobs(
            teacher_hidden, weight, targets, return_lse=True, return_entropy=True)

The N x V logit matrix never exists: logits are formed block by block (rows x vocabulary tile),
reduced with an online softmax, and recomputed in the backward ("store-free", as in Cut
Cross-Entropy), so the extra memory is bounded by `workspace_bytes`, independent of N.

Math is fp32 for fp32/bf16/fp16 inputs and float64 for float64 inputs (for gradcheck). Rows whose
target equals ignore_index are dropped before any GEMM, return 0 and get a zero gradient.

Backends: "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cpu" (the C++
extension sgsd_fast._C), "reference" (naive materialized PyTorch, sgsd_fast.ops.reference),
"auto" = triton on CUDA, cpu on CPU.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.autograd.function import once_differentiable

from sgsd_fast.ops import common as v
from sgsd_fast.ops.common import IGNORE_INDEX, math_dtype
from sgsd_fast.ops.reference import linear_logprobs_reference

# Default byte budget of the logit workspace. On CPU, 32 MiB is a ~2900 x 2900 fp32 block: BLAS
# GEMMs with thousands of rows, and small next to the lm_head gradient itself (113 MB for
# SmolLM2). On a GPU the backward's [rows, V] dz block feeds cuBLAS, which wants hundreds of rows
# even at V = 152k; 256 MiB gives ~280 rows there and is small next to a model's activations.
DEFAULT_WORKSPACE_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}
# Vocabulary tile cap of the C++ kernels: wider tiles would only shrink the row chunk.
_MAX_VOCAB_TILE = 8192


def _cpu_blocks(vocab: int, dtype: torch.dtype, budget: int) -> tuple[int, int]:
    """(chunk_rows, vocab_tile) of a roughly square math-dtype logit block of at most `budget` bytes."""
    elem_bytes = torch.finfo(math_dtype(dtype)).bits // 8
    tile = max(1, min(vocab, _MAX_VOCAB_TILE, math.isqrt(max(1, budget // elem_bytes))))
    return max(1, budget // (elem_bytes * tile)), tile


def _triton_chunk_rows(vocab: int, weight_dtype: torch.dtype, budget: int, device: torch.device,
                       lowp: bool = False) -> int:
    """Rows of the [rows, V] dz workspace in `budget` (its bytes per row: `dz_row_bytes`), rounded
    down to whole row blocks of the device's tile when there is room for one: otherwise every
    chunk would end on a partly masked block of recompute programs."""
    from sgsd_fast.ops.triton.configs import tile_config
    from sgsd_fast.ops.triton.logprobs import dz_row_bytes

    block_n = tile_config(device, weight_dtype).block_n
    rows = max(1, budget // max(1, dz_row_bytes(vocab, weight_dtype, lowp)))
    return rows if rows < block_n else rows - rows % block_n


def _triton_blocks(n_rows: int, vocab: int, weight_dtype: torch.dtype, budget: int, device: torch.device,
                   lowp: bool = False) -> tuple[int, int]:
    """(chunk_rows, slab_cols) of the Triton backward's dz workspace in `budget`: vocabulary slabs
    of all N rows when V > N (the accumulator is then [N, H] rather than [V, H]: see
    ops/triton/logprobs.py), their width rounded down to whole vocabulary tiles; row chunks of the
    whole vocabulary (`_triton_chunk_rows`) when N >= V, when the slab order does not apply to the
    dtype, or when the budget holds no tile-wide slab of N rows."""
    from sgsd_fast.ops.triton.configs import tile_config
    from sgsd_fast.ops.triton.logprobs import dz_row_bytes, slab_order_allowed

    row_bytes = dz_row_bytes(vocab, weight_dtype, lowp)
    if vocab > n_rows and n_rows * row_bytes > budget and slab_order_allowed(weight_dtype, lowp):
        block_v = tile_config(device, weight_dtype).block_v
        cols = budget * vocab // (n_rows * row_bytes)
        if cols >= block_v:
            return n_rows, cols - cols % block_v
    return _triton_chunk_rows(vocab, weight_dtype, budget, device, lowp), vocab


def _forward_rows(hidden, weight, targets, temperature, with_entropy, backend, budget, eager_dx=False):
    """(logp, lse, entropy or None, dlogp/dX or None) of compacted rows, in the math dtype.

    eager_dx (CPU only): also dlogp/dX [N, H], from one more GEMM in this pass (see `_LinearLogprobs`)."""
    if backend == "cpu":
        from sgsd_fast._ext import require_extension

        require_extension()
        rows, tile = _cpu_blocks(weight.shape[0], hidden.dtype, budget)
        if eager_dx:
            logp, lse, ent, gx = torch.ops.sgsd_fast.linear_logprobs_fwd_dx(
                hidden, weight, targets, float(temperature), with_entropy, rows, tile)
            return logp, lse, (ent if with_entropy else None), gx
        logp, lse, ent = torch.ops.sgsd_fast.linear_logprobs_fwd(
            hidden, weight, targets, float(temperature), with_entropy, rows, tile)
        return logp, lse, (ent if with_entropy else None), None
    from sgsd_fast.ops.triton.logprobs import logprobs_forward

    return (*logprobs_forward(hidden, weight, targets, float(temperature), with_entropy), None)


def _backward_rows(hidden, weight, targets, grad, lse, temperature, need_dx, need_dw, backend, budget):
    """(dX or None, dW or None) of compacted rows, in the input dtypes."""
    if backend == "cpu":
        rows, tile = _cpu_blocks(weight.shape[0], hidden.dtype, budget)
        dx, dw = torch.ops.sgsd_fast.linear_logprobs_bwd(
            hidden, weight, targets, grad, lse, float(temperature), need_dx, need_dw, rows, tile)
        return (dx if need_dx else None), (dw if need_dw else None)
    from sgsd_fast.ops.triton.logprobs import logprobs_backward, lowp_dz

    rows, cols = _triton_blocks(hidden.shape[0], weight.shape[0], weight.dtype, budget, weight.device, lowp_dz(weight))
    return logprobs_backward(hidden, weight, targets, grad, lse, float(temperature), need_dx, need_dw, rows, cols)


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """[n] zeros with values at the compacted rows' original positions."""
    return values.new_zeros(n).index_copy_(0, rows, values)


class _LinearLogprobs(torch.autograd.Function):
    """Fused forward/backward; only logp is differentiable (lse and entropy are marked otherwise).

    Two ways to the gradient. Store-free (the default): the backward recomputes each logit block
    and forms dX and dW from it: 3 GEMM units after the forward's 1. Eager (`eager_dx`, CPU, when
    hidden needs a gradient and the weight does not, as under LoRA): dlogp/dX = (W[y] - E_p[W]) / T
    per row does not depend on the incoming gradient, so the forward accumulates it with one more
    GEMM and the backward is one [N, H] multiply: 2 GEMM units in all, and [N, H] floats kept
    instead of the hidden states.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, backend, with_entropy, budget, eager_dx):
        n = hidden.shape[0]
        md = math_dtype(hidden.dtype)
        valid = targets != ignore_index
        # Compacting the valid rows costs one host sync and an [N_valid, H] copy, and saves every
        # GEMM FLOP that ignored rows (prompt, padding) would otherwise pay.
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        h = hidden if rows is None else hidden.index_select(0, rows)
        t = (targets if rows is None else targets.index_select(0, rows)).long().contiguous()
        gx = None
        if h.shape[0] > 0:
            logp, lse, entropy, gx = _forward_rows(h, weight, t, temperature, with_entropy, backend, budget, eager_dx)
        else:
            # Three distinct tensors: marking lse/entropy non-differentiable must not touch logp.
            logp, lse, entropy = (torch.empty(0, dtype=md, device=hidden.device) for _ in range(3))
        if rows is not None:
            logp, lse = _scatter_rows(logp, rows, n), _scatter_rows(lse, rows, n)
            entropy = _scatter_rows(entropy, rows, n) if with_entropy else None
        if entropy is None:
            # autograd.Function outputs must be tensors; the wrapper turns this one into None.
            entropy = logp.new_empty(0)
        ctx.eager = eager_dx
        if eager_dx:
            ctx.hidden_meta = (hidden.shape, hidden.dtype)
            ctx.save_for_backward(gx, rows)
        else:
            # Saving the original hidden (not the compacted copy) keeps no extra activation alive.
            ctx.save_for_backward(hidden, weight, targets, lse, rows)
        ctx.temperature, ctx.backend, ctx.budget = temperature, backend, budget
        ctx.mark_non_differentiable(lse, entropy)
        return logp, lse, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp, _grad_lse, _grad_entropy):
        if ctx.eager:
            return (_LinearLogprobs._eager_dx(ctx, grad_logp), *[None] * 8)
        hidden, weight, targets, lse, rows = ctx.saved_tensors
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n_valid = hidden.shape[0] if rows is None else rows.numel()
        if n_valid == 0:
            dx = torch.zeros_like(hidden) if need_dx else None
            dw = torch.zeros_like(weight) if need_dw else None
            return dx, dw, None, None, None, None, None, None, None
        pick = (lambda x: x) if rows is None else (lambda x: x.index_select(0, rows))
        grad = pick(grad_logp).to(lse.dtype).contiguous()
        dx, dw = _backward_rows(pick(hidden), weight, pick(targets).long().contiguous(), grad, pick(lse),
                                ctx.temperature, need_dx, need_dw, ctx.backend, ctx.budget)
        if need_dx and rows is not None:
            dx = torch.zeros_like(hidden).index_copy_(0, rows, dx)
        return dx, dw, None, None, None, None, None, None, None

    @staticmethod
    def _eager_dx(ctx, grad_logp):
        """dX = grad * dlogp/dX, rows scattered back; fp32 math, one cast to the input dtype."""
        gx, rows = ctx.saved_tensors
        shape, dtype = ctx.hidden_meta
        if gx is None:  # no valid row
            return grad_logp.new_zeros(shape, dtype=dtype)
        grad = grad_logp if rows is None else grad_logp.index_select(0, rows)
        dx = (gx * grad.to(gx.dtype).unsqueeze(1)).to(dtype)
        return dx if rows is None else dx.new_zeros(shape).index_copy_(0, rows, dx)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    return_lse: bool = False,
    return_entropy: bool = False,
    workspace_bytes: int | None = None,
):
    """log softmax(hidden @ weight.T / temperature)[row, target] for every row, without N x V logits.

    Args:
        hidden: [N, H] float32/bfloat16/float16 (float64 for gradcheck); may be non-contiguous.
        weight: [V, H], same dtype and device as hidden (the lm_head weight).
        targets: [N] int64 ids in [0, V), or ignore_index for rows to skip.
        temperature: positive divisor of the logits.
        ignore_index: target value of rows that return 0 and receive no gradient.
        backend: "auto", "triton", "cpu" or "reference" (see the module docstring).
        return_lse: also return log-sum-exp of the (temperature-scaled) logits per row.
        return_entropy: also return the entropy -sum p log p of softmax(z) per row.
        workspace_bytes: byte budget of the logit block (default: 32 MiB on CPU, 256 MiB on CUDA);
            peak extra memory is this plus O((N + V) * H) (gradients, compacted rows), never O(N * V).

    Returns:
        logp [N] in float32 (float64 for float64 inputs), differentiable w.r.t. hidden and weight;
        with return_lse or return_entropy, the tuple (logp, lse | None, entropy | None). lse and
        entropy are forward-only outputs: they are marked non-differentiable (use them for
        teachers and metrics, not as losses). Ignored rows are 0 in all three.
    """
    v.check_tensor("hidden", hidden, 2, "[N, H]")
    v.check_tensor("weight", weight, 2, "[V, H]")
    v.check_float("hidden", hidden)
    v.check_float("weight", weight)
    v.check_same_dtype("hidden", hidden, "weight", weight)
    v.check_dim("weight", weight, 1, hidden.shape[1], "hidden.shape[1] (H)")
    v.check_same_device(hidden=hidden, weight=weight, targets=targets)
    v.check_targets(targets, hidden.shape[0], weight.shape[0], ignore_index)
    v.check_temperature(temperature)
    backend = v.resolve_backend(backend, hidden.device)
    if workspace_bytes is None:
        workspace_bytes = DEFAULT_WORKSPACE_BYTES["cuda" if hidden.device.type == "cuda" else "cpu"]
    elif isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes <= 0:
        raise ValueError(f"workspace_bytes must be a positive int (bytes), got {workspace_bytes!r}")

    if backend == "reference":
        logp, lse, entropy = linear_logprobs_reference(
            hidden, weight, targets, temperature=temperature, ignore_index=ignore_index)
        lse, entropy = lse.detach(), entropy.detach()
    else:
        eager_dx = (backend == "cpu" and torch.is_grad_enabled() and hidden.requires_grad
                    and not weight.requires_grad)
        logp, lse, entropy = _LinearLogprobs.apply(
            hidden, weight, targets, temperature, ignore_index, backend, return_entropy, workspace_bytes, eager_dx)
    if return_lse or return_entropy:
        return logp, (lse if return_lse else None), (entropy if return_entropy else None)
    return logp


@torch.no_grad()
def teacher_logprobs(
    teacher_hidden: torch.Tensor | Iterable[torch.Tensor],
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    backend: str = "auto",
    num_teachers: int | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of `targets` under K teachers, [B, K, T], without gradient (SPEC §3: teachers need
    only the forward, each reduced at once to one log-prob per token).

    Args:
        teacher_hidden: a [K, B, T, H] tensor (scored in one op call), or an iterable of K
            [B, T, H] tensors, e.g. a generator running the teacher forwards lazily: each is reduced
            to [B, T] at once and dropped before the next one is requested, so only one teacher's
            hidden states are alive at a time. This is how the trainer's `TeacherPool.score` calls it.
        weight: [V, H] lm_head weight of the teachers.
        targets: [B, T] integer ids; positions equal to ignore_index give 0.
        temperature, ignore_index, backend: as in `linear_logprobs`.
        num_teachers: if given, K must equal it.
        return_entropy: also return each teacher's full next-token entropy, [B, K, T] (0 at
            ignored positions), for the SPEC §3 step metrics; it comes from the same pass.

    Returns fp32 (float64 for float64 hidden states, so oracle tests can stay in float64). Memory
    beyond the inputs and the [B, K, T] output is one op chunk, independent of V.
    """
    v.check_batch_targets(targets, None, None)
    opts = dict(temperature=temperature, ignore_index=ignore_index, backend=backend, with_entropy=return_entropy)
    if isinstance(teacher_hidden, torch.Tensor):
        v.check_float_tensor("teacher_hidden", teacher_hidden, 4, "[K, B, T, H]")
        k, b, t, h = teacher_hidden.shape
        v.check_shape("teacher_hidden", teacher_hidden, (k, *targets.shape, h), "[K, B, T, H] (B, T from targets)")
        _check_num_teachers(k, num_teachers)
        logp, entropy = _score(
            teacher_hidden.reshape(k * b * t, h), weight, targets.reshape(1, b * t).expand(k, b * t).reshape(-1), **opts
        )
        logp = logp.reshape(k, b, t).transpose(0, 1).contiguous()
        if not return_entropy:
            return logp
        return logp, entropy.reshape(k, b, t).transpose(0, 1).contiguous()
    if isinstance(teacher_hidden, (str, bytes)) or not isinstance(teacher_hidden, Iterable):
        raise TypeError(
            "teacher_hidden must be a [K, B, T, H] tensor or an iterable of K [B, T, H] tensors, "
            f"got {type(teacher_hidden).__name__}"
        )
    per_teacher: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    # No enumerate(): its cached result tuple would keep the previous teacher's hidden states alive
    # while the generator computes the next one.
    for hidden in teacher_hidden:
        name = f"teacher_hidden[{len(per_teacher)}]"
        v.check_float_tensor(name, hidden, 3, "[B, T, H]")
        v.check_shape(name, hidden, (*targets.shape, hidden.shape[-1]), "[B, T, H] (B, T from targets)")
        b, t, h = hidden.shape
        logp, entropy = _score(hidden.reshape(b * t, h), weight, targets.reshape(-1), **opts)
        per_teacher.append(logp.reshape(b, t))
        if return_entropy:
            entropies.append(entropy.reshape(b, t))
        # The loop variable would otherwise keep this teacher's hidden states alive while the
        # generator computes the next teacher's.
        del hidden
    if not per_teacher:
        raise ValueError("teacher_hidden yielded no teachers (K = 0); need at least one [B, T, H] tensor")
    _check_num_teachers(len(per_teacher), num_teachers)
    if not return_entropy:
        return torch.stack(per_teacher, dim=1)
    return torch.stack(per_teacher, dim=1), torch.stack(entropies, dim=1)


def _score(hidden, weight, targets, *, with_entropy: bool, **kw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp, entropy or None) from linear_logprobs, whose return type depends on the flag."""
    if not with_entropy:
        return linear_logprobs(hidden, weight, targets, **kw), None
    logp, _, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True, **kw)
    return logp, entropy


def _check_num_teachers(k: int, num_teachers: int | None) -> None:
    if num_teachers is not None and k != num_teachers:
        raise ValueError(f"teacher_hidden holds K = {k} teachers, expected num_teachers = {num_teachers}")
    if k == 0:
        raise ValueError("teacher_hidden must hold at least one teacher (K >= 1), got K = 0")
