"""linear_logprobs: accuracy against float64, gradients, edge cases and argument errors.

Accuracy is checked in the Cut Cross-Entropy style, |ours - fp64| <= |torch same-dtype naive -
fp64| + tol, elementwise, where tol is the worst-case fp32 rounding bound of the computation
(`error_bounds` below derives it); the inputs are random with logit spread 5 and per-row offsets
of tens, so a kernel that drops the running max, mixes rows or rounds logits to bf16 fails.

The C++ and reference backends are tested here; the Triton kernels (interpreter mode on CPU) in
test_linear_logprobs_triton.py, which reuses the helpers of this module.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sgsd_fast.ops.linear_logprobs import linear_logprobs
from sgsd_fast.ops.reference import linear_logprobs_reference

FP32_EPS = 2.0**-24  # unit roundoff of fp32 (the kernels' math dtype)
# A "tf32x3" dot (fp32 operands on sm80+, ops/triton/configs.py) misses <= ~12 u of |a||b| per
# product (the lo*lo term and the remainders' TF32 roundings); counted as 16 more terms of the
# logit's H-term dot product in `error_bounds`.
TF32X3_EXTRA_TERMS = 16
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# 4 KiB of fp32 workspace = 32-row chunks x 32-wide vocab tiles on the C++ backend: several chunks
# and a ragged last tile at the test shapes, so the online merge and dW accumulation are exercised.
SMALL_WORKSPACE = 4096


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(n, h, v, dtype, *, logit_std=5.0, offset=40.0, ignore_every=0, seed=0):
    """hidden [n, h], weight [v, h] in `dtype`, targets [n] (half of them the row's argmax).

    Logits have spread `logit_std` plus a row offset hidden[:, 0] * offset (tens of units), the
    regime where a missing max-subtraction or an fp32 cancellation shows up.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * (logit_std / math.sqrt(h - 1))
    weight[:, 0] = offset
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    z = hidden.double() @ weight.double().T
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::2] = z.argmax(dim=1)[::2]
    if ignore_every:
        targets[1::ignore_every] = -100
    return hidden, weight, targets


def naive_same_dtype(hidden, weight, targets, temperature):
    """What plain torch does in the input dtype: logits from a `dtype` matmul, softmax in fp32."""
    z = (hidden @ weight.T).float() / temperature
    valid = targets != -100
    logsm = torch.log_softmax(z, dim=-1)
    picked = logsm.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros_like(picked))


def error_bounds(hidden, weight, targets, temperature, grad_logp, grad_dtype, *, eager=False, dz_rounding=1,
                 dot_extra_terms=0):
    """Worst-case fp32 error bounds of (logp, lse, entropy, dX, dW) for these inputs.

    Standard rounding analysis with gamma(n) = n u / (1 - n u), u = fp32 unit roundoff:
    - a logit is a dot product of H terms then scaled by 1/tau: |dz| <= gamma(H + 2) (|h|.|w|)/tau
      (gamma(H + 2 + dot_extra_terms) for a dot with per-product error, e.g. tf32x3); call its
      row maximum delta;
    - sum-exp over V terms (exp itself a few ulp): relative error <= gamma(V + 4), i.e. an absolute
      error of that size on log(sum);
    - logp = z_t - lse moves by at most 2 delta (+ the sums' error and final roundings of |lse|);
    - entropy has |dH/dz| summing to <= 2H <= 2 log V over the row;
    - softmax moves by p * expm1(2 delta + 2 gamma(V)); the gradient GEMMs add gamma(V or N) of
      sum |dz||w| (resp. |dz||x|), and the final rounding to the gradient dtype (and the Triton
      backend's cast of dz to that dtype) adds 2 u_out of the same sums (`dz_rounding` = 2 when dz
      is rounded toward zero, as the Triton interpreter's bf16/fp16 stores do: then 3 u_out).
    - eager (the CPU forward that forms dlogp/dX = (w_y - sum_v p_v w_v) / tau for a frozen weight):
      the subtraction of two fp32 vectors of size |w_y| and p.|w| adds 2u of their sum, and the
      rescaled running sum D another gamma(V) of p.|w| (already in gamma(v) * abs_dz.|w| only
      when p_y is not close to 1), both times |g| / tau.
    """
    h, w = hidden.double(), weight.double()
    n, dim = h.shape
    v = w.shape[0]

    def gamma(k):
        return k * FP32_EPS / (1 - k * FP32_EPS)

    valid = targets != -100
    abs_z = (h.abs() @ w.abs().T) / temperature
    delta = gamma(dim + 2 + dot_extra_terms) * abs_z.max(dim=1).values
    z = (h @ w.T) / temperature
    lse = torch.logsumexp(z, dim=1)
    p = torch.softmax(z, dim=1)
    sums = gamma(v + 4)
    z_t = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    tol_lse = delta + sums + 4 * FP32_EPS * lse.abs()
    tol_logp = 2 * delta + sums + 4 * FP32_EPS * (lse.abs() + z_t.abs())
    tol_ent = (2 * delta + 4 * sums) * (1 + math.log(v))
    u_out = UNIT_ROUNDOFF[grad_dtype] if grad_dtype in UNIT_ROUNDOFF else FP32_EPS
    g = torch.where(valid, grad_logp.double(), 0.0).abs() / temperature
    onehot = torch.zeros_like(p).scatter_(1, torch.where(valid, targets, 0)[:, None], 1.0)
    abs_dz = g[:, None] * (onehot - p).abs()
    dp = (g * torch.expm1(2 * delta + 2 * sums))[:, None] * p
    tol_dx = dp @ w.abs() + (gamma(v) + (1 + dz_rounding) * u_out) * (abs_dz @ w.abs())
    if eager:
        w_y = w.abs()[torch.where(valid, targets, 0)]
        tol_dx = tol_dx + g[:, None] * ((2 * FP32_EPS + gamma(v)) * (p @ w.abs()) + 2 * FP32_EPS * w_y)
    tol_dw = dp.T @ h.abs() + (gamma(n) + (1 + dz_rounding) * u_out) * (abs_dz.T @ h.abs())
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "logp": torch.where(valid, tol_logp, zero),
        "lse": torch.where(valid, tol_lse, zero),
        "entropy": torch.where(valid, tol_ent, zero),
        "dx": tol_dx,
        "dw": tol_dw,
    }


def assert_cce_bound(name, ours, naive, truth, tol):
    """|ours - truth| <= |naive - truth| + tol elementwise (the Cut Cross-Entropy criterion)."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = (ours.double() - truth).abs()
    slack = (naive.double() - truth).abs() + tol
    bad = err > slack
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} entries beyond the bound; worst excess "
        f"{(err - slack).max().item():.3e}, max err {err.max().item():.3e}, max tol {tol.max().item():.3e}")


def run_with_grads(hidden, weight, targets, grad_logp, **kw):
    """(logp, lse, entropy, dX, dW) of linear_logprobs with upstream gradient grad_logp."""
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, lse, ent = linear_logprobs(h, w, targets, return_lse=True, return_entropy=True, **kw)
    logp.backward(grad_logp.to(logp.dtype))
    return logp.detach(), lse, ent, h.grad, w.grad


def check_accuracy(backend, dtype, temperature, *, n=64, dim=48, vocab=300, workspace_bytes=None, device="cpu",
                   dz_rounding=1, dot_extra_terms=0):
    """Forward outputs and both gradients of `backend` on `device` against float64 (on CPU), CCE-style."""
    hidden, weight, targets = make_inputs(n, dim, vocab, dtype, ignore_every=5, seed=n + vocab)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    on = (lambda t: t.to(device))
    logp, lse, ent, dx, dw = (t.cpu() for t in run_with_grads(
        on(hidden), on(weight), on(targets), on(grad), temperature=temperature, backend=backend,
        workspace_bytes=workspace_bytes))
    assert logp.dtype == torch.float32 and dx.dtype == dtype and dw.dtype == dtype

    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, temperature=temperature,
                           backend="reference")
    h_n = hidden.detach().clone().requires_grad_(True)
    w_n = weight.detach().clone().requires_grad_(True)
    naive = naive_same_dtype(h_n, w_n, targets, temperature)
    naive.backward(grad.float())
    naive_all = linear_logprobs_reference(hidden, weight, targets, temperature=temperature)
    tol = error_bounds(hidden, weight, targets, temperature, grad, dtype, dz_rounding=dz_rounding,
                       dot_extra_terms=dot_extra_terms)

    assert_cce_bound("logp", logp, naive.detach(), truth[0], tol["logp"])
    assert_cce_bound("lse", lse, naive_all[1], truth[1], tol["lse"])
    assert_cce_bound("entropy", ent, naive_all[2], truth[2], tol["entropy"])
    assert_cce_bound("d hidden", dx, h_n.grad, truth[3], tol["dx"])
    assert_cce_bound("d weight", dw, w_n.grad, truth[4], tol["dw"])


@pytest.mark.parametrize("backend, workspace_bytes", [("cpu", None), ("cpu", SMALL_WORKSPACE), ("reference", None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_accuracy_vs_float64(backend, workspace_bytes, dtype, temperature):
    check_accuracy(backend, dtype, temperature, workspace_bytes=workspace_bytes)


@pytest.mark.parametrize("workspace_bytes", [None, SMALL_WORKSPACE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_eager_dx_accuracy_vs_float64(workspace_bytes, dtype, temperature):
    """The CPU forward that forms dlogp/dX itself (frozen weight, hidden needing grad): dX within the
    eager bound of float64, logp/lse/entropy as in the store-free path, dW never formed."""
    n, dim, vocab = 64, 48, 300
    hidden, weight, targets = make_inputs(n, dim, vocab, dtype, ignore_every=5, seed=11)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    h = hidden.detach().clone().requires_grad_(True)
    logp, lse, ent = linear_logprobs(h, weight, targets, temperature=temperature, backend="cpu", return_lse=True,
                                     return_entropy=True, workspace_bytes=workspace_bytes)
    logp.backward(grad.float())
    assert h.grad.dtype == dtype and weight.grad is None
    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, temperature=temperature,
                           backend="reference")
    h_n = hidden.detach().clone().requires_grad_(True)
    naive_same_dtype(h_n, weight, targets, temperature).backward(grad.float())
    naive_all = linear_logprobs_reference(hidden, weight, targets, temperature=temperature)
    tol = error_bounds(hidden, weight, targets, temperature, grad, dtype, eager=True)
    assert_cce_bound("logp", logp.detach(), naive_all[0], truth[0], tol["logp"])
    assert_cce_bound("lse", lse, naive_all[1], truth[1], tol["lse"])
    assert_cce_bound("entropy", ent, naive_all[2], truth[2], tol["entropy"])
    assert_cce_bound("d hidden", h.grad, h_n.grad, truth[3], tol["dx"])
    assert (h.grad[1::5] == 0).all(), "ignored rows get no gradient"


def test_eager_dx_is_taken_only_for_a_frozen_weight(monkeypatch):
    """Which forward runs: eager for (hidden grad, frozen weight) under grad mode; store-free otherwise."""
    hidden, weight, targets = make_inputs(12, 16, 40, torch.float32)
    used = []
    ops = torch.ops.sgsd_fast
    for name in ("linear_logprobs_fwd", "linear_logprobs_fwd_dx"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    h = hidden.clone().requires_grad_(True)
    linear_logprobs(h, weight, targets, backend="cpu")
    linear_logprobs(h, weight.clone().requires_grad_(True), targets, backend="cpu")
    with torch.no_grad():
        linear_logprobs(h, weight, targets, backend="cpu")
    linear_logprobs(hidden, weight, targets, backend="cpu")
    assert used == ["linear_logprobs_fwd_dx", "linear_logprobs_fwd", "linear_logprobs_fwd", "linear_logprobs_fwd"]


def test_cpu_accuracy_large_vocab_tile_and_offsets():
    # Wider than one 8192 vocabulary tile, logits std 10 and offsets ~100: the online merge across
    # tiles carries the whole row.
    hidden, weight, targets = make_inputs(24, 32, 9000, torch.float32, logit_std=10.0, offset=100.0, seed=3)
    truth = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    logp, lse, ent = linear_logprobs(hidden, weight, targets, backend="cpu", return_lse=True, return_entropy=True,
                                     workspace_bytes=1 << 20)
    naive = linear_logprobs_reference(hidden, weight, targets)
    tol = error_bounds(hidden, weight, targets, 1.0, torch.zeros(24), torch.float32)
    assert_cce_bound("logp", logp, naive[0], truth[0], tol["logp"])
    assert_cce_bound("lse", lse, naive[1], truth[1], tol["lse"])
    assert_cce_bound("entropy", ent, naive[2], truth[2], tol["entropy"])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_float64(backend):
    hidden, weight, targets = make_inputs(6, 5, 11, torch.float64, logit_std=3.0, offset=4.0, ignore_every=4)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def f(h, w):
        # 24-byte workspace: 1-row chunks x 3-wide tiles, so every accumulation path is differentiated.
        return linear_logprobs(h, w, targets, temperature=1.3, backend=backend, workspace_bytes=24)

    assert torch.autograd.gradcheck(f, (hidden, weight))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40), dim=st.integers(2, 40), vocab=st.integers(1, 150),
    workspace=st.integers(4, 4096), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**16),
)
def test_cpu_any_shape_and_block_plan(n, dim, vocab, workspace, temperature, seed):
    # Arbitrary shapes against arbitrary (chunk, tile) plans, including V = 1 and 1-wide tiles.
    hidden, weight, targets = make_inputs(n, dim, vocab, torch.float32, ignore_every=3, seed=seed)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ours = run_with_grads(hidden, weight, targets, grad, backend="cpu", temperature=temperature,
                          workspace_bytes=workspace)
    truth = run_with_grads(hidden.double(), weight.double(), targets, grad, backend="reference",
                           temperature=temperature)
    tol = error_bounds(hidden, weight, targets, temperature, grad, torch.float32)
    for name, a, b in zip(("logp", "lse", "entropy", "dx", "dw"), ours, truth):
        assert torch.all((a.double() - b).abs() <= tol[name]), name


BACKENDS = ["cpu", "triton", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_are_zero_and_do_not_change_others(backend):
    hidden, weight, targets = make_inputs(20, 24, 70, torch.float32, ignore_every=3)
    valid = targets != -100
    grad = torch.randn(20)
    logp, lse, ent, dx, dw = run_with_grads(hidden, weight, targets, grad, backend=backend)
    assert torch.all(logp[~valid] == 0) and torch.all(lse[~valid] == 0) and torch.all(ent[~valid] == 0)
    assert torch.all(dx[~valid] == 0)
    # Ignored rows are dropped before any GEMM, so the valid rows see exactly the same computation.
    sub = run_with_grads(hidden[valid], weight, targets[valid], grad[valid], backend=backend)
    if backend == "reference":
        # The reference multiplies all rows (other GEMM shapes, other rounding): both runs are
        # within the fp32 bound of the truth, hence within twice the bound of each other.
        tol = error_bounds(hidden, weight, targets, 1.0, grad, torch.float32)
        assert torch.all((logp[valid] - sub[0]).abs() <= 2 * tol["logp"][valid])
        assert torch.all((dx[valid] - sub[3]).abs() <= 2 * tol["dx"][valid])
        assert torch.all((dw - sub[4]).abs() <= 2 * tol["dw"])
    else:
        assert torch.equal(logp[valid], sub[0]) and torch.equal(dx[valid], sub[3]) and torch.equal(dw, sub[4])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend):
    hidden, weight, _ = make_inputs(5, 16, 40, torch.float32)
    targets = torch.full((5,), -100)
    logp, lse, ent, dx, dw = run_with_grads(hidden, weight, targets, torch.ones(5), backend=backend)
    for t in (logp, lse, ent, dx, dw):
        assert torch.isfinite(t).all() and torch.all(t == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    _, weight, _ = make_inputs(1, 16, 40, torch.float32)
    hidden = torch.empty(0, 16, requires_grad=True)
    w = weight.clone().requires_grad_(True)
    logp = linear_logprobs(hidden, w, torch.empty(0, dtype=torch.long), backend=backend)
    assert logp.shape == (0,) and logp.dtype == torch.float32
    logp.sum().backward()
    assert hidden.grad.shape == (0, 16) and torch.all(w.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_row(backend):
    hidden, weight, targets = make_inputs(1, 16, 50, torch.float32, seed=7)
    logp, lse, ent, dx, dw = run_with_grads(hidden, weight, targets, torch.tensor([1.5]), backend=backend)
    truth = run_with_grads(hidden.double(), weight.double(), targets, torch.tensor([1.5]), backend="reference")
    tol = error_bounds(hidden, weight, targets, 1.0, torch.tensor([1.5]), torch.float32)
    for name, ours, ref in zip(("logp", "lse", "entropy", "dx", "dw"), (logp, lse, ent, dx, dw), truth):
        assert ours.shape == ref.shape
        assert torch.all((ours.double() - ref).abs() <= tol[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_every", [0, 4])
def test_non_contiguous_inputs(backend, ignore_every):
    hidden, weight, targets = make_inputs(12, 20, 60, torch.float32, ignore_every=ignore_every)
    wide = torch.zeros(12, 40)
    wide[:, ::2] = hidden
    strided = wide[:, ::2]
    targets_strided = torch.stack([targets, torch.zeros_like(targets)], dim=1)[:, 0]
    assert not strided.is_contiguous() and not targets_strided.is_contiguous()
    grad = torch.randn(12)
    a = run_with_grads(strided, weight, targets_strided, grad, backend=backend)
    b = run_with_grads(hidden, weight, targets, grad, backend=backend)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hidden, weight, targets = make_inputs(30, 24, 90, torch.float32, ignore_every=6)
    grad = torch.randn(30)
    a = run_with_grads(hidden, weight, targets, grad, backend=backend, temperature=0.8)
    b = run_with_grads(hidden, weight, targets, grad, backend=backend, temperature=0.8)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_flags_and_forward_only_outputs(backend):
    hidden, weight, targets = make_inputs(8, 16, 40, torch.float32, ignore_every=3)
    h = hidden.clone().requires_grad_(True)
    out = linear_logprobs(h, weight, targets, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == (8,) and out.requires_grad
    logp, lse, ent = linear_logprobs(h, weight, targets, backend=backend, return_lse=True)
    assert ent is None and not lse.requires_grad
    torch.testing.assert_close(logp, out, rtol=0, atol=0)
    logp, lse, ent = linear_logprobs(h, weight, targets, backend=backend, return_entropy=True)
    assert lse is None and not ent.requires_grad
    ref = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    tol = error_bounds(hidden, weight, targets, 1.0, torch.zeros(8), torch.float32)
    assert torch.all((ent.double() - ref[2]).abs() <= tol["entropy"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_no_grad(backend):
    hidden, weight, targets = make_inputs(10, 16, 40, torch.float32)
    h = hidden.clone().requires_grad_(True)
    linear_logprobs(h, weight, targets, backend=backend).sum().backward()
    full = run_with_grads(hidden, weight, targets, torch.ones(10), backend=backend)
    assert weight.grad is None
    if backend == "cpu":  # the eager forward: another summation order, checked against float64 below
        torch.testing.assert_close(h.grad, full[3], rtol=1e-4, atol=1e-3)
    else:
        assert torch.equal(h.grad, full[3])
    with torch.no_grad():
        out = linear_logprobs(h, weight, targets, backend=backend)
    assert not out.requires_grad and torch.equal(out, full[0])


def test_parallel_matches_single_thread():
    # Rows are independent and each row's reductions run in a fixed order, so the thread count
    # must not change a single bit of the C++ results.
    hidden, weight, targets = make_inputs(96, 32, 1000, torch.float32, ignore_every=7)
    grad = torch.randn(96)
    single = run_with_grads(hidden, weight, targets, grad, backend="cpu")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = run_with_grads(hidden, weight, targets, grad, backend="cpu")
    finally:
        torch.set_num_threads(before)
    for x, y in zip(single[:3], parallel[:3]):
        assert torch.equal(x, y)
    # The GEMMs may block differently across thread counts: gradients agree to rounding.
    tol = error_bounds(hidden, weight, targets, 1.0, grad, torch.float32)
    assert torch.all((single[3] - parallel[3]).abs() <= 2 * tol["dx"])
    assert torch.all((single[4] - parallel[4]).abs() <= 2 * tol["dw"])


def test_int32_targets_match_int64():
    hidden, weight, targets = make_inputs(8, 16, 40, torch.float32, ignore_every=3)
    a = linear_logprobs(hidden, weight, targets, backend="cpu")
    b = linear_logprobs(hidden, weight, targets.int(), backend="cpu")
    assert torch.equal(a, b)


def test_auto_backend_on_cpu_is_the_extension():
    hidden, weight, targets = make_inputs(8, 16, 40, torch.float32)
    assert torch.equal(linear_logprobs(hidden, weight, targets),
                       linear_logprobs(hidden, weight, targets, backend="cpu"))


@pytest.mark.parametrize(
    "case, exc, match",
    [
        ("hidden_rank", ValueError, "hidden"),
        ("weight_rank", ValueError, "weight"),
        ("hidden_size", ValueError, "H"),
        ("dtype_mismatch", TypeError, "same dtype"),
        ("integer_hidden", TypeError, "hidden"),
        ("target_too_large", ValueError, "targets"),
        ("target_negative", ValueError, "targets"),
        ("targets_length", ValueError, "targets"),
        ("targets_float", TypeError, "targets"),
        ("temperature_zero", ValueError, "temperature"),
        ("temperature_negative", ValueError, "temperature"),
        ("temperature_inf", ValueError, "positive finite"),  # linear_divergence rejected it already
        ("devices", ValueError, "device"),
        ("backend", ValueError, "backend"),
        ("workspace", ValueError, "workspace_bytes"),
        ("hidden_type", TypeError, "hidden"),
    ],
)
def test_errors(case, exc, match):
    hidden, weight, targets = make_inputs(4, 8, 10, torch.float32)
    kw = {}
    if case == "hidden_rank":
        hidden = hidden[None]
    elif case == "weight_rank":
        weight = weight[0]
    elif case == "hidden_size":
        weight = weight[:, :7]
    elif case == "dtype_mismatch":
        weight = weight.double()
    elif case == "integer_hidden":
        hidden = hidden.long()
        weight = weight.long()
    elif case == "target_too_large":
        targets[1] = 10
    elif case == "target_negative":
        targets[1] = -1
    elif case == "targets_length":
        targets = targets[:3]
    elif case == "targets_float":
        targets = targets.float()
    elif case == "temperature_zero":
        kw["temperature"] = 0.0
    elif case == "temperature_negative":
        kw["temperature"] = -1.0
    elif case == "temperature_inf":
        kw["temperature"] = float("inf")
    elif case == "devices":
        targets = targets.to("meta")
    elif case == "backend":
        kw["backend"] = "cuda"
    elif case == "workspace":
        kw["workspace_bytes"] = 0
    elif case == "hidden_type":
        hidden = hidden.numpy()
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, weight, targets, **kw)


@pytest.mark.parametrize("vocab, dtype", [(49152, torch.float32), (151936, torch.bfloat16), (300, torch.float64)])
def test_cpu_block_fits_the_budget(vocab, dtype):
    from sgsd_fast.ops.linear_logprobs import DEFAULT_WORKSPACE_BYTES, _cpu_blocks

    budget = DEFAULT_WORKSPACE_BYTES["cpu"]
    rows, tile = _cpu_blocks(vocab, dtype, budget)
    elem = 8 if dtype == torch.float64 else 4
    assert 1 <= tile <= vocab and rows * tile * elem <= budget
    assert rows >= 1024  # GEMMs stay large enough for BLAS to run near peak


def test_cpu_op_rejects_out_of_range_targets_when_called_directly():
    from sgsd_fast._ext import load_extension

    load_extension()
    hidden, weight, targets = make_inputs(4, 8, 10, torch.float32)
    targets[2] = -100  # the wrapper drops such rows; the raw op must refuse them, not pick nothing
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, V\)"):
        torch.ops.sgsd_fast.linear_logprobs_fwd(hidden, weight, targets, 1.0, False, 4, 4)


@pytest.mark.slow
def test_matches_the_real_model_head(smollm2):
    # SmolLM2-135M: the final-norm hidden states and the (tied) lm_head weight of the real model
    # give the log-probs of the model's own logits, with the fp32 bound against float64.
    model, tokenizer = smollm2
    ids = tokenizer("Compute 17 * 23. Put the final answer in \\boxed{}.", return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, :-1].float()
        logits = model.lm_head(hidden).float()
    weight = model.get_output_embeddings().weight.detach().float()
    targets = ids[0, 1:]
    model_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    ours = linear_logprobs(hidden, weight, targets)
    truth = linear_logprobs_reference(hidden.double(), weight.double(), targets)[0]
    tol = error_bounds(hidden, weight, targets, 1.0, torch.zeros(len(targets)), torch.float32)
    assert_cce_bound("logp", ours, model_logp, truth, tol["logp"])
    # The model's head is exactly z = W h (no bias, scale or soft-cap): its own fp32 log-probs obey
    # the same fp32 bound, so feeding linear_logprobs last_hidden_state is the model's distribution.
    assert torch.all((model_logp.double() - truth).abs() <= tol["logp"])
