"""Paired before/after statistics: hand-worked McNemar values, bootstrap vs the normal limit, clusters."""
import math

import numpy as np
import pytest

from sgsd_fast.train.stats import mcnemar_exact, paired_bootstrap_ci, paired_comparison


def _pairs(fixed: int, broken: int, both: int, neither: int) -> tuple[list[int], list[int]]:
    before = [0] * fixed + [1] * broken + [1] * both + [0] * neither
    after = [1] * fixed + [0] * broken + [1] * both + [0] * neither
    return before, after


@pytest.mark.parametrize("fixed, broken, p", [
    (5, 0, 2 / 32),                  # 2 * P[X <= 0], X ~ Bin(5, 1/2)
    (6, 1, 2 * (1 + 7) / 128),       # 2 * (C(7,0) + C(7,1)) / 2^7
    (3, 3, 1.0),                     # symmetric: capped at 1
    (0, 0, 1.0),                     # no discordant pairs
])
def test_mcnemar_hand_worked(fixed, broken, p):
    before, after = _pairs(fixed, broken, both=4, neither=7)
    f, b, pv = mcnemar_exact(before, after)
    assert (f, b) == (fixed, broken)
    assert pv == pytest.approx(p, rel=1e-12)


def test_mcnemar_issue_probe_numbers():
    # The issue's probe: 44 fixed / 20 broken gave exact p = 0.004.
    _, _, p = mcnemar_exact(*_pairs(44, 20, both=27, neither=109))
    assert p == pytest.approx(2 * sum(math.comb(64, i) for i in range(21)) / 2**64)
    assert round(p, 3) == 0.004


def test_bootstrap_hand_worked_three_problems():
    # diffs [1, 0, 0]: a resample's mean is k/3, k ~ Bin(3, 1/3); P[mean = 1] = 1/27 > 2.5 %, so the
    # 97.5 % quantile is 1, and P[mean = 0] = 8/27 > 2.5 %, so the 2.5 % quantile is 0.
    low, high = paired_bootstrap_ci([0, 0, 1], [1, 0, 1], resamples=20_000, seed=1)
    assert (low, high) == (0.0, 1.0)


def test_bootstrap_matches_normal_limit():
    # 400 problems, 60 fixed, 20 broken: delta = 0.1, per-problem var of the difference
    # = 80/400 - 0.1^2 = 0.19, so the 95 % interval is 0.1 +- 1.96 * sqrt(0.19 / 400) = [0.0573, 0.1427].
    before, after = _pairs(60, 20, both=100, neither=220)
    low, high = paired_bootstrap_ci(before, after, resamples=40_000, seed=0)
    half = 1.959964 * math.sqrt(0.19 / 400)
    assert low == pytest.approx(0.1 - half, abs=0.006)
    assert high == pytest.approx(0.1 + half, abs=0.006)


def test_cluster_bootstrap_does_not_count_rewordings_as_evidence():
    before, after = _pairs(30, 10, both=50, neither=110)
    width = np.subtract(*paired_bootstrap_ci(before, after, seed=0)[::-1])
    # Four rewordings of each computation, all scored alike: clustered, the interval is as wide as
    # with one copy each; treated as independent problems it shrinks by about sqrt(4) = 2.
    b4, a4 = [x for x in before for _ in range(4)], [x for x in after for _ in range(4)]
    clusters = [i for i in range(len(before)) for _ in range(4)]
    width_clustered = np.subtract(*paired_bootstrap_ci(b4, a4, clusters=clusters, seed=0)[::-1])
    width_naive = np.subtract(*paired_bootstrap_ci(b4, a4, seed=0)[::-1])
    assert width_clustered == pytest.approx(width, rel=0.08)
    assert width_naive == pytest.approx(width / 2, rel=0.08)


def test_paired_comparison_summary():
    before, after = _pairs(44, 20, both=27, neither=109)
    cmp = paired_comparison(before, after)
    assert (cmp.n, cmp.fixed, cmp.broken) == (200, 44, 20)
    assert cmp.before == pytest.approx(47 / 200) and cmp.after == pytest.approx(71 / 200)
    assert cmp.delta == pytest.approx(0.12)
    assert 0 < cmp.ci_low < 0.12 < cmp.ci_high and cmp.significant
    assert "CI above zero" in cmp.text()
    assert set(cmp.to_dict()) >= {"delta", "ci_low", "ci_high", "p_mcnemar"}
    same = paired_comparison(before, before)
    assert (same.ci_low, same.ci_high, same.significant) == (0.0, 0.0, False)


@pytest.mark.parametrize("kwargs, match", [
    ({"before": [], "after": []}, "before must be a non-empty"),
    ({"before": [0, 1], "after": [1]}, "same problems"),
    ({"before": [0, float("nan")], "after": [1, 1]}, "before must be finite"),
    ({"before": [0, 1], "after": [1, 1], "confidence": 1.0}, "confidence"),
    ({"before": [0, 1], "after": [1, 1], "resamples": 10}, "resamples"),
    ({"before": [0, 1], "after": [1, 1], "clusters": [1]}, "clusters"),
])
def test_bootstrap_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_ci(**kwargs)


def test_mcnemar_rejects_fractional_scores():
    with pytest.raises(ValueError, match="0/1 outcomes"):
        mcnemar_exact([0.5, 1.0], [1.0, 1.0])
