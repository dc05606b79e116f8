"""Sampled-token reverse KL, the two top-k divergences and GRPO advantages against float64 oracles
written from SPEC §6 with explicit per-token loops (full logits materialized in the oracle)."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from sgsd_fast.losses import grpo_advantages, grpo_loss, sampled_token_rkl
from sgsd_fast.ops import student_topk_tail_divergence, teacher_topk_divergence

# ---------------------------------------------------------------- sampled-token reverse KL


def rkl_oracle(s, q, mask):
    valid = [(i, j) for i in range(len(s)) for j in range(len(s[0])) if mask[i][j]]
    n = max(1, len(valid))
    loss = -sum((q[i][j] - s[i][j]) * s[i][j] for i, j in valid) / n
    grad = [[-(q[i][j] - s[i][j]) / n if mask[i][j] else 0.0 for j in range(len(s[0]))] for i in range(len(s))]
    k1 = sum(s[i][j] - q[i][j] for i, j in valid) / n
    k3 = sum(math.exp(q[i][j] - s[i][j]) - (q[i][j] - s[i][j]) - 1 for i, j in valid) / n
    return loss, grad, k1, k3, len(valid)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_sampled_token_rkl_matches_oracle(dtype, tol):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(4, 13, generator=g, dtype=torch.float64) * 3 - 8).to(dtype).requires_grad_()
    q = (s.detach().double() + torch.randn(4, 13, generator=g, dtype=torch.float64) * 1.5).to(dtype)
    q.requires_grad_()
    mask = torch.rand(4, 13, generator=g) > 0.3
    mask[2] = False  # rows of very different length: the pooled mean weighs tokens, not rollouts
    loss, metrics = sampled_token_rkl(s, q, mask)
    loss.backward()
    want, grad, k1, k3, count = rkl_oracle(s.detach().double().tolist(), q.detach().double().tolist(), mask.tolist())
    # fp32: ~40 products of size ~50 summed -> absolute rounding ~1e-5 on a loss of size ~10.
    assert loss.item() == pytest.approx(want, abs=tol * 10)
    torch.testing.assert_close(s.grad.double(), torch.tensor(grad, dtype=torch.float64), atol=tol, rtol=0)
    assert q.grad is None
    assert metrics["reverse_kl_mean"] == pytest.approx(k1, abs=tol)
    assert metrics["reverse_kl_k3_mean"] == pytest.approx(k3, abs=tol * 10)
    assert metrics["valid_tokens"] == count


def test_sampled_token_rkl_all_masked_is_zero_with_zero_grad():
    s = (torch.randn(2, 5) * 4 - 3).requires_grad_()
    loss, metrics = sampled_token_rkl(s, torch.randn(2, 5) * 4 - 3, torch.zeros(2, 5, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s)) and metrics["valid_tokens"] == 0


ALL = torch.ones(2, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((torch.zeros(2, 5), torch.zeros(2, 4), ALL), ValueError, r"teacher_logp must have shape \[B, T\]"),
        ((torch.zeros(5), torch.zeros(5), ALL[0]), ValueError, r"student_logp must have shape \[B, T\]"),
        ((torch.zeros(2, 5), torch.zeros(2, 5), torch.ones(2, 5)), TypeError, "mask must be a bool tensor"),
        ((torch.zeros(2, 5), torch.zeros(2, 5), ALL[:, :4]), ValueError, r"mask must have shape \[B, T\]"),
        ((torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5), ALL), TypeError, "floating"),
        ((torch.zeros(2, 5), torch.full((2, 5), float("nan")), ALL), ValueError, "teacher_logp must be finite"),
        ((torch.full((2, 5), -float("inf")), torch.zeros(2, 5), ALL), ValueError, "student_logp must be finite"),
    ],
)
def test_sampled_token_rkl_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        sampled_token_rkl(*args)


# ---------------------------------------------------------------- top-k divergences

N, H, V = 19, 12, 131


def hidden_problem(seed, dtype=torch.float64):
    """Logits with std ~6 and a large shared offset; the teacher is a perturbed student."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    weight[:, 0] += 4.0
    student = torch.randn(N, H, generator=g, dtype=torch.float64) * 1.7
    student[:, 0] += 5.0
    teacher = student + torch.randn(N, H, generator=g, dtype=torch.float64) * 0.8
    ignore = torch.rand(N, generator=g) < 0.25
    return student.to(dtype), weight.to(dtype), teacher.to(dtype), ignore


def divergence(p_log, q_log, kind, beta):
    """D between teacher log-probs p_log and student log-probs q_log (1-D), GKD convention, one summand per entry."""
    p, q = p_log.exp(), q_log.exp()
    if kind == "fkl" or (kind == "jsd" and beta == 0.0):
        return p * (p_log - q_log)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0):
        return q * (q_log - p_log)
    log_m = torch.log(beta * p + (1 - beta) * q)
    return beta * p * (p_log - log_m) + (1 - beta) * q * (q_log - log_m)


def topk_oracle(
    student, weight, teacher, ignore, *, k, kind, beta, temperature, mode, teacher_head=None, entry_clip=None
):
    """Float64, one token at a time, full logits; returns the loss tensor (differentiable)."""
    tw = (weight if teacher_head is None else teacher_head).detach().double()
    total, count, margins = torch.zeros((), dtype=torch.float64), 0, []
    for i in range(N):
        if ignore is not None and ignore[i]:
            continue
        count += 1
        zs = weight.double() @ student[i].double() / temperature
        zt = tw @ teacher[i].detach().double() / temperature
        chooser = zt if mode == "teacher" else zs.detach()
        order = torch.argsort(chooser, descending=True)
        margins.append(float(chooser[order[k - 1]] - chooser[order[k]]) if k < V else 1.0)
        ids = order[:k]
        if mode == "teacher":
            q_log = zs[ids] - torch.logsumexp(zs[ids], 0)
            p_log = zt[ids] - torch.logsumexp(zt[ids], 0)
        else:
            q_full, p_full = zs - torch.logsumexp(zs, 0), zt - torch.logsumexp(zt, 0)
            q_top, p_top = q_full[ids], p_full[ids]
            q_log = torch.cat([q_top, torch.log1p(-q_top.exp().sum())[None]])
            p_log = torch.cat([p_top, torch.log1p(-p_top.exp().sum())[None]])
        entries = divergence(p_log, q_log, kind, beta)
        if entry_clip is not None:
            entries = entries.clamp(max=entry_clip)
        total = total + entries.sum()
    # The top-k support must not depend on rounding (fp32 vs float64 logits).
    assert min(margins, default=1.0) > 1e-4
    return total / max(1, count)


TOPK_CASES = [
    ("teacher", dict(k=7, kind="fkl", beta=0.0)),
    ("teacher", dict(k=7, kind="rkl", beta=0.5)),
    ("teacher", dict(k=7, kind="jsd", beta=0.3, entry_clip=0.05)),
    ("teacher", dict(k=V, kind="jsd", beta=0.5)),  # full support: the plain full-vocab divergence
    ("student", dict(k=9, alpha=0.5)),
    ("student", dict(k=9, alpha=0.0)),
    ("student", dict(k=1, alpha=1.0)),
]


def _call(mode, student, weight, teacher, ignore, opts, **kw):
    if mode == "teacher":
        return teacher_topk_divergence(student, weight, teacher, mask=~ignore, **opts, **kw)
    return student_topk_tail_divergence(student, weight, teacher, mask=~ignore, **opts, **kw)


def _oracle_opts(mode, opts):
    if mode == "teacher":
        return dict(opts)
    return dict(k=opts["k"], kind="jsd", beta=opts["alpha"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode,opts", TOPK_CASES)
def test_topk_matches_full_logit_oracle(mode, opts, dtype):
    student, weight, teacher, ignore = hidden_problem(seed=TOPK_CASES.index((mode, opts)), dtype=dtype)
    xs, w = student.clone().requires_grad_(), weight.clone().requires_grad_()
    xt = teacher.clone().requires_grad_()  # must get no gradient
    loss, metrics = _call(mode, xs, w, xt, ignore, opts, temperature=1.1, chunk_size=6)
    loss.backward()
    xs64, w64 = student.double().requires_grad_(), weight.double().requires_grad_()
    want = topk_oracle(xs64, w64, teacher, ignore, temperature=1.1, mode=mode, **_oracle_opts(mode, opts))
    want.backward()
    assert xt.grad is None and metrics["valid_tokens"] == int((~ignore).sum())
    # float64: same math, different summation order. fp32: logits ~30 in size, relative 1e-7 each.
    rtol, atol = (1e-9, 1e-12) if dtype == torch.float64 else (1e-4, 1e-5)
    assert loss.item() == pytest.approx(want.item(), rel=rtol, abs=atol)
    for got, ref in ((xs.grad, xs64.grad), (w.grad, w64.grad)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol * max(1.0, ref.abs().max().item()))
    assert torch.equal(xs.grad[ignore], torch.zeros_like(xs.grad[ignore]))
    assert 0 < metrics["student_mass"] <= 1 + 1e-6 and 0 < metrics["teacher_mass"] <= 1 + 1e-6


@pytest.mark.parametrize("mode,opts", [TOPK_CASES[2], TOPK_CASES[4]])
def test_topk_chunking_separate_teacher_head_and_bf16(mode, opts):
    student, weight, teacher, ignore = hidden_problem(seed=3, dtype=torch.float32)
    teacher_head = weight + 0.3 * torch.randn(V, H, generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (1, 5, N):  # results must not depend on the chunking
        xs, w = student.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, _ = _call(mode, xs, w, teacher, ignore, opts, teacher_head=teacher_head, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), xs.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    xs64, w64 = student.double().requires_grad_(), weight.double().requires_grad_()
    oracle_opts = dict(temperature=1.0, mode=mode, **_oracle_opts(mode, opts))
    want = topk_oracle(xs64, w64, teacher, ignore, teacher_head=teacher_head, **oracle_opts)
    assert results[0][0].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)

    # bf16 inputs: fp32 math on the bf16 values; the gradients are rounded to bf16 once.
    sb, wb, tb = (x.bfloat16() for x in (student, weight, teacher))
    xs, w = sb.clone().requires_grad_(), wb.clone().requires_grad_()
    loss, _ = _call(mode, xs, w, tb, ignore, opts, teacher_head=teacher_head.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and xs.grad.dtype == torch.bfloat16
    xs64, w64 = sb.double().requires_grad_(), wb.double().requires_grad_()
    want = topk_oracle(xs64, w64, tb, ignore, teacher_head=teacher_head.bfloat16(), **oracle_opts)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    for got, ref in ((xs.grad, xs64.grad), (w.grad, w64.grad)):
        err = (got.double() - ref).abs()
        assert (err <= ref.abs() * 2.0**-8 + 1e-5 * ref.abs().max()).all()


@pytest.mark.parametrize("mode,opts", [TOPK_CASES[0], TOPK_CASES[4]])
def test_topk_all_ignored_gives_zero_loss_and_zero_grads(mode, opts):
    student, weight, teacher, _ = hidden_problem(seed=1, dtype=torch.float32)
    xs, w = student.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, metrics = _call(mode, xs, w, teacher, torch.ones(N, dtype=torch.bool), opts)
    loss.backward()
    assert loss.item() == 0.0 and metrics["valid_tokens"] == 0
    assert torch.equal(xs.grad, torch.zeros_like(xs)) and torch.equal(w.grad, torch.zeros_like(w))


def test_topk_backward_scales_with_upstream_gradient():
    student, weight, teacher, ignore = hidden_problem(seed=2, dtype=torch.float64)
    grads = []
    for factor in (1.0, -2.5):
        xs = student.clone().requires_grad_()
        loss, _ = teacher_topk_divergence(xs, weight, teacher, k=5, mask=~ignore)
        (factor * loss).backward()
        grads.append(xs.grad / factor)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=0)


tail_divergence = student_topk_tail_divergence


@pytest.mark.parametrize(
    "fn,kw,error,match",
    [
        (teacher_topk_divergence, dict(k=0), ValueError, r"k must be an integer in \[1, V\]"),
        (teacher_topk_divergence, dict(k=V + 1), ValueError, r"k must be an integer in \[1, V\]"),
        (tail_divergence, dict(k=V), ValueError, r"k must be an integer in \[1, V - 1"),
        (teacher_topk_divergence, dict(kind="kl"), ValueError, "kind must be"),
        (teacher_topk_divergence, dict(beta=1.5), ValueError, r"beta must lie in \[0, 1\]"),
        (tail_divergence, dict(alpha=-0.1), ValueError, "alpha must be"),
        (teacher_topk_divergence, dict(temperature=0.0), ValueError, "temperature must be"),
        (teacher_topk_divergence, dict(chunk_size=0), ValueError, "chunk_size must be a positive integer"),
        (teacher_topk_divergence, dict(mask=torch.zeros(N)), TypeError, "mask must be a bool tensor"),
        (teacher_topk_divergence, dict(mask=torch.zeros(N - 1).bool()), ValueError, r"mask .*\[N\]"),
        (teacher_topk_divergence, dict(teacher_head=torch.zeros(V, H + 1)), ValueError, r"teacher_head .*\[V, H\]"),
        (tail_divergence, dict(teacher_hidden=torch.zeros(N + 1, H)), ValueError, r"teacher_hidden .*\[N, H\]"),
        (tail_divergence, dict(weight=torch.zeros(V, H + 1)), ValueError, r"weight must have shape \[V, H\]"),
        (tail_divergence, dict(student_hidden=torch.zeros(N, H).long()), TypeError, "must be a floating tensor"),
    ],
)
def test_topk_bad_input(fn, kw, error, match):
    student, weight, teacher, _ = hidden_problem(seed=1, dtype=torch.float32)
    args = dict(student_hidden=student, weight=weight, teacher_hidden=teacher)
    args.update({key: kw.pop(key) for key in list(kw) if key in args})
    with pytest.raises(error, match=match):
        fn(**args, **kw)


# ---------------------------------------------------------------- GRPO


def test_grpo_advantages_match_oracle():
    g = torch.Generator().manual_seed(0)
    binary = (torch.rand(12, generator=g) > 0.5).float()
    rewards = torch.cat([binary, torch.randn(4, generator=g) * 5 + 100, torch.ones(4)])
    got = grpo_advantages(rewards, 4)
    want = []
    for start in range(0, 20, 4):
        group = rewards[start : start + 4].double().tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # Bessel-corrected
        want.extend((r - mean) / (std + 1e-4) for r in group)  # SPEC §6: std + 1e-4
    # fp32 rewards around 100: subtraction keeps ~1e-5 absolute, divided by std ~5.
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-6)
    assert torch.equal(got[-4:], torch.zeros(4))  # equal rewards: no signal, no NaN
    assert got.shape == rewards.shape and got.dtype == torch.float32


def test_grpo_advantages_without_std_scaling_are_centered_rewards():
    """scale=False is Dr. GRPO: the group-mean baseline only."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])
    got = grpo_advantages(rewards, 3, scale=False)
    torch.testing.assert_close(got, torch.tensor([2 / 3, -1 / 3, -1 / 3, -4 / 3, 2 / 3, 2 / 3]))


def test_grpo_loss_matches_oracle_and_equal_reward_rollouts_get_no_gradient():
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(4, 7, generator=g, dtype=torch.float64) - 3).requires_grad_()
    mask = torch.rand(4, 7, generator=g) > 0.3
    adv = torch.tensor([1.5, -0.5, 0.0, 0.0], dtype=torch.float64)  # rows 2, 3: an equal-reward group
    loss, metrics = grpo_loss(s, adv, mask)
    loss.backward()
    valid = [(i, j) for i in range(4) for j in range(7) if mask[i, j]]
    want = -sum(adv[i].item() * s[i, j].item() for i, j in valid) / len(valid)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    grad = torch.tensor([[-adv[i].item() / len(valid) if mask[i, j] else 0.0 for j in range(7)] for i in range(4)],
                        dtype=torch.float64)
    torch.testing.assert_close(s.grad, grad, rtol=1e-12, atol=0)
    assert torch.equal(s.grad[2:], torch.zeros_like(s.grad[2:]))
    assert metrics["zero_advantage_frac"] == 0.5 and metrics["valid_tokens"] == len(valid)


@pytest.mark.parametrize(
    "rewards,group_size,error,match",
    [
        (torch.ones(6), 4, ValueError, "num_groups >= 1 and group_size=4"),
        (torch.ones(0), 2, ValueError, "num_groups >= 1"),
        (torch.ones(6), 1, ValueError, "group_size must be an integer >= 2"),
        (torch.ones(6), 2.0, ValueError, "group_size must be an integer"),
        (torch.ones(2, 3), 3, ValueError, r"rewards must have shape \[num_groups \* group_size\]"),
        ([1.0, 0.0], 2, TypeError, "rewards must be a torch.Tensor"),
        (torch.tensor([1.0, float("nan")]), 2, ValueError, "rewards must be finite"),
    ],
)
def test_grpo_bad_input(rewards, group_size, error, match):
    with pytest.raises(error, match=match):
        grpo_advantages(rewards, group_size)
