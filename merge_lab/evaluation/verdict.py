"""The statistics behind a verdict a reviewer would sign: a headline score on a declared scale, a
paired test of each comparison, Holm correction, and warnings for suites that cannot decide.

Scale. Per suite, a candidate's mean is placed on a scale fixed by declared references, never by
the other candidates in the file: ``"source"`` puts the base at 0 and the best source model (by
that suite's mean, respecting higher_is_better; re-chosen in every resample) at 1; ``"z"`` measures (mean - base mean) in units
of the base's per-item standard deviation. Both are oriented so that higher is better. Suite
scores are averaged per objective, then over objectives. A suite whose scale has zero width is
left out and reported, never divided by; a resample in which a scale collapses to zero width
counts as an infinitely large gap in the direction of the gap (reported as ``unstable``).

Test. Items are resampled within each suite (the same items for every candidate, including the
references, so the scale's own uncertainty is in the interval): a percentile bootstrap interval
of the difference. The p-value is a paired randomization test within suites: each item's two
scores are swapped at random and the whole statistic, scale included, is recomputed; under "the
two candidates are exchangeable on every item" this is exact (up to Monte Carlo error), and a
pair with identical scores gets p = 1. p-values are Holm-corrected over the comparisons made
together; a verdict says better/worse only when the corrected p < alpha and the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.resampling import (
    NO_DIFFERENCE,
    TOL,
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

SCALES = ("source", "z")


@dataclass
class _Plan:
    """Which suites place candidates on the scale, with what weight, and why others were left out."""

    scale: str
    base: str
    sources: tuple[str, ...]
    used: list[SuiteScores]
    weight: dict[str, float]
    reference: dict[str, str]
    excluded: dict[str, str]
    notes: list[str]

    def _terms(self, m: Mapping[str, Mapping[str, np.ndarray]], q: Mapping[str, np.ndarray]):
        """Per used suite: orientation, base mean and 1 / scale width (inf where the width is zero)."""
        for s in self.used:
            ms, sign = m[s.name], 1.0 if s.higher_is_better else -1.0
            base = ms[self.base]
            if self.scale == "source":
                top = np.max(np.stack(np.broadcast_arrays(*[sign * ms[c] for c in self.sources])), axis=0)
                width = np.abs(top - sign * base)
            else:
                width = np.sqrt(np.maximum(q[s.name] - base**2, 0.0))
            with np.errstate(divide="ignore"):
                yield s, sign, base, np.where(width > TOL, 1.0 / width, np.inf)

    def headline(self, m: Mapping[str, Mapping[str, np.ndarray]], q: Mapping[str, np.ndarray],
                 wanted: Sequence[str]) -> dict[str, np.ndarray]:
        """Headline score of each wanted candidate from per-suite means m[suite][name] and the
        base's second moment q[suite] (arrays broadcast: a point estimate or one value per draw)."""
        total: dict[str, np.ndarray] = {c: np.zeros(()) for c in wanted}
        for s, sign, base, inv in self._terms(m, q):
            for c in wanted:
                with np.errstate(invalid="ignore"):  # inf - inf: two collapsed suites disagree -> nan
                    total[c] = total[c] + self.weight[s.name] * _scaled(sign * (m[s.name][c] - base), inv)
        return total

    def diff(self, m: Mapping[str, Mapping[str, np.ndarray]], q: Mapping[str, np.ndarray], a: str, b: str):
        """Headline score of a minus b (the base cancels); where a scale collapses, +-inf by the sign
        of the gap (nan only if two collapsed suites disagree)."""
        total = np.zeros(())
        for s, sign, _, inv in self._terms(m, q):
            with np.errstate(invalid="ignore"):
                total = total + self.weight[s.name] * _scaled(sign * (m[s.name][a] - m[s.name][b]), inv)
        return total

    def collapsed(self, m: Mapping[str, Mapping[str, np.ndarray]], q: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per draw: did any suite's scale have zero width?"""
        return np.any(np.stack(np.broadcast_arrays(*[np.isinf(t[3]) for t in self._terms(m, q)])), axis=0)


def _scaled(gap: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """gap / width with a zero gap on a zero-width scale counted as 0, not nan."""
    with np.errstate(invalid="ignore"):
        return np.where(gap == 0, 0.0, gap * inv)


def _moments(suites: Sequence[SuiteScores], names: Sequence[str], base: str):
    m = {s.name: {c: np.asarray(s.array(c).mean()) for c in names} for s in suites}
    q = {s.name: np.asarray((s.array(base) ** 2).mean()) for s in suites}
    return m, q


def _plan(suites: Sequence[SuiteScores], base: str, sources: Sequence[str], scale: str,
          objectives: Sequence[str] | None) -> _Plan:
    if scale not in SCALES:
        raise MergeLabError(f"unknown headline scale {scale!r}; choose one of {list(SCALES)}")
    sources = tuple(dict.fromkeys(sources))
    if scale == "source" and not sources:
        raise MergeLabError("the 'source' scale needs the source models: pass sources=[...] or use scale='z'")
    picked = [s for s in suites if objectives is None or s.objective in objectives]
    if not picked:
        raise MergeLabError(f"no suite has an objective in {list(objectives or [])}; "
                            f"available: {sorted({s.objective for s in suites})}")
    m, q = _moments(picked, [base, *sources], base)
    plan = _Plan(scale, base, sources, [], {}, {}, {}, [])
    for s in picked:
        _ = s.n
        ms, sign = m[s.name], 1.0 if s.higher_is_better else -1.0
        if scale == "source":
            ref = max(sources, key=lambda c: sign * float(ms[c]))
            width = abs(sign * float(ms[ref] - ms[base]))
            if width > TOL and sign * float(ms[ref] - ms[base]) < 0:
                plan.notes.append(f"{s.name}: the base scores above every source; the best source ({ref}) sits at -1")
            se = float(np.std(s.array(ref) - s.array(base), ddof=1)) / math.sqrt(s.n) if s.n > 1 else 0.0
            if width > TOL and width < 2 * se:
                plan.notes.append(f"{s.name}: the scale is not resolved (best source - base = {width:.3f}, "
                                  f"s.e. {se:.3f}); scores on this suite are noisy")
            why = f"the best source ({ref}) scores the same as the base ({base}): a zero-width scale"
        else:
            ref, width = base, math.sqrt(max(float(q[s.name] - ms[base] ** 2), 0.0))
            why = f"the base ({base}) gives the same score on every item: zero spread"
        plan.reference[s.name] = ref
        if width <= TOL:
            plan.excluded[s.name] = f"{why}; left out of the headline"
        else:
            plan.used.append(s)
    if not plan.used:
        raise MergeLabError("no suite can place candidates on the scale (" + "; ".join(
            f"{k}: {v}" for k, v in plan.excluded.items()) + "); declare other sources or use scale='z'")
    per_obj: dict[str, list[str]] = {}
    for s in plan.used:
        per_obj.setdefault(s.objective, []).append(s.name)
    for members in per_obj.values():
        for name in members:
            plan.weight[name] = 1.0 / (len(per_obj) * len(members))
    return plan


def _candidates(suites: Sequence[SuiteScores]) -> list[str]:
    names = list(dict.fromkeys(c for s in suites for c in s.scores))
    return [c for c in names if all(c in s.scores for s in suites)]


@dataclass(frozen=True)
class HeadlineScores(AsDict):
    """Point headline scores: per candidate, per objective, per suite (no test)."""

    scale: str
    base: str
    sources: tuple[str, ...]
    scores: dict[str, float]
    per_objective: dict[str, dict[str, float]]
    per_suite: dict[str, dict[str, float]]
    reference: dict[str, str]
    excluded: dict[str, str]
    notes: list[str] = field(default_factory=list)


def headline_scores(suites: Sequence[SuiteScores], base: str, sources: Sequence[str] = (), scale: str = "source",
                    objectives: Sequence[str] | None = None) -> HeadlineScores:
    """Every candidate's headline score; each depends only on itself and the declared references."""
    plan = _plan(suites, base, sources, scale, objectives)
    names = _candidates(plan.used)
    m, q = _moments(plan.used, names, base)
    per_suite, per_obj = {}, {}
    for s in plan.used:
        one = _Plan(scale, base, plan.sources, [s], {s.name: 1.0}, {}, {}, [])
        per_suite[s.name] = {c: float(v) for c, v in one.headline(m, q, names).items()}
    for s in plan.used:
        members = [t for t in plan.used if t.objective == s.objective]
        per_obj[s.objective] = {c: float(np.mean([per_suite[t.name][c] for t in members])) for c in names}
    total = plan.headline(m, q, names)
    return HeadlineScores(scale, base, plan.sources, {c: float(v) for c, v in total.items()}, per_obj, per_suite,
                          plan.reference, plan.excluded, plan.notes)


@dataclass(frozen=True)
class HeadlineComparison(AsDict):
    """The headline candidate against one comparator: scores, difference, test and verdict."""

    candidate: str
    against: str
    score: float
    score_ci: tuple[float, float]
    against_score: float
    against_ci: tuple[float, float]
    diff: float
    ci: tuple[float, float]
    p: float
    p_holm: float
    verdict: str
    n: dict[str, int]
    unstable: float  # share of bootstrap draws where a suite's scale collapsed (counted as +-inf)

    def sentence(self) -> str:
        d, (lo, hi) = self.diff, self.ci
        tail = f"({p_text(self.p_holm)}, Holm-corrected, n = {'/'.join(str(v) for v in self.n.values())} items)"
        if self.verdict == NO_DIFFERENCE:
            return f"no significant difference from {self.against}: {d:+.2f} [{lo:.2f}, {hi:.2f}] {tail}"
        return f"{self.candidate} is {self.verdict} than {self.against} by {d:+.2f} [{lo:.2f}, {hi:.2f}] {tail}"


@dataclass(frozen=True)
class HeadlineVerdict(AsDict):
    """All comparisons of one headline candidate, with the scale and the method that produced them."""

    candidate: str
    scale: str
    base: str
    sources: tuple[str, ...]
    alpha: float
    method: str
    comparisons: list[HeadlineComparison]
    reference: dict[str, str]
    excluded: dict[str, str]
    notes: list[str]


def compare_headline(suites: Sequence[SuiteScores], candidate: str, against: Sequence[str], base: str,
                     sources: Sequence[str] = (), scale: str = "source", objectives: Sequence[str] | None = None,
                     alpha: float = 0.05, n_boot: int = 1000, n_perm: int = 2000, seed: int = 0) -> HeadlineVerdict:
    """Test the headline candidate's score against each comparator (Holm over the comparators)."""
    against = [c for c in dict.fromkeys(against) if c != candidate]
    if not against:
        raise MergeLabError(f"nothing to compare {candidate!r} against: name at least one other candidate")
    plan = _plan(suites, base, sources, scale, objectives)
    names = list(dict.fromkeys([candidate, *against, base, *plan.sources]))
    m, q = _moments(plan.used, names, base)
    point = plan.headline(m, q, names)
    rng = np.random.default_rng(seed)
    mb, qb, half, half2 = {}, {}, {}, {}
    squares = scale == "z" and base in (candidate, *against)  # the swaps move the base's spread too
    for s in plan.used:
        x = {c: s.array(c) for c in names}
        counts = bootstrap_counts(rng, n_boot, s.n)
        mb[s.name] = {c: counts @ x[c] / s.n for c in names}
        qb[s.name] = counts @ x[base] ** 2 / s.n
        f = sign_flips(rng, n_perm, s.n)
        half[s.name] = f @ np.stack([x[candidate] - x[c] for c in against], axis=1) / (2 * s.n)
        if squares:
            half2[s.name] = f @ np.stack([x[candidate] ** 2 - x[c] ** 2 for c in against], axis=1) / (2 * s.n)
    boot = plan.headline(mb, qb, names)
    raw = []
    for j, c in enumerate(against):
        mp, qp = {}, {}
        for s in plan.used:
            mid = (m[s.name][candidate] + m[s.name][c]) / 2
            mp[s.name] = {**m[s.name], candidate: mid + half[s.name][:, j], c: mid - half[s.name][:, j]}
            qp[s.name] = q[s.name]
            if squares and base in (candidate, c):
                mid2 = ((s.array(candidate) ** 2).mean() + (s.array(c) ** 2).mean()) / 2
                qp[s.name] = mid2 + (1 if base == candidate else -1) * half2[s.name][:, j]
        raw.append(randomization_p(plan.diff(mp, qp, candidate, c), float(plan.diff(m, q, candidate, c))))
    adj = holm(raw)
    out = []
    unstable = float(np.mean(plan.collapsed(mb, qb)))
    for c, p, ph in zip(against, raw, adj):
        lo, hi = percentile_interval(plan.diff(mb, qb, candidate, c), alpha)
        out.append(HeadlineComparison(
            candidate, c, float(point[candidate]), percentile_interval(boot[candidate], alpha), float(point[c]),
            percentile_interval(boot[c], alpha), float(plan.diff(m, q, candidate, c)), (lo, hi), p, float(ph),
            verdict_word(float(ph), lo, hi, alpha), {s.name: s.n for s in plan.used}, unstable))
    method = (f"{scale} scale; {n_boot} paired bootstrap draws of items within each suite (references resampled "
              f"too); p from {n_perm} within-suite paired swaps, two-sided, Holm-corrected over {len(against)}")
    notes = list(plan.notes) + ([f"a suite's scale collapsed to zero width in {unstable:.0%} of bootstrap draws "
                                 "(those draws count as infinitely large gaps)"] if unstable > 0 else [])
    return HeadlineVerdict(candidate, scale, base, plan.sources, alpha, method, out, plan.reference,
                           plan.excluded, notes)


def render_headline(verdict: HeadlineVerdict) -> list[str]:
    """One sentence per comparison, for the report."""
    return [c.sentence() for c in verdict.comparisons]


@dataclass(frozen=True)
class SampleSizeCheck(AsDict):
    """Can these suite sizes separate anything but huge gaps? ``message`` is None when they can."""

    flagged: bool
    message: str | None
    n: dict[str, int]
    mde: dict[str, float]  # per suite, in the suite's own units
    headline_mde: float  # in headline-scale units
    power: float


def sample_size_check(suites: Sequence[SuiteScores], base: str, sources: Sequence[str] = (), scale: str = "source",
                      objectives: Sequence[str] | None = None, alpha: float = 0.05, power: float = 0.8,
                      min_items: int = 100, max_gap: float = 0.25) -> SampleSizeCheck:
    """Smallest difference detectable at `power` (two-sided `alpha`), from the base's per-item spread
    and n, assuming uncorrelated candidates (var of a paired difference = 2 sigma^2; pairing usually
    does better, so this errs large). Flags when every suite has < min_items items or the headline's
    minimum detectable gap exceeds max_gap (on the source scale 1.0 is the whole base-to-best-source gap)."""
    plan = _plan(suites, base, sources, scale, objectives)
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    inv = {t[0].name: float(t[3]) for t in plan._terms(*_moments(plan.used, [base, *plan.sources], base))}
    n, mde, var = {}, {}, 0.0
    for s in (s for s in suites if objectives is None or s.objective in objectives):
        sigma = float(np.std(s.array(base), ddof=1)) if s.n > 1 else 0.0
        if sigma == 0.0:  # the base is constant here: borrow the spread of all candidates' scores pooled
            sigma = float(np.std(np.concatenate([s.array(c) for c in s.scores])))
        n[s.name], mde[s.name] = s.n, z * math.sqrt(2.0) * sigma / math.sqrt(s.n)
        if s.name in inv:  # the headline's variance: weight / width times the suite's s.e. of a gap
            var += (plan.weight[s.name] * inv[s.name] * mde[s.name] / z) ** 2
    headline_mde = z * math.sqrt(var)
    sizes = "/".join(str(v) for v in n.values())
    small, wide = all(v < min_items for v in n.values()), headline_mde > max_gap
    message = None
    if small or wide:
        unit = "1.0 = the whole gap from base to best source" if scale == "source" else "in base standard deviations"
        message = (f"sample too small to separate anything but large gaps: with n = {sizes} items the smallest "
                   f"headline difference detectable at {power:.0%} power is {headline_mde:.2f} ({unit})"
                   + (f"; every suite has fewer than {min_items} items" if small else "")
                   + ". Read 'no significant difference' as 'not measured'; run the full suites to decide.")
    return SampleSizeCheck(small or wide, message, n, mde, headline_mde, power)
