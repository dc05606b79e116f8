"""sgsd_loss and teacher_logprobs (hidden states -> SGSD) against float64 oracles from SPEC §2-3.

Both ops run on top of linear_logprobs, so every test runs with backend="reference" and with
backend="auto" (the C++ op on CPU tensors).
"""
from __future__ import annotations

import math
import weakref

import pytest
import torch

from sgsd_fast.ops import sgsd_gated_loss, sgsd_loss, teacher_logprobs

BACKENDS = ["reference", "auto"]
B, T, H, V = 3, 11, 16, 97


def logprobs64(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=False):
    """SPEC §2 in float64, one row at a time: z = W h / tau, log p = z[y] - logsumexp(z), and the
    entropy -sum p log p; ignored rows -> 0."""
    w = weight.double()
    out, ent = [], []
    for h, y in zip(hidden.reshape(-1, hidden.shape[-1]).double(), targets.reshape(-1).tolist()):
        if y == ignore_index:
            out.append(torch.zeros((), dtype=torch.float64))
            ent.append(torch.zeros((), dtype=torch.float64))
            continue
        z = (w @ h) / temperature
        logp = z - torch.logsumexp(z, 0)
        out.append(logp[y])
        ent.append(-(logp.exp() * logp).sum().detach())
    logp = torch.stack(out).reshape(targets.shape)
    return (logp, torch.stack(ent).reshape(targets.shape)) if with_entropy else logp


def problem(k, seed, dtype=torch.float32):
    """Hidden states whose logits have std ~5 and a large shared offset; teachers are perturbed
    students so that |delta| spans the gate's active range and beyond."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.8
    weight[:, 0] += 3.0  # with hidden[..., 0] ~ 4 this shifts every logit by ~12
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64) * 1.5
    hidden[..., 0] += 4.0
    teachers = hidden[None] + torch.randn(k, B, T, H, generator=g, dtype=torch.float64) * 0.6
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[1, :] = False  # one fully masked rollout
    targets[~mask] = -100  # padding ids as a trainer would leave them
    mask[2, -1] = False
    targets[2, -1] = 10**6  # any value is allowed where mask is False
    rewards = torch.tensor([1.0, 0.0, 0.0])
    weights = torch.softmax(torch.randn(B, k, generator=g, dtype=torch.float64), -1)
    if k > 1:
        weights[2, 0] = 0.0  # an absent teacher
        weights[2] /= weights[2].sum()
    return hidden.to(dtype), weight.to(dtype), teachers.to(dtype), targets, mask, rewards, weights.float()


def coefficient(s, q, mask, rewards, weights, tau, clip, eps):
    """A_t of SPEC §3 in float64 with explicit loops (and the supports, for margin checks)."""
    b, k, t = q.shape
    a = torch.zeros(b, t, dtype=torch.float64)
    supports = []
    for i in range(b):
        n = max(1, int(mask[i].sum()))
        o = 1.0 if rewards[i] > 0 else -1.0
        for kk in range(k):
            deltas = [float(q[i, kk, j]) - float(s[i, j]) for j in range(t) if mask[i, j]]
            support = sum(min(max(d, -clip), clip) for d in deltas) / n
            supports.append(support)
            rho = o * ((1.0 if support > 0 else -1.0) if abs(support) > eps else 0.0)
            for j in range(t):
                if mask[i, j]:
                    d = float(q[i, kk, j]) - float(s[i, j])
                    sig = 1.0 / (1.0 + math.exp(d * d / (2 * tau)))
                    a[i, j] -= float(weights[i, kk]) * rho * sig * d / (tau * n * b)
    return a, supports


_CASES = [(torch.float32, 8, 1.0), (torch.float32, 1, 1.1), (torch.float64, 8, 1.1), (torch.bfloat16, 4, 1.0)]
# The Triton kernels run through the interpreter on CPU (slow): one fp32 case covers the composition.
GRADIENT_CASES = [(backend, *case) for backend in BACKENDS for case in _CASES] + [("triton", torch.float32, 8, 1.1)]


@pytest.mark.parametrize("backend,dtype,k,temperature", GRADIENT_CASES)
def test_gradient_is_the_gated_policy_gradient(backend, dtype, k, temperature):
    hidden, weight, teachers, targets, mask, rewards, weights = problem(k, seed=k, dtype=dtype)
    tau, clip, eps = 0.8, 3.0, 0.05
    q = teacher_logprobs(teachers, weight, targets.masked_fill(~mask, -100), temperature=temperature, backend=backend)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    opts = dict(tau=tau, clip=clip, deadzone=eps)
    loss, metrics = sgsd_loss(
        h, w, targets, q, mask, rewards, weights, **opts, temperature=temperature, backend=backend
    )
    loss.backward()

    # Oracle: grad of sum_t A_t s_t in float64, from the same (dtype-rounded) inputs.
    h64 = hidden.double().requires_grad_()
    w64 = weight.double().requires_grad_()
    s64, ent64 = logprobs64(h64, w64, targets.masked_fill(~mask, -100), temperature, with_entropy=True)
    a, supports = coefficient(s64.detach(), q.double(), mask, rewards, weights, tau, clip, eps)
    assert min(abs(abs(x) - eps) for x in supports) > 1e-3  # stances cannot flip under rounding
    (a * s64).sum().backward()
    assert metrics["helpful_frac"] + metrics["harmful_frac"] > 0 and a.abs().max() > 0
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        scale = want.abs().max().item()
        if dtype == torch.float64:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale)
        elif dtype == torch.float32:
            # fp32 logits (~15 in size, 97-way softmax): relative error ~1e-6 per term.
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
        else:
            # fp32 math, one bf16 rounding of the finished gradient (2^-9 relative; 2^-8 leaves
            # margin) plus fp32 accumulation noise. bf16 partial sums would exceed this.
            err = (got.double() - want).abs()
            assert (err <= want.abs() * 2.0**-8 + 1e-5 * scale).all(), err.max()
    # The loss value is the gated loss of the float64 student log-probs.
    want_loss, _ = sgsd_gated_loss(s64.detach(), q.double(), mask, rewards, weights.double(), **opts)
    assert loss.item() == pytest.approx(want_loss.item(), abs=1e-9 if dtype == torch.float64 else 1e-5)
    want_entropy = (ent64.sum() / mask.sum()).item()
    assert metrics["student_entropy_mean"] == pytest.approx(want_entropy, rel=1e-9 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_active_teacher_gives_exactly_zero_gradients(backend):
    hidden, weight, teachers, targets, mask, rewards, weights = problem(3, seed=4)
    q = teacher_logprobs(teachers, weight, targets.masked_fill(~mask, -100), backend=backend)
    for m in (torch.zeros_like(mask), mask):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        deadzone = 0.05 if not m.any() else 100.0  # all masked, or every teacher in the dead zone
        loss, _ = sgsd_loss(h, w, targets, q, m, rewards, weights, deadzone=deadzone, backend=backend)
        loss.backward()
        assert loss.item() == 0.0
        assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_teacher_logprobs_tensor_and_generator(backend, dtype):
    hidden, weight, teachers, targets, mask, *_ = problem(4, seed=9, dtype=dtype)
    targets = targets.masked_fill(~mask, -100)
    want = torch.stack([logprobs64(teachers[i], weight, targets, 1.1) for i in range(4)], dim=1)
    teachers.requires_grad_()  # must not matter: teachers are forward-only
    from_tensor = teacher_logprobs(teachers, weight, targets, temperature=1.1, backend=backend)
    from_iter = teacher_logprobs((teachers[i] for i in range(4)), weight, targets, temperature=1.1, backend=backend)
    want_ent = torch.stack([logprobs64(teachers[i], weight, targets, 1.1, with_entropy=True)[1] for i in range(4)], 1)
    # fp32 log-probs of size ~20 built from logits ~15: absolute rounding ~1e-5.
    atol = 1e-11 if dtype == torch.float64 else 5e-5
    for source in (teachers, [teachers[i] for i in range(4)]):
        logp, entropy = teacher_logprobs(source, weight, targets, temperature=1.1, backend=backend, return_entropy=True)
        torch.testing.assert_close(logp.double(), want, rtol=0, atol=atol)
        # Entropies of size ~3 accumulated over V terms: fp32 gives ~1e-6 relative.
        torch.testing.assert_close(entropy.double(), want_ent, rtol=1e-5, atol=atol)
    for got in (from_tensor, from_iter):
        assert got.shape == (B, 4, T) and not got.requires_grad
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)
        assert torch.equal(got[~mask[:, None, :].expand_as(got)], torch.zeros(int((~mask).sum()) * 4, dtype=got.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_n_by_v_is_saved_for_backward(backend):
    hidden, weight, teachers, targets, mask, rewards, weights = problem(8, seed=6)
    q = teacher_logprobs(teachers, weight, targets.masked_fill(~mask, -100), backend=backend)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = sgsd_loss(h, w, targets, q, mask, rewards, weights, backend=backend)
    n_by_v = B * T * V  # > V * H here, so the weight itself does not count
    assert n_by_v > V * H
    # The fused op keeps O(N + V*H); the materialized reference is the control that must trip it.
    assert (max(saved) >= n_by_v) == (backend == "reference")


def test_teacher_logprobs_keeps_one_teacher_alive():
    _, weight, _, targets, *_ = problem(1, seed=2)
    refs: list[weakref.ref] = []

    def lazy_teachers():
        for i in range(5):
            # Plain reference counting (no gc pass) must already have released the previous teacher.
            assert all(r() is None for r in refs), f"teacher {i - 1} still alive while teacher {i} is computed"
            g = torch.Generator().manual_seed(i)
            h = torch.randn(B, T, H, generator=g)
            refs.append(weakref.ref(h))
            yield h
            del h

    out = teacher_logprobs(lazy_teachers(), weight, in_range(targets), num_teachers=5)
    assert out.shape == (B, 5, T)


def in_range(targets):
    """All-valid ids (for teacher scoring tests that do not exercise ignore_index)."""
    return targets.masked_fill(targets >= V, 0).clamp(min=0)


def _ops_inputs():
    hidden, weight, teachers, targets, mask, rewards, weights = problem(2, seed=1)
    q = teacher_logprobs(teachers, weight, targets.masked_fill(~mask, -100), backend="reference")
    return dict(
        student_hidden=hidden,
        weight=weight,
        targets=targets,
        teacher_logp=q,
        mask=mask,
        rewards=rewards,
        teacher_weights=weights,
    )


def _mask_negative(t):
    t = t.clone()
    t[0, 0] = -1
    return t


@pytest.mark.parametrize(
    "name,fn,error,match",
    [
        ("student_hidden", lambda t: t[0], ValueError, r"student_hidden must have shape \[B, T, H\]"),
        ("student_hidden", lambda t: t.long(), TypeError, "student_hidden must be a floating tensor"),
        ("mask", lambda t: t.long(), TypeError, "mask must be a bool tensor"),
        ("mask", lambda t: t[:, :3], ValueError, r"mask must have shape \[B, T\]"),
        ("targets", lambda t: t[:, :3], ValueError, r"targets must have shape \[B, T\]"),
        ("targets", lambda t: t.float(), TypeError, "targets must be an integer tensor"),
        ("targets", lambda t: torch.full_like(t, V), ValueError, "targets must lie in"),
        ("targets", _mask_negative, ValueError, "targets must be valid ids >= 0 wherever mask is True"),
        ("teacher_logp", lambda t: t[:, :, :3], ValueError, r"teacher_logp must have shape \[B, K, T\]"),
        ("weight", lambda t: t[:, :3], ValueError, "weight"),
    ],
)
def test_sgsd_loss_bad_input_raises(name, fn, error, match):
    args = _ops_inputs()
    args["mask"][0, 0] = True
    args["targets"][0, 0] = 5
    args[name] = fn(args[name])
    with pytest.raises(error, match=match):
        sgsd_loss(**args)


def test_sgsd_loss_forwards_extra_metrics():
    args = _ops_inputs()
    _, metrics = sgsd_loss(**args, extra_metrics={"teacher_entropy_mean": torch.tensor(1.25)})
    assert metrics["teacher_entropy_mean"] == 1.25 and metrics["student_entropy_mean"] > 0
    with pytest.raises(ValueError, match="must not redefine the built-in metric 'student_entropy_mean'"):
        sgsd_loss(**args, extra_metrics={"student_entropy_mean": torch.tensor(1.0)})


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda th: th[0], ValueError, r"teacher_hidden must have shape \[K, B, T, H\]"),
        (lambda th: th[:, :2], ValueError, r"teacher_hidden must have shape \[K, B, T, H\]"),
        (lambda th: th[:0], ValueError, r"at least one teacher"),
        (lambda th: iter([]), ValueError, "yielded no teachers"),
        (lambda th: [th[0], th[1, :, :4]], ValueError, r"teacher_hidden\[1\] must have shape \[B, T, H\]"),
        (lambda th: [th[0], th[1].tolist()], TypeError, r"teacher_hidden\[1\] must be a torch.Tensor"),
        (lambda th: [th[0].long()], TypeError, r"teacher_hidden\[0\] must be a floating tensor"),
        (lambda th: 3.0, TypeError, "teacher_hidden must be a"),
        (lambda th: "abc", TypeError, "teacher_hidden must be a"),
        (lambda th: (x for x in th[:3]), ValueError, "expected num_teachers = 2"),
    ],
)
def test_teacher_logprobs_bad_input_raises(make, error, match):
    _, weight, teachers, targets, *_ = problem(3, seed=1)
    with pytest.raises(error, match=match):
        teacher_logprobs(make(teachers), weight, in_range(targets), num_teachers=2 if "num" in match else None)


def test_teacher_logprobs_bad_targets_raise():
    _, weight, teachers, targets, *_ = problem(2, seed=1)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        teacher_logprobs(teachers, weight, targets.float())
    with pytest.raises(ValueError, match=r"targets must have shape \[B, T\]"):
        teacher_logprobs(teachers, weight, targets[0])
    with pytest.raises(ValueError, match=r"teacher_hidden must have shape \[K, B, T, H\]"):
        teacher_logprobs(teachers, weight, targets[:, :4])
