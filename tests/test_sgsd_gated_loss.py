"""sgsd_gated_loss against an independent float64 oracle written from SPEC §3 with explicit loops."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sgsd_fast.ops import sgsd_gated_loss

LOG2 = math.log(2.0)


def oracle(s, q, mask, rewards, weights, tau, clip, eps):
    """Loss, d loss / d s (the SPEC §3 coefficient A_t), stances and metrics; python floats only."""
    b, k, t = len(q), len(q[0]), len(q[0][0])
    grad = [[0.0] * t for _ in range(b)]
    rho = [[0] * k for _ in range(b)]
    supports, raw_supports, rows = ([[0.0] * k for _ in range(b)] for _ in range(3))
    total, clipped, counted = 0.0, 0, 0
    for i in range(b):
        n = max(1, sum(bool(mask[i][j]) for j in range(t)))
        outcome = 1 if rewards[i] > 0 else -1
        rollout_loss = 0.0
        for kk in range(k):
            support = raw = row = 0.0
            for j in range(t):
                if not mask[i][j]:
                    continue
                d = float(q[i][kk][j]) - float(s[i][j])
                support += min(max(d, -clip), clip)
                raw += d
                row += LOG2 - math.log1p(math.exp(-d * d / (2 * tau)))
                if weights[i][kk] > 0:
                    counted += 1
                    clipped += abs(d) > clip
            support, raw, row = support / n, raw / n, row / n
            sigma = (1 if support > 0 else -1) if abs(support) > eps else 0
            rho[i][kk] = outcome * sigma
            supports[i][kk], raw_supports[i][kk], rows[i][kk] = support, raw, row
            rollout_loss += weights[i][kk] * rho[i][kk] * row
            for j in range(t):
                if mask[i][j]:
                    d = float(q[i][kk][j]) - float(s[i][j])
                    gate_grad = 1.0 / (1.0 + math.exp(d * d / (2 * tau))) * d / tau  # d l / d delta
                    grad[i][j] += -weights[i][kk] * rho[i][kk] * gate_grad / (n * b)
        total += rollout_loss
    present = [(i, kk) for i in range(b) for kk in range(k) if weights[i][kk] > 0]
    np_ = max(1, len(present))
    keep = sum(bool(mask[i][j]) for i in range(b) for j in range(t))
    metrics = {
        "loss": total / b,
        "support_clipped_mean": sum(supports[i][kk] for i, kk in present) / np_,
        "support_raw_mean": sum(raw_supports[i][kk] for i, kk in present) / np_,
        "gate_row_loss": sum(rows[i][kk] for i, kk in present) / np_,
        "clipped_token_frac": clipped / max(1, counted),
        "helpful_frac": sum(rho[i][kk] == 1 for i, kk in present) / np_,
        "harmful_frac": sum(rho[i][kk] == -1 for i, kk in present) / np_,
        "neutral_frac": sum(rho[i][kk] == 0 for i, kk in present) / np_,
        "mask_keep_frac": keep / (b * t),
        "reward_mean": sum(float(r) for r in rewards) / b,
        "completion_tokens_mean": keep / b,
    }
    return total / b, grad, rho, supports, metrics


def make_batch(b, k, t, dtype, seed, *, absent=True):
    """Rollouts with realistic log-prob spread: some masked-out positions, one fully masked rollout,
    mixed rewards, absent teachers (zero weight) and one rollout without any teacher."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, t, generator=g, dtype=torch.float64) * 3.0 - 6.0
    # Teachers sit near the student (|delta| mostly < 4, where the gate has gradient) with a few far off.
    q = s[:, None, :] + torch.randn(b, k, t, generator=g, dtype=torch.float64) * 2.0
    q[:, :, ::5] -= 7.0
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0] = False
    rewards = torch.tensor([float(i % 2) for i in range(b)])
    logits = torch.randn(b, k, generator=g, dtype=torch.float64) * 2.0
    if absent and k > 1:
        logits[1::2, 0] = float("-inf")
    weights = torch.softmax(logits, -1)
    if absent:
        weights[-1] = 0.0
    # bf16 cannot hold softmax weights to the 1e-3 row-sum tolerance; they stay fp32 then.
    w_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    return s.to(dtype).requires_grad_(), q.to(dtype), mask, rewards, weights.to(w_dtype)


def as_lists(s, q, mask, rewards, weights):
    return s.detach().double().tolist(), q.double().tolist(), mask.tolist(), rewards.tolist(), weights.double().tolist()


def run_and_compare(b, k, t, dtype, seed, tau, clip, eps, tol):
    s, q, mask, rewards, weights = make_batch(b, k, t, dtype, seed)
    loss, metrics = sgsd_gated_loss(s, q, mask, rewards, weights, tau=tau, clip=clip, deadzone=eps)
    loss.backward()
    want, grad, _, supports, want_metrics = oracle(*as_lists(s, q, mask, rewards, weights), tau, clip, eps)
    # A stance decided in fp32 may only differ from the float64 one when |support| is within fp32
    # rounding of eps; these seeds keep every support far from that boundary.
    assert min(abs(abs(x) - eps) for row in supports for x in row) > 1e-4
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert loss.item() == pytest.approx(want, abs=tol)
    torch.testing.assert_close(s.grad.double(), torch.tensor(grad, dtype=torch.float64), atol=tol, rtol=0)
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=tol), name
    return metrics


# fp32 inputs: values O(10) with O(100) summands give absolute rounding ~1e-5; float64 ~1e-13.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("k", [1, 8])
def test_matches_oracle(dtype, tol, k):
    metrics = run_and_compare(6, k, 23, dtype, seed=k, tau=1.0, clip=3.0, eps=0.05, tol=tol)
    assert metrics["helpful_frac"] > 0 and metrics["harmful_frac"] > 0  # both polarities exercised


def test_matches_oracle_other_hyperparameters():
    metrics = run_and_compare(5, 3, 17, torch.float64, seed=11, tau=0.37, clip=1.5, eps=0.3, tol=1e-12)
    assert metrics["neutral_frac"] > 0 and metrics["clipped_token_frac"] > 0


@settings(max_examples=30, deadline=None, database=None)
@given(
    b=st.integers(1, 4),
    k=st.integers(1, 8),
    t=st.integers(1, 12),
    tau=st.floats(0.25, 4.0),
    clip=st.floats(0.5, 5.0),
    eps=st.floats(0.0, 0.5),
    scale=st.floats(0.3, 6.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_oracle_on_random_shapes(b, k, t, tau, clip, eps, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(b, t, generator=g, dtype=torch.float64) * 4 - 10).requires_grad_()
    q = s.detach()[:, None, :] + torch.randn(b, k, t, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(b, t, generator=g) > 0.3
    rewards = (torch.rand(b, generator=g) > 0.5).double()
    weights = torch.softmax(torch.randn(b, k, generator=g, dtype=torch.float64), -1)
    loss, metrics = sgsd_gated_loss(s, q, mask, rewards, weights, tau=tau, clip=clip, deadzone=eps)
    loss.backward()
    want, grad, _, supports, want_metrics = oracle(*as_lists(s, q, mask, rewards, weights), tau, clip, eps)
    # Summation order differs from the oracle's by ~1e-15; a stance exactly that close to eps could flip.
    assume(min(abs(abs(x) - eps) for row in supports for x in row) > 1e-9)
    assert loss.item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(s.grad, torch.tensor(grad, dtype=torch.float64), atol=1e-13, rtol=1e-10)
    for name, value in want_metrics.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name


def test_bf16_inputs_use_fp32_math():
    s, q, mask, rewards, weights = make_batch(4, 3, 19, torch.bfloat16, seed=3)
    loss, _ = sgsd_gated_loss(s, q, mask, rewards, weights)
    loss.backward()
    assert loss.dtype == torch.float32 and s.grad.dtype == torch.bfloat16
    want, grad, *_ = oracle(*as_lists(s, q, mask, rewards, weights), 1.0, 3.0, 0.05)
    # fp32 math on bf16-exact values: the loss is fp32-accurate; the gradient is rounded to bf16
    # once (relative 2^-9) at the end.
    assert loss.item() == pytest.approx(want, abs=2e-5)
    g = torch.tensor(grad, dtype=torch.float64)
    assert ((s.grad.double() - g).abs() <= g.abs() * 2.0**-8 + 1e-7).all()


def dyadic_case(eps):
    """One rollout, T=4, four teachers whose clipped supports are exactly +eps, -eps, >eps, < -eps."""
    s = torch.full((1, 4), -2.0, dtype=torch.float32, requires_grad=True)
    deltas = torch.tensor(
        [
            [0.25, -0.125, 0.0, 0.125],  # mean 0.0625 = eps      -> stance 0
            [-0.25, 0.125, 0.0, -0.125],  # mean -0.0625 = -eps   -> stance 0
            [0.25, -0.125, 0.0, 0.1875],  # mean 0.078125 > eps   -> stance +1
            [5.0, -3.5, -0.375, 0.0],  # clipped mean -0.09375 (raw mean +0.28125) -> stance -1
        ]
    )
    q = (s.detach()[:, None, :] + deltas[None]).float()
    assert torch.equal(q - s.detach()[:, None, :], deltas[None])  # dyadic: no rounding anywhere
    return s, q


@pytest.mark.parametrize("reward", [1.0, 0.0])
def test_deadzone_boundary_is_strict_and_support_uses_clipped_delta(reward):
    eps = 0.0625
    s, q = dyadic_case(eps)
    weights = torch.full((1, 4), 0.25)
    mask, rewards = torch.ones(1, 4, dtype=torch.bool), torch.tensor([reward])
    loss, metrics = sgsd_gated_loss(s, q, mask, rewards, weights, deadzone=eps)
    loss.backward()
    want, grad, rho, supports, _ = oracle(*as_lists(s, q, mask, rewards, weights), 1.0, 3.0, eps)
    assert supports[0] == [0.0625, -0.0625, 0.078125, -0.09375]
    o = 1 if reward > 0 else -1
    assert rho[0] == [0, 0, o, -o]
    assert metrics["neutral_frac"] == 0.5 and metrics["helpful_frac"] == 0.25 and metrics["harmful_frac"] == 0.25
    assert metrics["support_clipped_mean"] == pytest.approx((0.078125 - 0.09375) / 4, abs=1e-7)
    assert metrics["support_raw_mean"] == pytest.approx((0.078125 + 0.28125) / 4, abs=1e-7)
    assert metrics["clipped_token_frac"] == pytest.approx(2 / 16)  # 5.0 and -3.5
    assert loss.item() == pytest.approx(want, abs=1e-6)
    torch.testing.assert_close(s.grad.double(), torch.tensor(grad, dtype=torch.float64), atol=1e-6, rtol=0)
    # Teacher 4 pushes s away (sign -o) on the huge-delta token too, but the gate has no gradient there.
    assert loss.item() != 0.0


def test_only_boundary_teachers_give_exact_zero():
    s, q = dyadic_case(0.0625)
    args = (s, q[:, :2], torch.ones(1, 4, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([[0.5, 0.5]]))
    loss, metrics = sgsd_gated_loss(*args, deadzone=0.0625)
    loss.backward()
    assert loss.item() == 0.0 and metrics["neutral_frac"] == 1.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    # Just below the boundary both become active.
    loss, metrics = sgsd_gated_loss(*args, deadzone=0.0625 - 2**-10)
    assert metrics["helpful_frac"] == 0.5 and metrics["harmful_frac"] == 0.5


@pytest.mark.parametrize("case", ["all_masked", "no_teachers", "all_in_deadzone"])
def test_no_active_teacher_gives_zero_loss_and_exactly_zero_grads(case):
    s, q, mask, rewards, weights = make_batch(3, 4, 9, torch.float32, seed=5)
    deadzone = 0.05
    if case == "all_masked":
        mask = torch.zeros_like(mask)
    elif case == "no_teachers":
        weights = torch.zeros_like(weights)
    else:
        deadzone = 10.0  # |support| <= clip = 3 < deadzone
    loss, metrics = sgsd_gated_loss(s, q, mask, rewards, weights, deadzone=deadzone)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert all(math.isfinite(v) for v in metrics.values())


def test_teacher_logp_is_detached_and_masked_tokens_get_no_gradient():
    s, q, mask, rewards, weights = make_batch(4, 3, 11, torch.float32, seed=7)
    q.requires_grad_()
    loss, _ = sgsd_gated_loss(s, q, mask, rewards, weights)
    loss.backward()
    assert q.grad is None
    assert torch.equal(s.grad[~mask], torch.zeros_like(s.grad[~mask]))
    assert s.grad[mask].abs().sum() > 0


def test_integer_and_bool_rewards_and_weight_tolerance():
    s, q, mask, rewards, weights = make_batch(4, 3, 11, torch.float32, seed=8, absent=False)
    ref, _ = sgsd_gated_loss(s, q, mask, rewards, weights)
    for r in (rewards.long(), rewards.bool(), rewards * 0.7):  # any r > 0 is a success
        assert sgsd_gated_loss(s, q, mask, r, weights)[0].item() == ref.item()
    # Softmax rounding (well inside 1e-3) is accepted.
    sgsd_gated_loss(s, q, mask, rewards, weights * (1 + 5e-4))


def _valid():
    s, q, mask, rewards, weights = make_batch(2, 3, 5, torch.float32, seed=1)
    return dict(student_logp=s, teacher_logp=q, mask=mask, rewards=rewards, teacher_weights=weights)


def _with(**changes):
    args = _valid()
    kw = {key: changes.pop(key) for key in ("tau", "clip", "deadzone") if key in changes}
    for key, fn in changes.items():
        args[key] = fn(args[key])
    return args, kw


def _set(index, value):
    def fn(t):
        t = t.detach().clone()
        t[index] = value
        return t

    return fn


@pytest.mark.parametrize(
    "changes,error,match",
    [
        (dict(student_logp=lambda t: t[0]), ValueError, r"student_logp must have shape \[B, T\]"),
        (dict(student_logp=lambda t: t.long()), TypeError, "student_logp must be a floating tensor"),
        (dict(teacher_logp=lambda t: t[:, :, :4]), ValueError, r"teacher_logp must have shape \[B, K, T\]"),
        (dict(teacher_logp=lambda t: t[:, :0]), ValueError, r"at least one teacher \(K >= 1\)"),
        (dict(teacher_logp=lambda t: t.tolist()), TypeError, "teacher_logp must be a torch.Tensor"),
        (dict(mask=lambda t: t.float()), TypeError, "mask must be a bool tensor"),
        (dict(mask=lambda t: t[:, :4]), ValueError, r"mask must have shape \[B, T\]"),
        (dict(rewards=lambda t: t[:1]), ValueError, r"rewards must have shape \[B\]"),
        (dict(rewards=lambda t: [1.0, 0.0]), TypeError, "rewards must be a torch.Tensor"),
        (dict(teacher_weights=lambda t: t[:, :2]), ValueError, r"teacher_weights must have shape \[B, K\]"),
        (dict(teacher_weights=lambda t: t.bool()), TypeError, "teacher_weights must be a floating tensor"),
        (dict(teacher_logp=_set((0, 1, 2), float("nan"))), ValueError, "teacher_logp must be finite"),
        (dict(teacher_logp=_set((1, 0, 0), float("-inf"))), ValueError, "teacher_logp must be finite"),
        (dict(student_logp=_set((1, 3), float("inf"))), ValueError, "student_logp must be finite"),
        (dict(rewards=_set(0, float("nan"))), ValueError, "rewards must be finite"),
        (
            dict(teacher_weights=lambda t: torch.tensor([[1.5, -0.5, 0.0], [0.2, 0.3, 0.5]])),
            ValueError,
            "teacher_weights must be finite and >= 0",
        ),
        (dict(teacher_weights=lambda t: t * 1.002), ValueError, "must sum to 1"),
        (dict(teacher_weights=lambda t: torch.tensor([[0.2, 0.3, 0.0], [0.2, 0.3, 0.5]])), ValueError, "must sum to 1"),
        (dict(tau=0.0), ValueError, "tau must be a finite number > 0"),
        (dict(tau=float("nan")), ValueError, "tau must be"),
        (dict(clip=-1.0), ValueError, "clip must be a finite number > 0"),
        (dict(deadzone=-0.01), ValueError, "deadzone must be a finite number >= 0"),
        (dict(deadzone=True), ValueError, "deadzone must be"),
    ],
)
def test_bad_input_raises(changes, error, match):
    args, kw = _with(**changes)
    with pytest.raises(error, match=match):
        sgsd_gated_loss(**args, **kw)


def test_extra_metrics_are_returned_with_the_builtin_ones():
    args = _valid()
    loss, metrics = sgsd_gated_loss(**args, extra_metrics={"teacher_entropy_mean": torch.tensor(2.5, dtype=torch.float64)})
    assert metrics["teacher_entropy_mean"] == 2.5 and "helpful_frac" in metrics
    with pytest.raises(ValueError, match="other than the built-in ones, got 'loss'"):
        sgsd_gated_loss(**args, extra_metrics={"loss": torch.tensor(1.0)})
    with pytest.raises(TypeError, match=r"extra_metrics\['x'\] must be a one-element tensor"):
        sgsd_gated_loss(**args, extra_metrics={"x": torch.ones(2)})
    with pytest.raises(TypeError, match="extra_metrics must be a mapping"):
        sgsd_gated_loss(**args, extra_metrics=[torch.tensor(1.0)])


def test_empty_batch_raises():
    with pytest.raises(ValueError, match=r"B >= 1"):
        empty_mask = torch.zeros(0, 3, dtype=torch.bool)
        sgsd_gated_loss(torch.zeros(0, 3), torch.zeros(0, 2, 3), empty_mask, torch.zeros(0), torch.zeros(0, 2))
