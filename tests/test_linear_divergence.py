"""sgsd_fast.ops.linear_divergence (C++ "cpu" backend and dispatch) against the float64 oracle.

Inputs follow Cut Cross-Entropy's advice: logits with std ~6 and per-row offsets of 25-50 (an
offset shared by a row's logits is invisible to softmax but stresses the LSE numerics), teachers
close to the student (self-distillation, where KL gradients suffer the most cancellation).
Helpers here are reused by test_linear_divergence_triton.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from sgsd_fast.ops.linear_divergence import linear_divergence
from sgsd_fast.ops.reference import divergence_per_entry, linear_divergence_reference

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps
# bf16 unit roundoff (8 significant bits): the error of rounding one fp32 gradient entry to bf16.
U_BF16 = 2.0**-8


def make_case(n, h, v, k, *, seed, dtype=F64, ht=None, logit_std=6.0, offset=25.0, teacher_noise=0.7,
              n_ignored=1):
    """Random inputs (rounded to ``dtype``): (student_hidden, weight, teacher_hidden, teacher_head|None,
    gates, ignore) with ignore = ~mask. Column 0 of the hidden states carries the per-row logit offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=F64)
    w = torch.randn(v, h, generator=g, dtype=F64) * logit_std / math.sqrt(h - 1)
    x[:, 0] = offset * (1 + torch.rand(n, generator=g, dtype=F64))
    w[:, 0] = 1.0
    if ht is None:
        xt, tw = x[None] + teacher_noise * torch.randn(k, n, h, generator=g, dtype=F64), None
    else:
        xt = torch.randn(k, n, ht, generator=g, dtype=F64)
        tw = torch.randn(v, ht, generator=g, dtype=F64) * logit_std / math.sqrt(ht)
    gates = torch.rand(n, k, generator=g, dtype=F64) * 2
    ignore = torch.zeros(n, dtype=torch.bool)
    ignore[torch.randperm(n, generator=g)[:n_ignored]] = True
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(xt), cast(tw), gates.to(dtype), ignore


def naive_same_dtype(x, w, xt, tw, *, gates, kind, beta, temperature, entry_clip, mask, reduction):
    """What a plain PyTorch user writes: logits, softmax and divergence all in the input dtype."""
    tw = w if tw is None else tw
    s = torch.log_softmax((x @ w.T) / temperature, dim=-1)
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for i in range(xt.shape[0]):
        with torch.no_grad():
            t = torch.log_softmax((xt[i] @ tw.T) / temperature, dim=-1)
        e = divergence_per_entry(s, t, kind, beta)
        if entry_clip is not None:
            e = e.clamp(max=entry_clip)
        total = total + gates[:, i].to(x.dtype) * e.sum(-1)
    total = torch.where(mask, total, torch.zeros_like(total))
    if reduction == "none":
        return total
    return total.sum() / (mask.sum().clamp(min=1) if reduction == "mean" else 1)


def loss_and_grads(fn, x, w, xt, tw, *, grad_seed=0, **kw):
    """(loss, d/dx, d/dw) of fn; a "none" output is contracted with a fixed random cotangent."""
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    out = fn(x, w, xt, tw, **kw)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=F64) if out.dim() else 1.0
    gx, gw = torch.autograd.grad((out.double() * (cot.to(out.device) if out.dim() else cot)).sum(), (x, w))
    return out.detach().cpu(), gx.cpu(), gw.cpu()


def ours(backend):
    def fn(x, w, xt, tw, **kw):
        return linear_divergence(x, w, xt, teacher_head=tw, backend=backend, **kw)
    return fn


def reference_f64(x, w, xt, tw, **kw):
    up = (lambda t: None if t is None else t.double())
    kw = dict(kw, gates=kw["gates"].double())
    return linear_divergence_reference(up(x), up(w), up(xt), teacher_head=up(tw), **kw)


def fp32_tol(scale: float, zmax: float) -> float:
    # An fp32 log-probability s = z - LSE carries an absolute rounding of ~eps*|z|; two correct fp32
    # implementations (GEMM blocking, summation order) realize it differently, so allow a few such
    # units relative to the magnitude of the compared quantity.
    return 4 * EPS32 * max(zmax, 1.0) * scale


def max_logit(x, w, xt, tw, temperature):
    tw = w if tw is None else tw
    z = torch.cat([(x.double() @ w.double().T).flatten(), (xt.double() @ tw.double().T).flatten()])
    return z.abs().max().item() / temperature


def check_precision(backend, dtype, *, kind, beta, entry_clip, temperature, k, seed, n=12, h=24, v=300, ht=None,
                    device="cpu"):
    """CCE bound |ours - fp64| <= |naive same dtype - fp64| + tol for loss, dX and dW (max norm), plus a
    direct elementwise bound for the loss and for bf16 gradients. `backend` runs on `device`; the
    float64 truth and the naive baseline run on CPU."""
    x, w, xt, tw, gates, ignore = make_case(n, h, v, k, seed=seed, dtype=dtype, ht=ht)
    kw = dict(gates=gates, kind=kind, beta=beta, temperature=temperature, entry_clip=entry_clip,
              mask=~ignore, reduction="mean")
    up = (lambda t: None if t is None else t.double())
    on = (lambda t: None if t is None else t.to(device))
    truth = loss_and_grads(reference_f64, up(x), up(w), up(xt), up(tw), **kw)
    got = loss_and_grads(ours(backend), on(x), on(w), on(xt), on(tw),
                         **dict(kw, gates=on(gates), mask=on(~ignore)))
    naive = loss_and_grads(naive_same_dtype, x, w, xt, tw, **kw)
    zmax = max_logit(x, w, xt, tw, temperature)
    assert got[0].dtype == torch.float32
    for name, a, b, t in zip(("loss", "dX", "dW"), got, naive, truth):
        scale = t.abs().max().item()
        tol = fp32_tol(scale, zmax)
        err = (a.double() - t).abs().max().item()
        naive_err = (b.double() - t).abs().max().item()
        assert err <= naive_err + tol, f"{name}: |ours-fp64|={err:.3e} > |naive-fp64|={naive_err:.3e} + {tol:.1e}"
        # On CUDA the gradient GEMMs take dL/dz rounded to bf16 (tensor cores), so a bf16 gradient is
        # not one rounding of the fp32 one there; the CCE bound above is its criterion.
        if name == "loss" or (dtype == torch.bfloat16 and torch.device(device).type == "cpu"):
            # direct: the fp32 loss from exact (bf16-valued) inputs; bf16 grads = fp32 grads rounded once
            bound = (0.0 if name == "loss" else U_BF16) * t.abs() + tol
            assert bool(((a.double() - t).abs() <= bound).all()), f"{name}: max err {err:.3e} (scale {scale:.3e})"


pytestmark = pytest.mark.usefixtures("one_thread")


KINDS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.3), ("jsd", 0.5)]


@pytest.mark.parametrize("kind,beta", KINDS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("entry_clip", [None, 0.05])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_matches_reference(kind, beta, k, entry_clip, reduction):
    temperature = {"mean": 1.0, "sum": 1.1, "none": 2.0}[reduction]
    x, w, xt, tw, gates, ignore = make_case(9, 8, 41, k, seed=k * 7 + len(reduction))
    kw = dict(gates=gates, kind=kind, beta=beta, temperature=temperature, entry_clip=entry_clip,
              mask=~ignore, reduction=reduction)
    # 2 rows per chunk: several chunks, the last one ragged, valid rows compacted across chunks
    got = loss_and_grads(ours("cpu"), x, w, xt, tw, workspace_bytes=2 * 3 * 41 * 8, **kw)
    want = loss_and_grads(reference_f64, x, w, xt, tw, **kw)
    for a, b in zip(got, want):
        assert a.dtype == F64
        # float64 on both sides, different summation order only
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_teacher_with_own_width_and_default_gates():
    x, w, xt, tw, _, _ = make_case(6, 8, 33, 2, seed=3, ht=5)
    kw = dict(kind="jsd", beta=0.5, temperature=1.1, entry_clip=None, mask=None, reduction="sum")
    got = loss_and_grads(ours("cpu"), x, w, xt, tw, gates=None, **kw)
    want = loss_and_grads(reference_f64, x, w, xt, tw, gates=torch.full((6, 2), 0.5, dtype=F64), **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,beta,entry_clip,temperature,k", [
    ("fkl", 0.5, None, 1.0, 1),
    ("fkl", 0.5, 0.05, 1.1, 3),
    ("rkl", 0.5, None, 2.0, 3),
    ("rkl", 0.5, 0.05, 1.0, 1),
    ("jsd", 0.3, None, 1.1, 3),
    ("jsd", 0.5, 0.05, 2.0, 3),
])
def test_precision_vs_fp64(dtype, kind, beta, entry_clip, temperature, k):
    check_precision("cpu", dtype, kind=kind, beta=beta, entry_clip=entry_clip, temperature=temperature, k=k,
                    seed=k + int(temperature * 10))


@pytest.mark.parametrize("beta,kind", [(0.0, "fkl"), (1.0, "rkl")])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_jsd_beta_endpoints_are_kl(beta, kind, backend):
    x, w, xt, tw, gates, ignore = make_case(7, 8, 29, 2, seed=11)
    kw = dict(gates=gates, temperature=1.1, entry_clip=None, mask=~ignore, reduction="none")
    a = loss_and_grads(ours(backend), x, w, xt, tw, kind="jsd", beta=beta, **kw)
    b = loss_and_grads(ours(backend), x, w, xt, tw, kind=kind, beta=0.5, **kw)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert bool((a[0][~ignore] > 0).all())  # a KL without clip is positive on valid rows


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_liger_fused_linear_jsd(beta, temperature):
    from liger_kernel.transformers import LigerFusedLinearJSD

    # Liger: loss = sum over rows of JSD_beta(student || teacher) / BT, GKD beta convention
    # (0 = forward KL, 1 = reverse KL), both sides' logits divided by temperature, no T^2.
    x, w, xt, tw, _, _ = make_case(8, 12, 64, 1, seed=5, dtype=torch.float32, ht=10, offset=3.0)
    ones = torch.ones(8, 1)
    xs_a = x.clone().requires_grad_()
    ours_loss = linear_divergence(xs_a, w, xt, teacher_head=tw, gates=ones, kind="jsd", beta=beta,
                                  temperature=temperature, backend="cpu")
    ours_loss.backward()
    xs_b = x.clone().requires_grad_()
    liger_loss = LigerFusedLinearJSD(jsd_beta=beta, temperature=temperature)(xs_b, w, xt[0], tw, None)
    liger_loss.backward()
    # both fp32 with exact fp32 GEMMs; the divergence sweeps differ in summation order only
    torch.testing.assert_close(ours_loss, liger_loss.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xs_a.grad, xs_b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_entry_clip_gives_negative_loss(backend):
    # V = H = 2, W = I: the student is uniform, the teacher puts 0.9 / 0.1 on the two entries.
    # FKL summands 0.9 ln 1.8 = 0.529 and 0.1 ln 0.2 = -0.161; capping the first at 0.05 gives
    # 0.05 + 0.1 ln 0.2 < 0 (OPSD's per-entry clip can make the loss negative).
    w = torch.eye(2, dtype=F64, requires_grad=True)
    x = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    xt = torch.tensor([[[math.log(9.0), 0.0]]], dtype=F64)
    loss = linear_divergence(x, w, xt, kind="fkl", entry_clip=0.05, backend=backend)
    assert loss.item() == pytest.approx(0.05 + 0.1 * math.log(0.2), rel=1e-12)
    loss.backward()
    # only the unclipped entry j=1 differentiates: d/dz_i [-P_1 s_1] = -P_1 (delta_i1 - Q_i)
    torch.testing.assert_close(x.grad, torch.tensor([[0.05, -0.05]], dtype=F64), rtol=1e-12, atol=1e-15)
    want = loss_and_grads(reference_f64, x, w, xt, None, gates=torch.ones(1, 1, dtype=F64), kind="fkl", beta=0.5,
                          temperature=1.0, entry_clip=0.05, mask=torch.ones(1, dtype=torch.bool),
                          reduction="mean")
    torch.testing.assert_close(w.grad, want[2], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16])
def test_all_rows_ignored(reduction, dtype):
    x, w, xt, _, gates, _ = make_case(5, 8, 17, 2, seed=2, dtype=dtype)
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = linear_divergence(x, w, xt, gates=gates, kind="jsd", mask=torch.zeros(5, dtype=torch.bool),
                            reduction=reduction, backend="cpu")
    assert not out.isnan().any() and bool((out == 0).all())
    out.sum().backward()
    assert bool((x.grad == 0).all()) and bool((w.grad == 0).all())


@pytest.mark.parametrize("kind,beta,entry_clip,reduction", [
    ("fkl", 0.5, None, "none"),
    ("rkl", 0.5, 0.3, "mean"),
    ("jsd", 0.3, 0.3, "none"),
    ("jsd", 0.5, None, "sum"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck(kind, beta, entry_clip, reduction, backend):
    # small logits (offset 0, std 1) keep summands away from the clip kink for the finite differences
    x, w, xt, _, gates, ignore = make_case(4, 5, 7, 2, seed=13, logit_std=1.0, offset=0.0)
    # a separate constant teacher head: with the shared `w`, finite differences would also move the
    # (stop-gradient) teacher
    tw = w.clone()
    x.requires_grad_()
    w.requires_grad_()

    def fn(x_, w_):
        return linear_divergence(x_, w_, xt, teacher_head=tw, gates=gates, kind=kind, beta=beta, temperature=1.3,
                                 entry_clip=entry_clip, mask=~ignore, reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_teacher_side_gets_no_gradient():
    x, w, xt, _, gates, _ = make_case(5, 6, 19, 2, seed=4)
    w = w.clone().requires_grad_()
    xt = xt.clone().requires_grad_()
    x = x.clone().requires_grad_()
    loss = linear_divergence(x, w, xt, teacher_head=w, gates=gates, kind="rkl", backend="cpu")
    loss.backward()
    assert xt.grad is None
    want = loss_and_grads(reference_f64, x, w, xt.detach(), None, gates=gates, kind="rkl", beta=0.5,
                          temperature=1.0, entry_clip=None, mask=torch.ones(5, dtype=torch.bool),
                          reduction="mean")
    torch.testing.assert_close(w.grad, want[2], rtol=1e-10, atol=1e-12)


def test_partial_and_no_grad_paths():
    x, w, xt, _, gates, ignore = make_case(6, 6, 23, 2, seed=8)
    kw = dict(gates=gates, kind="jsd", beta=0.3, entry_clip=0.05, mask=~ignore, backend="cpu")
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    full = linear_divergence(xf, wf, xt, **kw)
    (2.5 * full).backward()  # grad_output != 1 must scale the gradients computed in the forward
    want = loss_and_grads(reference_f64, x, w, xt, None, **{k: v for k, v in kw.items() if k != "backend"},
                          temperature=1.0, reduction="none")
    torch.testing.assert_close(full.detach(), want[0][~ignore].sum() / (~ignore).sum(), rtol=1e-10, atol=1e-12)
    wq = w.clone().requires_grad_()
    (2.5 * linear_divergence(x, wq, xt, **kw)).backward()
    torch.testing.assert_close(wq.grad, wf.grad, rtol=0, atol=0)
    xq = x.clone().requires_grad_()
    (2.5 * linear_divergence(xq, w, xt, **kw)).backward()
    torch.testing.assert_close(xq.grad, xf.grad, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(linear_divergence(x, w, xt, **kw), full.detach(), rtol=0, atol=0)
    torch.testing.assert_close(linear_divergence(x, w, xt, **dict(kw, backend="auto")), full.detach(), rtol=0, atol=0)


def _bad_calls():
    x, w, xt, _, gates, _ = make_case(4, 6, 11, 2, seed=0, dtype=torch.float32)
    ok = dict(student_hidden=x, weight=w, teacher_hidden=xt)
    cases = [
        (dict(student_hidden=x[0]), ValueError, r"student_hidden must have shape \[N, H\]"),
        (dict(weight=w[:, :5]), ValueError, r"weight.shape\[1\] must equal"),
        (dict(teacher_hidden=xt[0]), ValueError, r"teacher_hidden must have shape \[K, N, Ht\]"),
        (dict(teacher_hidden=xt[:, :3]), ValueError, r"teacher_hidden.shape\[1\] must equal"),
        (dict(teacher_hidden=xt[:0]), ValueError, r"K >= 1"),
        (dict(teacher_hidden=xt[..., :5]), ValueError, r"teacher_hidden.shape\[2\] must equal"),
        (dict(teacher_head=torch.randn(11, 5)), ValueError, r"teacher_head.shape\[1\] must equal"),
        (dict(teacher_head=torch.randn(12, 6)), ValueError, r"teacher_head.shape\[0\] must equal"),
        (dict(weight=w.double()), TypeError, r"student_hidden .* and weight .* must have the same dtype"),
        (dict(student_hidden=x.long(), weight=w.long()), TypeError, r"student_hidden must be a floating"),
        (dict(gates=gates[:, :1]), ValueError, r"gates must have shape \[N, K\] = \[4, 2\]"),
        (dict(gates=-gates), ValueError, r"gates must be finite and non-negative"),
        (dict(gates=gates.masked_fill(gates > 0.5, float("nan"))), ValueError, r"gates must be finite"),
        (dict(gates=gates.clone().requires_grad_()), ValueError, r"gates are constants"),
        (dict(kind="kl"), ValueError, r"kind must be one of"),
        (dict(beta=1.5), ValueError, r"beta must be a number in \[0, 1\]"),
        (dict(beta=-0.1), ValueError, r"beta must be a number in \[0, 1\]"),
        (dict(temperature=0.0), ValueError, r"temperature must be a positive"),
        (dict(entry_clip=0.0), ValueError, r"entry_clip must be None or a positive"),
        (dict(entry_clip=-0.05), ValueError, r"entry_clip must be None or a positive"),
        (dict(mask=torch.zeros(4)), TypeError, r"mask must be a bool tensor"),
        (dict(mask=torch.zeros(3, dtype=torch.bool)), ValueError, r"mask must have shape \[N\] .*= \[4\]"),
        (dict(reduction="avg"), ValueError, r"reduction must be one of"),
        (dict(backend="cuda"), ValueError, r"backend must be one of"),
        (dict(workspace_bytes=0), ValueError, r"workspace_bytes must be a positive int"),
        (dict(student_hidden=x.to("meta")), ValueError, r"all tensors must be on one device"),
    ]
    return [(dict(ok, **over), exc, msg) for over, exc, msg in cases]


@pytest.mark.parametrize("kwargs,exc,msg", _bad_calls())
def test_bad_arguments_raise(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        linear_divergence(**kwargs)


def test_deprecated_ignore_mask_and_teacher_weight_keywords_translate():
    """The old spellings (ignore_mask: True = ignored; teacher_weight) still work, with a DeprecationWarning."""
    x, w, xt, tw, gates, ignore = make_case(6, 6, 23, 2, seed=4, ht=5)
    want = linear_divergence(x, w, xt, teacher_head=tw, gates=gates, mask=~ignore, backend="cpu")
    with pytest.warns(DeprecationWarning, match="ignore_mask"):
        with pytest.warns(DeprecationWarning, match="teacher_weight"):
            got = linear_divergence(x, w, xt, teacher_weight=tw, gates=gates, ignore_mask=ignore, backend="cpu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        linear_divergence(x, w, xt, teacher_head=tw, mask=~ignore, ignore_mask=ignore)
