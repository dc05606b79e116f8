"""Triton backend of linear_divergence (CUDA, or CPU tensors under TRITON_INTERPRET=1 as set by
conftest.py). Tiny shapes: the interpreter runs each row program in Python."""
from __future__ import annotations

import os

import pytest
import torch

from sgsd_fast.ops.linear_divergence import linear_divergence
from sgsd_fast.ops.triton import divergence
from test_linear_divergence import F64, check_precision, loss_and_grads, make_case, ours, reference_f64

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                       reason="needs CUDA or TRITON_INTERPRET=1"),
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # 16-wide vocabulary tiles: every row sweep crosses several tiles and ends on a ragged one, which
    # exercises the online max/sum merge and the tail masks at interpreter-friendly sizes.
    monkeypatch.setattr(divergence, "_MAX_BLOCK", 16)


@pytest.mark.parametrize("kind,beta,k,entry_clip,reduction,temperature", [
    ("fkl", 0.5, 1, None, "mean", 1.0),
    ("rkl", 0.5, 3, 0.05, "none", 2.0),
    ("jsd", 0.3, 3, None, "sum", 1.1),
    ("jsd", 0.5, 1, 0.05, "mean", 1.1),
    ("jsd", 1.0, 3, None, "none", 1.0),
])
def test_float64_matches_reference(kind, beta, k, entry_clip, reduction, temperature):
    x, w, xt, tw, gates, ignore = make_case(5, 6, 37, k, seed=k + 1)
    kw = dict(gates=gates, kind=kind, beta=beta, temperature=temperature, entry_clip=entry_clip,
              mask=~ignore, reduction=reduction)
    # 2 rows per chunk: two chunks of the four valid rows
    got = loss_and_grads(ours("triton"), x, w, xt, tw, workspace_bytes=2 * 3 * 37 * 8, **kw)
    want = loss_and_grads(reference_f64, x, w, xt, tw, **kw)
    for a, b in zip(got, want):
        assert a.dtype == F64
        # float64 on both sides, different summation order only
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta,entry_clip,temperature,k", [
    ("rkl", 0.5, None, 1.0, 2),
    ("jsd", 0.3, 0.05, 2.0, 1),
])
def test_precision_vs_fp64(dtype, kind, beta, entry_clip, temperature, k):
    check_precision("triton", dtype, kind=kind, beta=beta, entry_clip=entry_clip, temperature=temperature, k=k,
                    seed=3, n=5, h=16, v=90)


def test_default_tiles_agree_with_cpu_backend(monkeypatch):
    monkeypatch.undo()  # the production tile width (one tile for this V)
    x, w, xt, tw, gates, ignore = make_case(4, 8, 45, 2, seed=9, dtype=torch.float32, ht=6)
    kw = dict(gates=gates, kind="jsd", beta=0.5, temperature=1.1, entry_clip=0.05, mask=~ignore,
              reduction="mean")
    a = loss_and_grads(ours("triton"), x, w, xt, tw, **kw)
    b = loss_and_grads(ours("cpu"), x, w, xt, tw, **kw)
    for p, q in zip(a, b):
        # same fp32 GEMMs; the row sweeps sum in different orders (C++ uses double row sums)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored(reduction):
    x, w, xt, _, gates, _ = make_case(3, 6, 20, 2, seed=2, dtype=torch.float32)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = linear_divergence(x, w, xt, gates=gates, mask=torch.zeros(3, dtype=torch.bool), reduction=reduction,
                            backend="triton")
    assert not out.isnan().any() and bool((out == 0).all())
    out.sum().backward()
    assert bool((x.grad == 0).all()) and bool((w.grad == 0).all())
