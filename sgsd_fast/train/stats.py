"""Paired comparison of two evaluations on the same problems: is the change in accuracy real?

Two evaluations of one model before and after training (or of two methods) on the same N
problems give paired 0/1 outcomes. The question is the change in mean accuracy and its
uncertainty; unpaired intervals would waste the pairing (most problems are solved by both or
by neither).

* `paired_bootstrap_ci`: percentile interval of mean(after - before) under resampling of
  problems with replacement. When problems share an underlying computation (the built-in task
  rewords the same arithmetic), resampling whole clusters keeps the interval honest: two
  rewordings of one computation are not independent evidence.
* `mcnemar_exact`: the exact two-sided McNemar test on the discordant pairs (fixed vs broken),
  a binomial test with p = 1/2 that needs no large-sample approximation.

`paired_comparison` returns both, as plain floats for JSON.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["PairedComparison", "mcnemar_exact", "paired_bootstrap_ci", "paired_comparison"]


def _outcomes(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-problem scores, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    return arr


def _check_pair(before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    b, a = _outcomes("before", before), _outcomes("after", after)
    if a.shape != b.shape:
        raise ValueError(f"before and after must score the same problems, got {b.size} and {a.size} scores")
    return b, a


def paired_bootstrap_ci(before: Sequence[float], after: Sequence[float], *,
                        clusters: Sequence[Hashable] | None = None, confidence: float = 0.95,
                        resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(after) - mean(before) over the same problems.

    Args:
        before, after: per-problem scores (0/1 correctness, or avg@k in [0, 1]) on the same problems.
        clusters: optional cluster id per problem (e.g. the underlying computation); whole clusters
            are resampled, each draw keeping all of a cluster's problems. None = one cluster each.
        confidence: two-sided coverage in (0, 1). resamples: bootstrap draws (>= 100). seed: RNG seed,
            so the interval printed in a summary is reproducible.

    Each draw resamples as many clusters as there are, with replacement, and takes the mean of
    the per-problem differences over the drawn problems (a ratio estimator when clusters differ
    in size, the standard cluster bootstrap).
    """
    b, a = _check_pair(before, after)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")
    diff = a - b
    if clusters is None:
        ids = np.arange(diff.size)
    else:
        if len(clusters) != diff.size:
            raise ValueError(f"clusters must have one id per problem ({diff.size}), got {len(clusters)}")
        _, ids = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    n_clusters = int(ids.max()) + 1
    sums = np.bincount(ids, weights=diff, minlength=n_clusters)
    sizes = np.bincount(ids, minlength=n_clusters).astype(np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(resamples, n_clusters))
    means = sums[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mcnemar_exact(before: Sequence[float], after: Sequence[float]) -> tuple[int, int, float]:
    """(fixed, broken, two-sided exact p) for paired 0/1 outcomes.

    fixed = problems wrong before and right after, broken = the reverse. Under "no change" each
    discordant problem is fixed or broken with probability 1/2, so p = min(1, 2 P[X <= min]) with
    X ~ Binomial(fixed + broken, 1/2); p = 1 when there are no discordant pairs.
    """
    b, a = _check_pair(before, after)
    if not (np.isin(b, (0.0, 1.0)).all() and np.isin(a, (0.0, 1.0)).all()):
        raise ValueError("mcnemar_exact needs 0/1 outcomes; use paired_bootstrap_ci for avg@k scores")
    fixed = int(((b == 0) & (a == 1)).sum())
    broken = int(((b == 1) & (a == 0)).sum())
    n = fixed + broken
    if n == 0:
        return fixed, broken, 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2.0**n
    return fixed, broken, min(1.0, 2.0 * tail)


@dataclass(frozen=True)
class PairedComparison:
    """Before/after accuracy on the same problems with a 95 % paired bootstrap CI and McNemar."""

    n: int
    clusters: int
    before: float
    after: float
    delta: float
    ci_low: float
    ci_high: float
    fixed: int
    broken: int
    p_mcnemar: float

    @property
    def significant(self) -> bool:
        """Whether the CI excludes zero (the difference is not within noise)."""
        return self.ci_low > 0.0 or self.ci_high < 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self) -> str:
        verdict = ("CI above zero: improved" if self.ci_low > 0 else "CI below zero: worse" if self.ci_high < 0
                   else "CI includes zero: within noise")
        return (f"accuracy {self.before:.3f} -> {self.after:.3f} ({self.delta:+.3f}, paired 95% CI "
                f"[{self.ci_low:+.3f}, {self.ci_high:+.3f}] over {self.n} problems / {self.clusters} clusters; "
                f"{self.fixed} fixed, {self.broken} broken, McNemar p = {self.p_mcnemar:.3g}; {verdict})")


def paired_comparison(before: Sequence[float], after: Sequence[float], *,
                      clusters: Sequence[Hashable] | None = None, resamples: int = 10_000,
                      seed: int = 0) -> PairedComparison:
    """`paired_bootstrap_ci` (95 %) and `mcnemar_exact` of two 0/1 evaluations of the same problems."""
    b, a = _check_pair(before, after)
    low, high = paired_bootstrap_ci(b, a, clusters=clusters, resamples=resamples, seed=seed)
    fixed, broken, p = mcnemar_exact(b, a)
    n_clusters = b.size if clusters is None else len({str(c) for c in clusters})
    return PairedComparison(n=int(b.size), clusters=n_clusters, before=float(b.mean()), after=float(a.mean()),
                            delta=float(a.mean() - b.mean()), ci_low=low, ci_high=high, fixed=fixed, broken=broken,
                            p_mcnemar=p)
