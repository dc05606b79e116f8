"""Triton kernels of linear_logprobs: the online-softmax forward and the dz-recompute backward.

Forward: a 2-D grid over (row block, vocabulary split). Each program walks the vocabulary tiles of
its split, builds each [BLOCK_N, BLOCK_V] logit tile with a K-loop of `tl.dot` (fp32 accumulator;
fp32 inputs as "tf32x3" on sm80+, IEEE elsewhere: `configs.dot_precision`), and keeps a running (max, sum-exp, entropy term)
per row plus the target logit. Splitting the vocabulary keeps the GPU busy when there are few
rows; the per-split partials (O(N * splits) floats) are merged by a few torch ops afterwards.

Backward: one kernel recomputes a block of logits tile by tile and writes
dz = grad * (onehot - softmax(z)) / temperature into a [rows, cols] workspace; torch GEMMs then
form that block's dX = dz @ W and dW = dz^T @ X. The workspace walks the [N, V] grid in one of two
orders (chosen by the caller from the byte budget, `linear_logprobs._triton_blocks`):
- row chunks (cols = V): each chunk's dX rows are written once; dW is summed over chunks in an
  fp32 [V, H] accumulator, read and written once per chunk;
- vocabulary slabs (rows = N, for V > N): each slab's dW rows are written once (one GEMM over all
  N rows, fp32 accumulation inside it); dX is summed over slabs in an fp32 [N, H] accumulator.
With the same workspace both orders run the same number of blocks, so the accumulator traffic
per block is V x H against N x H: slabs win exactly when V > N (Qwen3's V = 151,936 against a
16k-token batch: 9x less accumulator traffic, and no [V, H] fp32 buffer at all).
The recompute grid is launched GROUP_N row blocks at a time across the vocabulary tiles
(`configs`), so resident programs share their hidden-state blocks and weight tiles in L2.
Why not fuse the two GEMMs into the kernel
(as Cut Cross-Entropy does): dW would need atomics across row blocks (non-deterministic fp32 sums)
or per-block partials the size of W; the workspace route is deterministic, leaves the two large
GEMMs to cuBLAS, and its memory is bounded by the caller's byte budget, independent of N.
For bf16/fp16 inputs on sm80+ (`lowp_dz`) the kernel writes dz in the input dtype (one rounding,
the same one the dX GEMM's operand always had) and both GEMMs run on tensor cores with fp32
output (`torch.addmm(..., out_dtype=float32)`), so every sum over chunks or slabs is fp32 and no
fp32 SGEMM or fp32 copy of X or W is formed. Elsewhere (fp32 inputs, older GPUs, the interpreter)
dz is fp32 and the GEMMs fp32 (half inputs off sm80+ take the row-chunk order only: their dX GEMM
runs on a half copy of dz). The tensor-core branch has
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

from sgsd_fast.ops.triton.configs import TileConfig, dot_precision, tile_config


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
                    n_rows, vocab, hidden_dim, vocab_offset,
                    stride_hn, stride_hk, stride_wv, stride_wk, stride_dzn, inv_temp,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """dz of rows [n_rows] x columns [vocab] of a block whose first column is vocabulary entry
    vocab_offset (w_ptr points at it; targets are full-vocabulary ids)."""
    # 1-D grid in groups of GROUP_N row blocks: consecutive programs walk the vocabulary tiles of
    # a few row blocks (the last group may be shorter) rather than every row block of one tile.
    pid = tl.program_id(0)
    tiles_v = tl.cdiv(vocab, BLOCK_V)
    per_group = GROUP_N * tiles_v
    first_n = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(tl.cdiv(n_rows, BLOCK_N) - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_rows
    pid_v = (pid % per_group) // group_rows
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
    onehot = tl.where(offs_v[None, :] + vocab_offset == tgt[:, None], 1.0, 0.0).to(ACC_DTYPE)
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
    precision: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logp, lse, entropy or None) in the math dtype for compacted rows (every target in [0, V)).
    config / precision override `tile_config` / `dot_precision` (tests, the tile sweep)."""
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
        **cfg.launch(), ACC_DTYPE=acc, DOT_PRECISION=precision or dot_precision(hidden.device, hidden.dtype),
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
    slab_cols: int | None = None,
    config: TileConfig | None = None,
    precision: str | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dX in hidden's dtype or None, dW in weight's dtype or None) for compacted rows.

    The dz workspace is [chunk_rows, slab_cols] (slab_cols None: V; `dz_row_bytes` per full row),
    walked slab by slab, each slab chunk by chunk (module docstring). dX is accumulated in fp32
    when there are several slabs, dW when there are several chunks; otherwise each is written once.
    Several slabs need dz in the weight's dtype or fp32 weights (`slab_order_allowed`).
    """
    n_rows = hidden.shape[0]
    vocab = weight.shape[0]
    math_dtype = _acc_dtype(hidden.dtype)[0]
    cfg = config or tile_config(hidden.device, hidden.dtype)
    lowp = lowp_dz(weight)
    rows_max = max(1, min(chunk_rows, n_rows))
    cols_max = vocab if slab_cols is None else max(1, min(slab_cols, vocab))
    if cols_max < vocab and not slab_order_allowed(weight.dtype, lowp):
        raise ValueError(f"slab_cols={slab_cols}: vocabulary slabs need dz in {weight.dtype} (sm80+) or fp32 weights")
    several_chunks, several_slabs = rows_max < n_rows, cols_max < vocab
    dx = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_dx else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if compute_dw else None
    dx_acc = _accumulator(dx, math_dtype) if compute_dx and several_slabs else None
    dw_acc = _accumulator(dw, math_dtype) if compute_dw and several_chunks else None
    workspace = torch.empty((rows_max, cols_max), dtype=weight.dtype if lowp else math_dtype, device=hidden.device)
    precision = precision or dot_precision(hidden.device, hidden.dtype)
    for v0 in range(0, vocab, cols_max):
        cols = min(cols_max, vocab - v0)
        w = weight[v0:v0 + cols]
        for r0 in range(0, n_rows, rows_max):
            rows = min(rows_max, n_rows - r0)
            h = hidden[r0:r0 + rows]
            dz = workspace[:rows, :cols]
            dlogits(h, w, v0, targets[r0:r0 + rows], grad_logp[r0:r0 + rows], lse[r0:r0 + rows], temperature, dz,
                    cfg, precision)
            if compute_dx:
                if several_slabs:  # summed over slabs in fp32
                    _addmm_fp32_out(dx_acc[r0:r0 + rows], dz, w)
                else:
                    # dX rows come out in hidden's dtype anyway, so the GEMM runs in it (fp32 accumulate).
                    torch.mm(dz.to(weight.dtype), w, out=dx[r0:r0 + rows])
            if compute_dw:
                if several_chunks:  # summed over chunks in fp32, so that bf16 rounding never accumulates
                    _addmm_fp32_out(dw_acc[v0:v0 + cols], dz.t(), h)
                else:
                    _mm_once(dw[v0:v0 + cols], dz.t(), h)
    if dx_acc is not None and dx_acc is not dx:
        dx.copy_(dx_acc)
    if dw_acc is not None and dw_acc is not dw:
        dw.copy_(dw_acc)
    return dx, dw


def dlogits(hidden: torch.Tensor, weight: torch.Tensor, vocab_offset: int, targets: torch.Tensor,
            grad_logp: torch.Tensor, lse: torch.Tensor, temperature: float, dz: torch.Tensor,
            cfg: TileConfig, precision: str) -> None:
    """dz[r, c] = grad[r] * (onehot - softmax)[r, vocab_offset + c] / temperature for the block of
    `hidden` rows [rows, H] x `weight` rows [cols, H] (vocabulary entries vocab_offset + c)."""
    rows, cols = dz.shape
    grid = (triton.cdiv(rows, cfg.block_n) * triton.cdiv(cols, cfg.block_v),)
    _dlogits_kernel[grid](
        hidden, weight, targets, grad_logp, lse, dz, rows, cols, hidden.shape[1], vocab_offset,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz.stride(0), 1.0 / temperature,
        **cfg.launch(), GROUP_N=cfg.group_n, ACC_DTYPE=_acc_dtype(hidden.dtype)[1], DOT_PRECISION=precision,
        UPCAST_OPERANDS=_upcast_operands(hidden.dtype))


def slab_order_allowed(weight_dtype: torch.dtype, lowp: bool) -> bool:
    """Whether the backward may walk vocabulary slabs: its dX sum needs dz @ W with fp32 output
    without an fp32 copy of W, i.e. dz in W's dtype (lowp) or W already in the math dtype."""
    return lowp or weight_dtype in (torch.float32, torch.float64)


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
    """acc += a @ b into the math-dtype `acc`. Two half operands: fp32 accumulation and output
    (tensor cores on CUDA; CPU torch has no out_dtype GEMM, so there, under the interpreter, they
    are upcast: the same math). Otherwise the half operand, if any, is upcast."""
    if acc.device.type == "cuda" and a.dtype == b.dtype != acc.dtype:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _accumulator(grad: torch.Tensor, math_dtype: torch.dtype) -> torch.Tensor:
    """A zeroed buffer to sum `grad` in: grad itself when it is in the math dtype (its own fp32
    accumulator), else a math-dtype one, copied into grad at the end."""
    return grad.zero_() if grad.dtype == math_dtype else torch.zeros(grad.shape, dtype=math_dtype, device=grad.device)


def _mm_once(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out = a @ b summed in the math dtype and rounded once to out's dtype. Math-dtype `a` (dz
    stored fp32) takes b upcast; half `a` (lowp dz) an fp32-output GEMM into a temporary, never a
    half-output GEMM (whose split-K reductions cuBLAS may run in half)."""
    if a.dtype in (torch.float32, torch.float64):
        if out.dtype == a.dtype:
            torch.mm(a, b.to(a.dtype), out=out)
        else:
            out.copy_(a @ b.to(a.dtype))
    else:
        tmp = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        _addmm_fp32_out(tmp, a, b)
        out.copy_(tmp)
