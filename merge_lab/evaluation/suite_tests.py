"""Per-suite tests and warnings: each suite's paired difference of means with its interval, p and
verdict (Holm over the family), and the flag for a suite that cannot tell its candidates apart."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.resampling import (
    NO_DIFFERENCE,
    AsDict,
    SuiteScores,
    bootstrap_counts,
    holm,
    p_text,
    percentile_interval,
    randomization_p,
    sign_flips,
    verdict_word,
)


@dataclass(frozen=True)
class SuiteComparison(AsDict):
    """One suite, candidate against one comparator: raw mean difference (suite units), test, verdict."""

    suite: str
    objective: str
    higher_is_better: bool
    candidate: str
    against: str
    diff: float  # mean(candidate - against), in the suite's own units
    ci: tuple[float, float]
    p: float
    p_holm: float
    verdict: str
    n: int
    tests: int  # size of the Holm family

    def sentence(self) -> str:
        d, (lo, hi) = self.diff, self.ci
        lower = "" if self.higher_is_better else "lower is better; "
        tail = f"({lower}{p_text(self.p_holm)}, Holm-corrected over {self.tests}, n = {self.n})"
        if self.verdict == NO_DIFFERENCE:
            return f"{self.suite}: no significant difference from {self.against}: {d:+.2f} [{lo:.2f}, {hi:.2f}] {tail}"
        return (f"{self.suite}: {self.candidate} is {self.verdict} than {self.against} by {d:+.2f} "
                f"[{lo:.2f}, {hi:.2f}] {tail}")


def compare_suites(suites: Sequence[SuiteScores], candidate: str, against: str | Sequence[str], alpha: float = 0.05,
                   n_boot: int = 1000, n_perm: int = 2000, seed: int = 0) -> list[SuiteComparison]:
    """Per suite, paired bootstrap interval and sign-flip p of mean(candidate - comparator), Holm over
    every (suite, comparator) test in this call; the verdict word respects higher_is_better."""
    against = [against] if isinstance(against, str) else list(against)
    if not against:
        raise MergeLabError(f"nothing to compare {candidate!r} against: name at least one other candidate")
    rng = np.random.default_rng(seed)
    rows = []
    for s in suites:
        n = s.n  # checks every candidate was scored on the same items
        d = np.stack([s.array(candidate) - s.array(c) for c in against], axis=1)
        boot, null = bootstrap_counts(rng, n_boot, n) @ d / n, sign_flips(rng, n_perm, n) @ d / n
        for j, c in enumerate(against):
            obs = float(d[:, j].mean())
            rows.append((s, c, obs, percentile_interval(boot[:, j], alpha), randomization_p(null[:, j], obs)))
    adj = holm([r[4] for r in rows])
    return [SuiteComparison(s.name, s.objective, s.higher_is_better, candidate, c, obs, ci, p, float(ph),
                            verdict_word(float(ph), ci[0], ci[1], alpha, s.higher_is_better), s.n, len(rows))
            for (s, c, obs, ci, p), ph in zip(rows, adj)]


def as_family(comparisons: Sequence[SuiteComparison], alpha: float = 0.05) -> list[SuiteComparison]:
    """Holm over suite comparisons made one call at a time (e.g. each suite's best against its
    runner-up), so the family is the whole set; verdict words follow the corrected p."""
    if not comparisons:
        return []
    adj = holm([c.p for c in comparisons])
    return [replace(c, p_holm=float(ph), verdict=verdict_word(float(ph), c.ci[0], c.ci[1], alpha, c.higher_is_better),
                    tests=len(comparisons)) for c, ph in zip(comparisons, adj)]


def render_suites(comparisons: Sequence[SuiteComparison]) -> list[str]:
    """One sentence per suite comparison."""
    return [c.sentence() for c in comparisons]


def non_separating(scores: Mapping[str, Sequence[float]], item_share: float = 0.95,
                   candidate_share: float = 0.9) -> str | None:
    """A reason string when a suite cannot tell these candidates apart, else None: nearly every
    candidate (>= candidate_share) gives the same per-example scores, or all candidates give the
    same score on >= item_share of the items."""
    names = list(scores)
    if len(names) < 2:
        return None
    x = np.asarray([np.asarray(scores[c], dtype=np.float64) for c in names])
    _, group = np.unique(x, axis=0, return_counts=True)
    k, top = len(names), int(group.max())
    if top == k:
        return f"does not separate these candidates: all {k} candidates give identical per-example scores"
    if top >= max(2, math.ceil(candidate_share * k - 1e-9)):
        return f"does not separate these candidates: {top} of {k} candidates give identical per-example scores"
    same = int(np.sum(np.all(x == x[0], axis=0)))
    if same >= item_share * x.shape[1]:
        return (f"does not separate these candidates: all {k} candidates give the same score on {same} of "
                f"{x.shape[1]} items ({same / x.shape[1]:.0%})")
    return None


def non_separating_suites(suites: Sequence[SuiteScores], item_share: float = 0.95,
                          candidate_share: float = 0.9) -> dict[str, str]:
    """Suite name -> reason, for every suite that does not separate its candidates."""
    out = {s.name: non_separating(s.scores, item_share, candidate_share) for s in suites}
    return {k: v for k, v in out.items() if v is not None}
