"""Numbers with their uncertainty: bootstrap intervals, paired tests, the per-example oracle.

Every metric in a report is a mean of per-example scores, so one resampling scheme serves all:
a percentile bootstrap over examples (seeded, so reports reproduce), and for comparisons a paired
bootstrap of the per-example differences plus a sign-flip permutation p-value (exact pairing: the
same items, prompts and settings for every candidate).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci": [self.lo, self.hi], "n": self.n}


def bootstrap_ci(scores, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Estimate:
    """Mean and percentile bootstrap interval; the interval always contains the mean."""
    x = np.asarray(scores, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if x.size == 1 or n_boot <= 0:
        return Estimate(mean, mean, mean, int(x.size))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Estimate(mean, float(min(lo, mean)), float(max(hi, mean)), int(x.size))


@dataclass(frozen=True)
class Paired:
    diff: float  # mean(a - b)
    lo: float
    hi: float
    p: float  # two-sided, sign-flip permutation
    n: int

    def as_dict(self) -> dict:
        return {"diff": self.diff, "ci": [self.lo, self.hi], "p": self.p, "n": self.n}


def paired_test(a, b, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> Paired:
    """Is a's mean different from b's on the same examples? Bootstrap CI of the mean difference and
    a sign-flip permutation p-value (exact null for paired data, no normality assumption)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same examples ({a.shape} vs {b.shape})")
    d = a - b
    est = bootstrap_ci(d, n_boot, seed, alpha)
    if d.size == 0 or not np.any(d):
        return Paired(est.value, est.lo, est.hi, 1.0, int(d.size))
    rng = np.random.default_rng(seed + 1)
    n_perm = max(n_boot, 1000)
    signs = rng.choice([-1.0, 1.0], size=(n_perm, d.size))
    null = np.abs((signs * d).mean(axis=1))
    p = (1 + np.sum(null >= abs(d.mean()) - 1e-12)) / (n_perm + 1)
    return Paired(est.value, est.lo, est.hi, float(p), int(d.size))


def oracle(per_candidate: dict[str, list[float]], higher_is_better: bool = True) -> list[float]:
    """Per example, the best score any candidate reached: an upper bound for routing/selection."""
    arr = np.asarray(list(per_candidate.values()), dtype=np.float64)
    if arr.size == 0:
        return []
    return (arr.max(axis=0) if higher_is_better else arr.min(axis=0)).tolist()
