"""The vectorized row sweeps of the CPU kernels (sgsd_fast/csrc/row_math.h) through the ops: the
polynomial exp over its whole range, underflow, NaN propagation, and the JSD's log1p.

Tolerances: exp_f32 is documented to <= 2 ulp relative (2 * 2^-24 ~ 1.2e-7); a stats row
[0, x, ..., x] (31 copies of x, so the 16-lane path runs) gives log(1 + 31 e^x), whose error from
the exps is <= 1.2e-7 * 31 e^x / (1 + 31 e^x); the float lane partials (the one holding the 1
rounds 1 + e^x) add at most 2^-24 of the sum, i.e. 2^-24 absolute on its log (well inside the
gamma(V) sum error test_linear_logprobs.py's bounds allow); the result is rounded to float once.
"""
from __future__ import annotations

import math

import pytest
import torch

from sgsd_fast.ops import linear_divergence, linear_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")
ops = pytest.importorskip("sgsd_fast._C") and torch.ops.sgsd_fast


def test_exp_over_its_range_via_row_stats():
    x = torch.linspace(-87.0, 0.0, 20001, dtype=torch.float64)
    rows = torch.cat([torch.zeros(x.numel(), 1, dtype=torch.float64), x[:, None].expand(-1, 31)], dim=1)
    stats = ops.linear_divergence_stats(rows.float().contiguous()).double()
    x32 = x.float().double()  # the inputs the kernel saw
    truth = torch.log1p(31 * torch.exp(x32))
    share = 31 * torch.exp(x32) / (1 + 31 * torch.exp(x32))
    tol = 1.2e-7 * share + 2**-24 + 2**-24 * truth.abs()
    assert torch.all(stats[:, 0] == 0)
    err = (stats[:, 1] - truth).abs()
    assert torch.all(err <= tol), f"worst excess {(err - tol).max().item():.3e}"
    # A broken polynomial (e.g. one coefficient off by 1e-3) is caught: the bound is not loose.
    assert (1e-3 * share).max() > 10 * tol.max()


def test_underflow_and_nan():
    # Logit spread ~200: most exp(z - m) underflow (exp_f32 returns 0 below -87.3, libm a subnormal),
    # which moves no log-prob by more than fp32 rounding.
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(300, 16, generator=g, dtype=torch.float64) * 50
    targets = torch.randint(0, 300, (20,), generator=g)
    truth = torch.log_softmax(hidden @ weight.T, dim=1).gather(1, targets[:, None]).squeeze(1)
    logp = linear_logprobs(hidden.float(), weight.float(), targets, backend="cpu").double()
    z_abs = (hidden.abs() @ weight.abs().T).max(dim=1).values
    assert torch.all((logp - truth).abs() <= 4 * 2**-24 * 20 * z_abs)  # dot-product rounding of |z| ~ 1e3
    # NaN in one row: that row's outputs are NaN (never a silently finite number), the others are not.
    bad = hidden.float().clone()
    bad[3, 5] = math.nan
    h = bad.clone().requires_grad_(True)
    logp = linear_logprobs(h, weight.float(), targets, backend="cpu")  # eager dX path (frozen weight)
    logp.sum().backward()
    assert torch.isnan(logp[3]) and torch.isfinite(logp[torch.arange(20) != 3]).all()
    assert torch.isnan(h.grad[3]).any()
    for kind in ("fkl", "rkl", "jsd"):
        loss = linear_divergence(bad, weight.float(), bad[None].clone(), kind=kind, reduction="none", backend="cpu")
        assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(20) != 3]).all(), kind


def test_jsd_log1p_path_against_float64():
    # Teacher and student far apart, so lo - hi spans [-80, 0] and the log1p(exp(lo - hi)) pass
    # sees its whole input range; the loss against float64 within a relative 1e-5 (the bound of
    # tests/test_linear_divergence.py is finer per entry; this is the smoke check of the new pass).
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(32, 24, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 32, 24, generator=g, dtype=torch.float64) * 3
    weight = torch.randn(500, 24, generator=g, dtype=torch.float64) * 2
    ours = linear_divergence(hidden.float(), weight.float(), teacher.float(), kind="jsd", beta=0.3,
                             reduction="none", backend="cpu").double()
    truth = linear_divergence(hidden, weight, teacher, kind="jsd", beta=0.3, reduction="none", backend="reference")
    assert torch.allclose(ours, truth, rtol=1e-5, atol=1e-6)
