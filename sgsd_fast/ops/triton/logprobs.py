"""Triton kernels of linear_logprobs: the online-softmax forward and the dz-recompute backward.

Forward: a 2-D grid over (row block, vocabulary split). Each program walks the vocabulary tiles of
its split, builds each [BLOCK_N, BLOCK_V] logit tile with a K-loop of `tl.dot` (fp32 accumulator,
IEEE fp32 products for fp32 inputs, never TF32), and keeps a running (max, sum-exp, entropy term)
per row plus the target logit. Splitting the vocabulary keeps the GPU busy when there are few
rows; the per-split partials (O(N * splits) floats) are merged by a few torch ops afterwards.

Backward: one kernel recomputes a row chunk's logits tile by tile and writes
dz = grad * (onehot - softmax(z)) / temperature into a [chunk, V] workspace; torch GEMMs then
form dX = dz @ W and accumulate dW += dz^T @ X in fp32. Why not fuse the two GEMMs into the kernel
(as Cut Cross-Entropy does): dW would need atomics across row blocks (non-deterministic fp32 sums)
or per-block partials the size of W; the workspace route is deterministic, leaves the two large
GEMMs to cuBLAS, and its memory is bounded by the caller's byte budget, independent of N.
For bf16/fp16 inputs on sm80+ (`lowp_dz`) the kernel writes dz in the input dtype (one rounding,
the same one the dX GEMM's operand always had) and both GEMMs run on tensor cores with fp32
output: dW += dz^T @ X through `torch.addmm(..., out_dtype=float32)` into the fp32 accumulator,
so chunks still sum in fp32 and no fp32 SGEMM or fp32 copy of X is formed. Elsewhere (fp32
inputs, older GPUs, the interpreter) dz is fp32 and dW an fp32 GEMM. The tensor-core branch has
not run on a GPU yet; under the interpreter the tests run it with the dW GEMM upcast (CPU torch
has no out_dtype GEMM), which checks the kernel's low-precision store and the rounding of dz.

Tile shapes and launch parameters come from `configs.tile_config` (by architecture and operand
dtype; every entry is compiled ahead of time for its architecture by the tests), or from the
`config` argument (tests, the tile sweep). All offsets are int64 (N * V and V * H exceed 2**31 for real vocabularies); V that is not a
multiple of BLOCK_V is handled by masking. Inputs must already be compacted to valid rows (no
ignore_index) by the caller, sgsd_fast/ops/linear_logprobs.py.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sgsd_fast.ops.triton.configs import TileConfig, tile_config

# "ieee": fp32 operands are multiplied in full fp32, never TF32 (SPEC: fp32 math); the setting does
# not change bf16/fp16 products, which are exact in the fp32 accumulator anyway.
_DOT_PRECISION = "ieee"


@triton.jit
def _logit_tile(h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_dim,
                stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """[BLOCK_N, BLOCK_V] tile of hidden @ weight^T / temperature in ACC_DTYPE (out-of-range -> 0)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=ACC_DTYPE)
    row_ok = offs_n[:, None] < n_rows
    col_ok = offs_v[:, None] < vocab
    for k0 in range(0, hidden_dim, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H).to(tl.int64)
        k_ok = offs_k[None, :] < hidden_dim
        a = tl.load(h_ptr + offs_n[:, None] * stride_hn + offs_k[None, :] * stride_hk, mask=row_ok & k_ok, other=0.0)
        b = tl.load(w_ptr + offs_v[:, None] * stride_wv + offs_k[None, :] * stride_wk, mask=col_ok & k_ok, other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc * inv_temp


@triton.jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr,
                    n_rows, vocab, hidden_dim, tiles_per_split,
                    stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
                    WITH_ENTROPY: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = offs_n < n_rows
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    # Running statistics relative to the running max m: s = sum e^(z-m), t = sum e^(z-m) (z-m).
    # Keeping t relative to m avoids the cancellation in lse - E[z] under large logit offsets.
    m = tl.full((BLOCK_N,), float("-inf"), ACC_DTYPE)
    s = tl.zeros((BLOCK_N,), ACC_DTYPE)
    t = tl.zeros((BLOCK_N,), ACC_DTYPE)
    zt = tl.zeros((BLOCK_N,), ACC_DTYPE)
    v_first = pid_s.to(tl.int64) * tiles_per_split * BLOCK_V
    for i in range(0, tiles_per_split):
        offs_v = v_first + i * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = offs_v[None, :] < vocab
        z = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_dim,
                        stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
                        BLOCK_N, BLOCK_V, BLOCK_H, ACC_DTYPE, DOT_PRECISION, UPCAST_OPERANDS)
        z = tl.where(col_ok, z, float("-inf"))
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)
        # The host guarantees the first tile of every split holds a real column, so m_new is finite.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        # Masked columns get d = 0 and e = 0, so e * d never forms 0 * inf.
        d = tl.where(col_ok, z - m_new[:, None], 0.0)
        e = tl.where(col_ok, tl.exp(d), 0.0)
        if WITH_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            t = alpha * (t + shift) + tl.sum(e * d, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = pid_s.to(tl.int64) * n_rows + offs_n
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, tgt_ptr, g_ptr, lse_ptr, dz_ptr,
                    n_rows, vocab, hidden_dim,
                    stride_hn, stride_hk, stride_wv, stride_wk, stride_dzn, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = offs_n < n_rows
    col_ok = offs_v < vocab
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0).to(ACC_DTYPE)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0).to(ACC_DTYPE)
    z = _logit_tile(h_ptr, w_ptr, offs_n, offs_v, n_rows, vocab, hidden_dim,
                    stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
                    BLOCK_N, BLOCK_V, BLOCK_H, ACC_DTYPE, DOT_PRECISION, UPCAST_OPERANDS)
    # Padding columns have z = 0, which can sit far above a row's lse: keep them out of exp.
    p = tl.exp(tl.where(col_ok[None, :], z - lse[:, None], float("-inf")))
    onehot = tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0).to(ACC_DTYPE)
    dz = g[:, None] * (onehot - p) * inv_temp
    # dz is fp32 here; a half workspace (lowp_dz) gets it rounded to nearest even, stated explicitly.
    dz = dz.to(dz_ptr.dtype.element_ty, fp_downcast_rounding="rtne" if dz_ptr.dtype.element_ty != ACC_DTYPE else None)
    tl.store(dz_ptr + offs_n[:, None] * stride_dzn + offs_v[None, :], dz, mask=row_ok[:, None] & col_ok[None, :])


def _acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, tl.dtype]:
    """(torch math dtype, triton accumulator dtype) for an input dtype."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def _upcast_operands(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands are upcast to fp32 first: only for bf16 under the interpreter.

    Triton's interpreter returns wrong results for bf16 x bf16 tl.dot (seen with triton 3.9: errors
    of 1e10 on a 16x16 product; fp16 and fp32 are right). The upcast is exact (bf16 products are exact in fp32, and the GPU path accumulates
    them in fp32 too), so CPU tests check the same math; on a GPU the bf16 tensor-core dot is kept.
    """
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _vocab_splits(n_rows: int, vocab: int, device: torch.device, cfg: TileConfig) -> int:
    """Vocabulary splits so that row blocks x splits roughly fill the GPU (1 under the interpreter)."""
    n_tiles = triton.cdiv(vocab, cfg.block_v)
    if device.type != "cuda":
        return 1
    programs_wanted = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(programs_wanted, triton.cdiv(n_rows, cfg.block_n))))


def logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    vocab_splits: int | None = None,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, entropy or None) in the math dtype for compacted rows (every target in [0, V))."""
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    math_dtype, acc = _acc_dtype(hidden.dtype)
    cfg = config or tile_config(hidden.device, hidden.dtype)
    n_tiles = triton.cdiv(vocab, cfg.block_v)
    splits = vocab_splits if vocab_splits is not None else _vocab_splits(n_rows, vocab, hidden.device, cfg)
    splits = max(1, min(splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    # Recount so that no split starts past the last tile (an empty split would leave m = -inf).
    splits = triton.cdiv(n_tiles, tiles_per_split)
    part = torch.empty((4, splits, n_rows), dtype=math_dtype, device=hidden.device)
    m, s, t, zt = part.unbind(0)
    grid = (triton.cdiv(n_rows, cfg.block_n), splits)
    _forward_kernel[grid](
        hidden, weight, targets, m, s, t, zt,
        n_rows, vocab, hidden_dim, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
        **cfg.launch(), ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION,
        UPCAST_OPERANDS=_upcast_operands(hidden.dtype),
        WITH_ENTROPY=with_entropy,
    )
    # Merge the per-split partials around the global max (each split's m is finite by construction).
    m_all = m.amax(dim=0)
    scale = torch.exp(m - m_all)
    s_all = (s * scale).sum(dim=0)
    lse = m_all + torch.log(s_all)
    logp = zt.sum(dim=0) - lse
    entropy = None
    if with_entropy:
        t_all = (scale * (t + (m - m_all) * s)).sum(dim=0)
        entropy = torch.log(s_all) - t_all / s_all
    return logp, lse, entropy


def logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_logp: torch.Tensor,
    lse: torch.Tensor,
    temperature: float,
    compute_dx: bool,
    compute_dw: bool,
    chunk_rows: int,
    config: TileConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX in hidden's dtype or None, dW in weight's dtype or None) for compacted rows.

    chunk_rows bounds the [chunk_rows, V] dz workspace (`dz_row_bytes` per row).
    """
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    math_dtype, acc = _acc_dtype(hidden.dtype)
    cfg = config or tile_config(hidden.device, hidden.dtype)
    lowp = lowp_dz(weight)
    dx = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_dx else None
    dw_acc = torch.zeros(weight.shape, dtype=math_dtype, device=weight.device) if compute_dw else None
    rows_max = max(1, min(chunk_rows, n_rows))
    workspace = torch.empty((rows_max, vocab), dtype=weight.dtype if lowp else math_dtype, device=hidden.device)
    for r0 in range(0, n_rows, rows_max):
        rows = min(rows_max, n_rows - r0)
        h = hidden[r0:r0 + rows]
        dz = workspace[:rows]
        grid = (triton.cdiv(rows, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
        _dlogits_kernel[grid](
            h, weight, targets[r0:r0 + rows], grad_logp[r0:r0 + rows], lse[r0:r0 + rows], dz,
            rows, vocab, hidden_dim,
            h.stride(0), h.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), 1.0 / temperature,
            **cfg.launch(), ACC_DTYPE=acc, DOT_PRECISION=_DOT_PRECISION,
            UPCAST_OPERANDS=_upcast_operands(hidden.dtype),
        )
        if compute_dx:
            # dX rows come out in hidden's dtype anyway, so the GEMM runs in it (fp32 accumulate).
            torch.mm(dz.to(weight.dtype), weight, out=dx[r0:r0 + rows])
        if compute_dw:
            # dW is summed over chunks in fp32 so that bf16 rounding never accumulates.
            if lowp:
                _addmm_fp32_out(dw_acc, dz.t(), h)
            else:
                dw_acc.addmm_(dz.t(), h.to(math_dtype))
    dw = dw_acc.to(weight.dtype) if compute_dw else None
    return dx, dw


def lowp_dz(weight: torch.Tensor) -> bool:
    """Whether dz is written in the input dtype and the gradient GEMMs run on tensor cores."""
    return (weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(weight.device)[0] >= 8)


def dz_row_bytes(vocab: int, weight_dtype: torch.dtype, lowp: bool) -> int:
    """Workspace bytes per dz row: V in the input dtype (lowp), else V fp32 (+ the cast copy the dX
    GEMM takes for half weights)."""
    half = torch.finfo(weight_dtype).bits // 8
    if lowp:
        return vocab * half
    md = torch.float64 if weight_dtype == torch.float64 else torch.float32
    return vocab * (torch.finfo(md).bits // 8 + (half if weight_dtype != md else 0))


def _addmm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with half operands and fp32 accumulation/output (tensor cores on CUDA); CPU
    torch has no out_dtype GEMM, so there (tests under the interpreter) the operands are upcast."""
    if acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
