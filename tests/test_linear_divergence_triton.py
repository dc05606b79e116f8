"""Triton backend of linear_divergence on CUDA tensors (marked `cuda`) where a GPU is present, else on
CPU tensors through the interpreter (TRITON_INTERPRET=1, conftest): the `triton_device` fixture.
Tiny shapes: the interpreter runs each row program in Python. Truths are float64 on CPU."""
from __future__ import annotations

import pytest
import torch

from sgsd_fast.ops.linear_divergence import linear_divergence
from sgsd_fast.ops.triton import divergence
from test_linear_divergence import F64, check_precision, loss_and_grads, make_case, ours, reference_f64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # 16-wide vocabulary tiles: every row sweep crosses several tiles and ends on a ragged one, which
    # exercises the online max/sum merge and the tail masks at interpreter-friendly sizes.
    monkeypatch.setattr(divergence, "_MAX_BLOCK", 16)


def _on(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


@pytest.mark.parametrize("kind,beta,k,entry_clip,reduction,temperature", [
    ("fkl", 0.5, 1, None, "mean", 1.0),
    ("rkl", 0.5, 3, 0.05, "none", 2.0),
    ("jsd", 0.3, 3, None, "sum", 1.1),
    ("jsd", 0.5, 1, 0.05, "mean", 1.1),
    ("jsd", 1.0, 3, None, "none", 1.0),
    ("fkl", 0.5, 2, 0.05, "sum", 1.5),
])
def test_float64_matches_reference(kind, beta, k, entry_clip, reduction, temperature, triton_device):
    x, w, xt, tw, gates, ignore = make_case(5, 6, 37, k, seed=k + 1)
    kw = dict(gates=gates, kind=kind, beta=beta, temperature=temperature, entry_clip=entry_clip,
              mask=~ignore, reduction=reduction)
    # 2 rows per chunk: two chunks of the four valid rows
    dx, dw, dxt, dtw, dgates, dmask = _on(triton_device, x, w, xt, tw, gates, ~ignore)
    got = loss_and_grads(ours("triton"), dx, dw, dxt, dtw, workspace_bytes=2 * 3 * 37 * 8,
                         **dict(kw, gates=dgates, mask=dmask))
    want = loss_and_grads(reference_f64, x, w, xt, tw, **kw)
    for a, b in zip(got, want):
        assert a.dtype == F64
        # float64 on both sides, different summation order only
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,beta,entry_clip,temperature,k", [
    ("rkl", 0.5, None, 1.0, 2),
    ("jsd", 0.3, 0.05, 2.0, 1),
    ("jsd", 0.5, 0.05, 1.3, 2),  # K = 2 with the per-entry clip
])
def test_precision_vs_fp64(dtype, kind, beta, entry_clip, temperature, k, triton_device):
    check_precision("triton", dtype, kind=kind, beta=beta, entry_clip=entry_clip, temperature=temperature, k=k,
                    seed=3, n=5, h=16, v=90, device=triton_device)


def test_default_tiles_agree_with_cpu_backend(monkeypatch, triton_device):
    monkeypatch.undo()  # the production tile width (one tile for this V)
    x, w, xt, tw, gates, ignore = make_case(4, 8, 45, 2, seed=9, dtype=torch.float32, ht=6)
    kw = dict(gates=gates, kind="jsd", beta=0.5, temperature=1.1, entry_clip=0.05, mask=~ignore,
              reduction="mean")
    dx, dw, dxt, dtw, dgates, dmask = _on(triton_device, x, w, xt, tw, gates, ~ignore)
    a = loss_and_grads(ours("triton"), dx, dw, dxt, dtw, **dict(kw, gates=dgates, mask=dmask))
    b = loss_and_grads(ours("cpu"), x, w, xt, tw, **kw)
    for p, q in zip(a, b):
        # same fp32 GEMMs; the row sweeps sum in different orders (C++ uses double row sums)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_all_rows_ignored(reduction, triton_device):
    x, w, xt, _, gates, _ = make_case(3, 6, 20, 2, seed=2, dtype=torch.float32)
    x, w, xt, gates = _on(triton_device, x, w, xt, gates)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = linear_divergence(x, w, xt, gates=gates, mask=torch.zeros(3, dtype=torch.bool, device=triton_device),
                            reduction=reduction, backend="triton")
    assert not out.isnan().any() and bool((out == 0).all())
    out.sum().backward()
    assert bool((x.grad == 0).all()) and bool((w.grad == 0).all())
