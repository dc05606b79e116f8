"""Triton kernels of linear_logprobs on CUDA tensors (marked `cuda`) where a GPU is present, else on
CPU tensors through the interpreter (TRITON_INTERPRET=1, conftest): the `triton_device` fixture.

Shapes are tiny (the interpreter executes each program in numpy) but chosen so that every masked
edge is hit: N < BLOCK_N, H not a multiple of BLOCK_H, V not a multiple of BLOCK_V, ignored rows,
several backward row chunks, and several vocabulary splits in the forward. Values and gradients
are checked against float64 on CPU with the criterion of test_linear_logprobs.py (its docstring
derives the error bounds).
"""
from __future__ import annotations

import pytest
import torch

from sgsd_fast.ops.linear_logprobs import _triton_blocks, _triton_chunk_rows, linear_logprobs
from sgsd_fast.ops.reference import linear_logprobs_reference
from sgsd_fast.ops.triton import configs
from sgsd_fast.ops.triton import logprobs as kernels
from test_linear_logprobs import (TF32X3_EXTRA_TERMS, assert_cce_bound, check_accuracy, error_bounds, make_inputs,
                                  run_with_grads)

pytestmark = pytest.mark.usefixtures("one_thread")

# 40 rows x 200 vocab: 16-row backward chunks (3 chunks, the last ragged) from a 12.8 kB budget.
N, H, V = 40, 40, 200
WORKSPACE = 16 * V * 4


def dot_extra(device, dtype=torch.float32):
    """The error bound's extra dot-product terms for the precision the kernels use there."""
    return TF32X3_EXTRA_TERMS if configs.dot_precision(device, dtype) == "tf32x3" else 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_accuracy_vs_float64(dtype, temperature, triton_device):
    check_accuracy("triton", dtype, temperature, n=N, dim=H, vocab=V, workspace_bytes=WORKSPACE, device=triton_device,
                   dot_extra_terms=dot_extra(triton_device, dtype))


def test_accuracy_large_offsets_single_block(triton_device):
    # Logit spread 10 with row offsets ~ +-100 and the default (single-chunk) workspace.
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, logit_std=10.0, offset=100.0, seed=5)
    truth = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    naive = linear_logprobs_reference(hidden, weight, targets)
    ours = linear_logprobs(hidden.to(triton_device), weight.to(triton_device), targets.to(triton_device),
                           backend="triton", return_lse=True, return_entropy=True)
    ours = [t.cpu() for t in ours]
    tol = error_bounds(hidden, weight, targets, 1.0, torch.zeros(N), torch.float32,
                       dot_extra_terms=dot_extra(triton_device))
    for name, i in (("logp", 0), ("lse", 1), ("entropy", 2)):
        assert_cce_bound(name, ours[i], naive[i], truth[i], tol[name])


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_vocab_split_partials_merge(splits, triton_device):
    # 4 vocabulary tiles over 2-4 splits (3 splits -> 2 tiles each, the last split one ragged tile):
    # the host-side merge of (max, sum-exp, entropy term, target logit) must equal one pass.
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, seed=splits)
    targets = targets.clamp(min=0)  # the kernels take compacted rows only
    dev = [t.to(triton_device) for t in (hidden, weight, targets)]
    one = [t.cpu() for t in kernels.logprobs_forward(*dev, 1.3, True, vocab_splits=1)]
    many = [t.cpu() for t in kernels.logprobs_forward(*dev, 1.3, True, vocab_splits=splits)]
    truth = linear_logprobs_reference(hidden.double(), weight.double(), targets, temperature=1.3)
    naive = linear_logprobs_reference(hidden, weight, targets, temperature=1.3)
    tol = error_bounds(hidden, weight, targets, 1.3, torch.zeros(N), torch.float32,
                       dot_extra_terms=dot_extra(triton_device))
    for name, i in (("logp", 0), ("lse", 1), ("entropy", 2)):
        assert_cce_bound(f"{name} ({splits} splits)", many[i], naive[i], truth[i], tol[name])
        assert_cce_bound(f"{name} (1 split)", one[i], naive[i], truth[i], tol[name])


def test_gradcheck_float64(triton_device):
    hidden, weight, targets = (t.to(triton_device) for t in make_inputs(5, 4, 70, torch.float64, logit_std=3.0,
                                                                        offset=4.0, ignore_every=3))
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def f(h, w):
        # 8-byte budget -> 1-row dz chunks (70 columns = a full tile plus a 6-wide ragged one).
        return linear_logprobs(h, w, targets, temperature=0.9, backend="triton", workspace_bytes=8)

    # fast_mode checks random projections of the Jacobian (a few evaluations instead of one per
    # input entry), which keeps the interpreter run to seconds.
    assert torch.autograd.gradcheck(f, (hidden, weight), fast_mode=True)


def test_backward_workspace_rows_follow_the_budget():
    # fp32: the dz workspace row is V fp32 values; bf16 adds the dz copy cast for the dX GEMM.
    cpu = torch.device("cpu")
    assert _triton_chunk_rows(1000, torch.float32, 4000 * 7, cpu) == 7
    assert _triton_chunk_rows(1000, torch.bfloat16, 6000 * 7, cpu) == 7
    assert _triton_chunk_rows(1000, torch.float64, 8000 * 7, cpu) == 7
    assert _triton_chunk_rows(1000, torch.float32, 1, cpu) == 1
    # room for 2.5 row blocks: two whole blocks
    block = configs.DEFAULT.block_n
    assert _triton_chunk_rows(1000, torch.float32, 4000 * block * 5 // 2, cpu) == 2 * block


TILE_SHAPES = sorted({(c.block_n, c.block_v, c.block_h) for arch in configs.TABLE.values()
                      for entries in arch.values() for c in entries})


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_table_tile_shape_is_exact(shape, triton_device):
    """Each tile shape of the architecture table (configs.TABLE) gives values and both gradients
    within the float64 bound: N=40 < BLOCK_N and V=200 ragged against every BLOCK_V, H=40 against
    every BLOCK_H; two backward chunks."""
    cfg = configs.TileConfig(*shape, num_warps=4, num_stages=2)
    hidden, weight, targets = make_inputs(N, H, V, torch.float32, seed=sum(shape))
    targets = targets.clamp(min=0)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dev = [t.to(triton_device) for t in (hidden, weight, targets)]
    logp, lse, ent = (t.cpu() for t in kernels.logprobs_forward(*dev, 1.3, True, config=cfg))
    dx, dw = (t.cpu() for t in kernels.logprobs_backward(*dev, grad.float().to(triton_device), lse.to(triton_device),
                                                         1.3, True, True, chunk_rows=24, config=cfg))
    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, temperature=1.3, backend="reference")
    naive = linear_logprobs_reference(hidden, weight, targets, temperature=1.3)
    h_n, w_n = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs_reference(h_n, w_n, targets, temperature=1.3)[0].backward(grad.float())
    tol = error_bounds(hidden, weight, targets, 1.3, grad, torch.float32, dot_extra_terms=dot_extra(triton_device))
    for name, ours, ref_naive, i in (("logp", logp, naive[0], 0), ("lse", lse, naive[1], 1),
                                     ("entropy", ent, naive[2], 2), ("dx", dx, h_n.grad, 3), ("dw", dw, w_n.grad, 4)):
        assert_cce_bound(f"{name} {shape}", ours, ref_naive, truth[i], tol[name])


def test_backends_agree(triton_device):
    hidden, weight, targets = make_inputs(N, H, V, torch.bfloat16, ignore_every=4, seed=11)
    grad = torch.randn(N, dtype=torch.float64)
    tol = error_bounds(hidden, weight, targets, 1.0, grad, torch.bfloat16)
    results = {}
    for backend, device in (("triton", triton_device), ("cpu", torch.device("cpu"))):
        h = hidden.to(device, copy=True).requires_grad_(True)
        w = weight.to(device, copy=True).requires_grad_(True)
        logp = linear_logprobs(h, w, targets.to(device), backend=backend, workspace_bytes=WORKSPACE)
        logp.backward(grad.float().to(device))
        results[backend] = (logp.detach().cpu(), h.grad.float().cpu(), w.grad.float().cpu())
    # Each backend is within tol of the fp64 truth, so they are within 2 tol of each other.
    for name, a, b in zip(("logp", "dx", "dw"), results["triton"], results["cpu"]):
        assert torch.all((a.double() - b.double()).abs() <= 2 * tol[name]), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dz_path(dtype, triton_device, monkeypatch):
    """The sm80+ branch for half inputs: the kernel stores dz in the input dtype and dW accumulates
    dz^T @ X with fp32 output. Forced on here (on CPU the dW GEMM is upcast, the same math); values
    and both gradients stay within the float64 bound (its 2 u_out term covers dz's one rounding)."""
    seen = []
    real = kernels.lowp_dz
    monkeypatch.setattr(kernels, "lowp_dz", lambda w: seen.append(w.dtype) or w.dtype in (torch.bfloat16,
                                                                                        torch.float16) or real(w))
    # 16 rows of half dz per chunk from the budget: several chunks of the fp32 accumulator
    # The interpreter rounds float32 -> bf16/fp16 stores toward zero (measured: 1 + 0.75 * 2^-7 is
    # stored as 1.0, even with fp_downcast_rounding="rtne"); a GPU rounds to nearest: one more u there.
    truncating = triton_device.type == "cpu"
    check_accuracy("triton", dtype, 1.3, n=N, dim=H, vocab=V, workspace_bytes=16 * V * 2, device=triton_device,
                   dz_rounding=2 if truncating else 1)
    assert seen and all(d == dtype for d in seen)
    cpu = torch.device("cpu")
    assert _triton_chunk_rows(V, dtype, 16 * V * 2, cpu, lowp=True) == 16
    assert _triton_chunk_rows(V, dtype, 16 * V * 2, cpu, lowp=False) == 16 * 2 // 6


# (chunk_rows, slab_cols) of the backward's workspace at N=40, V=200: one block; row chunks (3,
# the last ragged); vocabulary slabs (4, the last ragged; 72 is no tile multiple); both at once.
BLOCK_ORDERS = [(40, None), (16, None), (40, 64), (40, 72), (16, 64)]


@pytest.mark.parametrize("rows, cols", BLOCK_ORDERS, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_block_orders_are_exact(rows, cols, dtype, triton_device):
    """Every order the backward may walk the [N, V] grid in gives both gradients within the float64
    bound: dX summed over slabs and dW over chunks in the math dtype, or each written once."""
    hidden, weight, targets = make_inputs(N, H, V, dtype, seed=7)
    targets = targets.clamp(min=0)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dev = [t.to(triton_device) for t in (hidden, weight, targets)]
    lse = kernels.logprobs_forward(*dev, 1.3, False)[1]
    dx, dw = (t.cpu() for t in kernels.logprobs_backward(*dev, grad.to(dtype).to(triton_device), lse, 1.3, True, True,
                                                         chunk_rows=rows, slab_cols=cols))
    assert dx.dtype == dtype and dw.dtype == dtype
    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, temperature=1.3, backend="reference")
    if dtype == torch.float64:
        # float64 in, float64 math: only summation order differs from the reference
        torch.testing.assert_close(dx, truth[3], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dw, truth[4], rtol=1e-12, atol=1e-12)
        return
    h_n, w_n = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs_reference(h_n, w_n, targets, temperature=1.3)[0].backward(grad.float())
    tol = error_bounds(hidden, weight, targets, 1.3, grad, dtype, dot_extra_terms=dot_extra(triton_device))
    assert_cce_bound(f"dx {rows, cols}", dx, h_n.grad, truth[3], tol["dx"])
    assert_cce_bound(f"dw {rows, cols}", dw, w_n.grad, truth[4], tol["dw"])


@pytest.mark.parametrize("rows, cols", [(16, None), (40, 64), (16, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dz_block_orders(rows, cols, dtype, triton_device, monkeypatch):
    """The sm80+ half branch (dz stored in the input dtype, forced on as in test_low_precision_dz_path)
    in each order: dX summed over slabs with fp32 output, dW over chunks, or dW written once from
    an fp32-output GEMM; both gradients within the float64 bound with dz's one extra rounding."""
    monkeypatch.setattr(kernels, "lowp_dz", lambda w: True)
    hidden, weight, targets = make_inputs(N, H, V, dtype, seed=8)
    targets = targets.clamp(min=0)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dev = [t.to(triton_device) for t in (hidden, weight, targets)]
    lse = kernels.logprobs_forward(*dev, 1.0, False)[1]
    dx, dw = (t.cpu() for t in kernels.logprobs_backward(*dev, grad.float().to(triton_device), lse, 1.0, True, True,
                                                         chunk_rows=rows, slab_cols=cols))
    assert dx.dtype == dtype and dw.dtype == dtype
    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, backend="reference")
    h_n, w_n = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    linear_logprobs_reference(h_n, w_n, targets)[0].backward(grad.float())
    tol = error_bounds(hidden, weight, targets, 1.0, grad, dtype, dz_rounding=2 if triton_device.type == "cpu" else 1)
    assert_cce_bound(f"dx {rows, cols}", dx, h_n.grad, truth[3], tol["dx"])
    assert_cce_bound(f"dw {rows, cols}", dw, w_n.grad, truth[4], tol["dw"])


def test_slabs_refused_where_dz_would_need_an_fp32_copy_of_w(triton_device):
    hidden, weight, targets = make_inputs(N, H, V, torch.bfloat16, seed=9)
    targets = targets.clamp(min=0)
    dev = [t.to(triton_device) for t in (hidden, weight, targets)]
    if kernels.lowp_dz(dev[1]):
        pytest.skip("half weights take the slab order on this device")
    lse = kernels.logprobs_forward(*dev, 1.0, False)[1]
    with pytest.raises(ValueError, match="slab_cols=64"):
        kernels.logprobs_backward(*dev, torch.ones(N, device=triton_device), lse, 1.0, True, True,
                                  chunk_rows=N, slab_cols=64)


def test_backward_blocks_follow_the_shape_and_budget():
    """_triton_blocks: slabs of all rows when V > N (width rounded down to whole tiles), row chunks
    when N >= V, for half weights without the low-precision dz, or when no tile-wide slab fits;
    one block when everything fits."""
    cpu = torch.device("cpu")
    block_v = configs.tile_config(cpu, torch.float32).block_v
    # V = 1000 > N = 40, fp32 dz: 40 rows x 130 columns in the budget -> 2 tiles of 64
    assert _triton_blocks(40, 1000, torch.float32, 40 * 130 * 4, cpu) == (40, 2 * block_v)
    assert _triton_blocks(40, 1000, torch.bfloat16, 40 * 130 * 2, cpu, lowp=True) == (40, 2 * block_v)
    # N >= V: row chunks of the whole vocabulary
    assert _triton_blocks(2000, 1000, torch.float32, 7 * 1000 * 4, cpu) == (7, 1000)
    # half weights, fp32 dz: no slabs (the dX sum would need an fp32 copy of W)
    assert _triton_blocks(40, 1000, torch.bfloat16, 40 * 130 * 6, cpu) == (_triton_chunk_rows(
        1000, torch.bfloat16, 40 * 130 * 6, cpu), 1000)
    # no slab of one tile's width fits: row chunks
    assert _triton_blocks(40, 1000, torch.float32, 40 * (block_v - 1) * 4, cpu)[1] == 1000
    # the whole [N, V] block fits: one block
    assert _triton_blocks(40, 1000, torch.float32, 40 * 1000 * 4, cpu) == (40, 1000)


@pytest.mark.parametrize("group_n", [1, 2, 3, 8])
def test_grouped_launch_writes_every_dz_entry_once(group_n, triton_device):
    """The recompute kernel's grouped 1-D grid covers every (row block, vocabulary tile) exactly:
    with 16-row blocks, N=40 is 3 row blocks (a short last group for group_n = 2), V=200 4 tiles;
    the NaN-filled workspace must come back with dz of the float64 formula everywhere, at a
    vocabulary offset (targets are full-vocabulary ids)."""
    cfg = configs.TileConfig(16, 64, 32, 4, 2, group_n=group_n)
    hidden, weight, targets = make_inputs(N, H, V + 37, torch.float32, seed=10)
    targets = targets.clamp(min=0)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = hidden.double() @ weight.double().T / 1.3
    lse = torch.logsumexp(z, dim=1)
    p = torch.softmax(z, dim=1)
    onehot = torch.zeros_like(p).scatter_(1, targets[:, None], 1.0)
    expected = (grad[:, None] * (onehot - p) / 1.3)[:, 37:]
    dz = torch.full((N, V), float("nan"), device=triton_device)
    kernels.dlogits(hidden.to(triton_device), weight[37:].to(triton_device), 37, targets.to(triton_device),
                    grad.float().to(triton_device), lse.float().to(triton_device), 1.3, dz, cfg, "ieee")
    dz = dz.cpu().double()
    assert not dz.isnan().any(), f"{int(dz.isnan().sum())} dz entries never written"
    # dz's error: g/tau times (p's, from the logit's fp32 dot (gamma(H + 2) |h|.|w| / tau), the
    # fp32 lse and z - lse (u each) and exp (2 u), plus 3 u of |onehot - p| for the final products.
    u = 2.0**-24
    gamma = (H + 2) * u / (1 - (H + 2) * u)
    abs_z = (hidden.double().abs() @ weight.double().abs().T / 1.3)[:, 37:]
    lse_abs = lse.abs()[:, None]
    p = p[:, 37:]
    tol = grad.abs()[:, None] / 1.3 * (p * torch.expm1(gamma * abs_z + u * (2 * lse_abs + abs_z) + 2 * u)
                                       + 3 * u * (onehot[:, 37:] - p).abs())
    excess = (dz - expected).abs() - tol
    assert (excess <= 0).all(), f"worst excess {excess.max().item():.3e}"


def test_dot_precision_by_architecture(monkeypatch):
    """tf32x3 for fp32 from sm_80 on, IEEE below it, for half / fp64 operands and off CUDA; the
    environment override is honoured and a misspelt value is refused, naming the variable."""
    monkeypatch.delenv("SGSD_TRITON_FP32_DOT", raising=False)
    assert [configs.arch_dot_precision(a, torch.float32) for a in (0, 80, 86, 89, 90)] == ["ieee"] + ["tf32x3"] * 4
    assert {configs.arch_dot_precision(90, d) for d in (torch.bfloat16, torch.float16, torch.float64)} == {"ieee"}
    assert configs.dot_precision(torch.device("cpu"), torch.float32) == "ieee"
    monkeypatch.setenv("SGSD_TRITON_FP32_DOT", "ieee")
    assert configs.arch_dot_precision(90, torch.float32) == "ieee"
    monkeypatch.setenv("SGSD_TRITON_FP32_DOT", "tf32")
    with pytest.raises(ValueError, match="SGSD_TRITON_FP32_DOT: expected one of"):
        configs.arch_dot_precision(80, torch.float32)
