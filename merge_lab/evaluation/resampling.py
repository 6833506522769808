"""The resampling primitives every verdict shares: per-suite per-example scores, item-count
bootstrap draws, paired sign flips, the two-sided randomization p, Holm's correction, percentile
intervals and the verdict word (better / worse only when the corrected p < alpha and the interval
excludes 0). verdict.py builds the headline test on them, suite_tests.py the per-suite ones."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from merge_lab.errors import MergeLabError

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"
TOL = 1e-12  # a scale narrower than this is zero-width


class AsDict:
    def as_dict(self) -> dict:
        """Plain dicts and lists, for results.json and the report."""
        return asdict(self)


@dataclass(frozen=True)
class SuiteScores:
    """One suite: per candidate, per-example scores in the same item order for every candidate."""

    name: str
    objective: str
    higher_is_better: bool
    scores: Mapping[str, Sequence[float]]

    def array(self, candidate: str) -> np.ndarray:
        if candidate not in self.scores:
            raise MergeLabError(f"suite {self.name!r} has no scores for candidate {candidate!r} "
                                f"(it has {sorted(self.scores)}); check the candidate names")
        x = np.asarray(self.scores[candidate], dtype=np.float64)
        if x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
            raise MergeLabError(f"suite {self.name!r}, candidate {candidate!r}: scores must be a non-empty "
                                "list of finite numbers, one per example; re-run the evaluation")
        return x

    @property
    def n(self) -> int:
        sizes = {len(v) for v in self.scores.values()}
        if len(sizes) != 1:
            raise MergeLabError(f"suite {self.name!r}: candidates were scored on different numbers of items "
                                f"({sorted(sizes)}); every candidate must be scored on the same items")
        return sizes.pop()


def suites_from_results(results: Mapping) -> list[SuiteScores]:
    """Today's results.json shape (``suites`` info + ``per_example`` records) as SuiteScores."""
    return [SuiteScores(s, info["objective"], bool(info["higher_is_better"]),
                        {c: [float(r["score"]) for r in recs] for c, recs in results["per_example"][s].items()})
            for s, info in results["suites"].items()]


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order (controls the family-wise error)."""
    p = np.asarray(p, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty_like(p)
    out[order] = adj
    return out


def bootstrap_counts(rng: np.random.Generator, draws: int, n: int) -> np.ndarray:
    """Bootstrap draws as item counts (draws x n): a draw's mean of x is counts @ x / n."""
    idx = rng.integers(0, n, size=(draws, n)) + n * np.arange(draws)[:, None]
    return np.bincount(idx.ravel(), minlength=draws * n).reshape(draws, n).astype(np.float64)


def sign_flips(rng: np.random.Generator, draws: int, n: int) -> np.ndarray:
    """Random +-1 per draw and item: which of a pair's two scores is swapped."""
    return rng.integers(0, 2, size=(draws, n), dtype=np.int8).astype(np.float64) * 2.0 - 1.0


def randomization_p(null: np.ndarray, observed: float) -> float:
    """Two-sided randomization p; a null draw that cannot be computed (nan) counts as extreme."""
    extreme = ~(np.abs(null) < abs(observed) - TOL * max(1.0, abs(observed)))
    return float((1 + np.sum(extreme)) / (null.size + 1))


def verdict_word(p_holm: float, lo: float, hi: float, alpha: float = 0.05, higher_is_better: bool = True) -> str:
    """better / worse only when the corrected p < alpha and the interval excludes 0, else no difference."""
    if not (p_holm < alpha) or not (lo > 0 or hi < 0):
        return NO_DIFFERENCE
    return BETTER if (lo > 0) == higher_is_better else WORSE


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def percentile_interval(x: np.ndarray, alpha: float) -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if x.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(x, [alpha / 2, 1 - alpha / 2], method="inverted_cdf")  # no arithmetic on +-inf
    return float(lo), float(hi)
