"""verdict.py, suite_tests.py and resampling.py on toy per-example arrays whose answers are known."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.resampling import BETTER, NO_DIFFERENCE, WORSE, SuiteScores, holm, suites_from_results
from merge_lab.evaluation.suite_tests import compare_suites, non_separating, non_separating_suites, render_suites
from merge_lab.evaluation.verdict import compare_headline, headline_scores, render_headline, sample_size_check


def bits(ones: int, n: int) -> list[float]:
    return [1.0] * ones + [0.0] * (n - ones)


def binary(rng: np.random.Generator, p: float, n: int) -> list[float]:
    return (rng.random(n) < p).astype(float).tolist()


@pytest.fixture
def world() -> list[SuiteScores]:
    """Three suites, two objectives; h is far above everything, twin is h's copy, near is h with 4 items lost and 3 won per suite."""
    rng = np.random.default_rng(7)
    suites = []
    for name, obj, hib in [("qa", "helpful", True), ("math", "helpful", True), ("over_refusal", "harmless", False)]:
        n = 200
        good, bad = (0.9, 0.3) if hib else (0.05, 0.6)
        h = binary(rng, good, n)
        near = list(h)
        top = 1.0 if hib else 0.0
        flips = [i for i, v in enumerate(h) if v == top][:4] + [i for i, v in enumerate(h) if v != top][:3]
        for i in flips:
            near[i] = 1.0 - near[i]
        suites.append(SuiteScores(name, obj, hib, {
            "base": binary(rng, bad, n), "src_a": binary(rng, 0.6 if hib else 0.3, n),
            "src_b": binary(rng, 0.5 if hib else 0.4, n), "h": h, "twin": list(h), "near": near,
            "weak": binary(rng, bad, n),
        }))
    return suites


KW = dict(base="base", sources=["src_a", "src_b"])


def test_source_scale_known_values_and_objective_average():
    s1 = SuiteScores("a", "helpful", True, {"base": bits(2, 10), "src": bits(6, 10), "c": bits(4, 10)})
    s2 = SuiteScores("b", "helpful", True, {"base": bits(2, 10), "src": bits(6, 10), "c": bits(6, 10)})
    s3 = SuiteScores("r", "harmless", False, {"base": bits(6, 10), "src": bits(2, 10), "c": bits(6, 10)})
    out = headline_scores([s1, s2, s3], "base", ["src"])
    assert out.per_suite["a"]["c"] == pytest.approx(0.5)
    assert out.per_suite["b"]["c"] == pytest.approx(1.0)
    assert out.per_suite["r"]["c"] == pytest.approx(0.0)
    assert out.per_objective["helpful"]["c"] == pytest.approx(0.75)
    assert out.scores["c"] == pytest.approx(0.375)  # (0.75 + 0.0) / 2: objectives weigh equally
    assert out.scores["base"] == 0.0 and out.scores["src"] == pytest.approx(1.0)
    assert out.reference == {"a": "src", "b": "src", "r": "src"}


def test_z_scale_known_values_and_lower_is_better():
    s = SuiteScores("r", "harmless", False, {"base": bits(2, 10), "c": bits(0, 10), "d": bits(4, 10)})
    out = headline_scores([s], "base", scale="z")
    # base mean 0.2, per-item std 0.4; c refuses 0.2 less (better), d 0.2 more (worse)
    assert out.scores["c"] == pytest.approx(0.5) and out.scores["d"] == pytest.approx(-0.5)


def test_unrelated_candidate_changes_no_other_score_exactly(world):
    extra = [SuiteScores(s.name, s.objective, s.higher_is_better,
                         {**s.scores, "other": list(np.linspace(0, 1, s.n))}) for s in world]
    for scale in ("source", "z"):
        before, after = headline_scores(world, scale=scale, **KW), headline_scores(extra, scale=scale, **KW)
        assert {k: after.scores[k] for k in before.scores} == before.scores
        v1 = compare_headline(world, "h", ["weak", "near"], scale=scale, **KW)
        v2 = compare_headline(extra, "h", ["weak", "near"], scale=scale, **KW)
        assert v1.as_dict() == v2.as_dict()


def test_large_gap_better_reversed_worse_noise_no_difference(world):
    v = compare_headline(world, "h", ["weak", "near"], **KW)
    weak, near = v.comparisons
    assert weak.verdict == BETTER and weak.p_holm < 0.01 and weak.ci[0] > 0 and weak.diff > 0
    assert near.verdict == NO_DIFFERENCE and near.p > 0.2 and near.ci[0] < 0 < near.ci[1]
    assert near.n == {"qa": 200, "math": 200, "over_refusal": 200}
    rev = compare_headline(world, "weak", ["h"], **KW).comparisons[0]
    assert rev.verdict == WORSE and rev.ci[1] < 0 and rev.diff == pytest.approx(-weak.diff)
    assert weak.score_ci[0] <= weak.score <= weak.score_ci[1]
    lines = render_headline(v)
    assert lines[0].startswith("h is better than weak by +") and "Holm-corrected, n = 200/200/200 items" in lines[0]
    assert lines[1].startswith("no significant difference from near: ")


def test_identical_candidates_p_is_one(world):
    for scale in ("source", "z"):
        c = compare_headline(world, "h", ["twin"], scale=scale, **KW).comparisons[0]
        assert c.p == 1.0 and c.p_holm == 1.0 and c.verdict == NO_DIFFERENCE
        assert c.diff == 0.0 and c.ci == (0.0, 0.0)
    clone = [SuiteScores(s.name, s.objective, s.higher_is_better, {**s.scores, "clone": s.scores["base"]})
             for s in world]  # identical to the base that anchors the z scale: the swaps move the scale
    c = compare_headline(clone, "clone", ["base"], scale="z", **KW).comparisons[0]
    assert c.p == 1.0 and c.verdict == NO_DIFFERENCE and c.diff == 0.0
    rows = compare_suites(world, "h", "twin")
    assert all(r.p == 1.0 and r.verdict == NO_DIFFERENCE for r in rows)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]).tolist() == [0.5]
    assert holm([0.4, 0.9]).tolist() == pytest.approx([0.8, 0.9])


def test_holm_makes_a_lone_pass_fail_among_many():
    """h beats c on exactly 7 items: exact sign-flip p = 2 / 2**7 = 0.0156, passes alone, fails x4."""
    rng = np.random.default_rng(3)
    n = 100
    h = bits(50, n)
    c = list(h)
    for i in range(7):
        c[i] = 0.0
    s = SuiteScores("qa", "helpful", True, {"base": binary(rng, 0.2, n), "src": binary(rng, 0.8, n), "h": h,
                                            "c": c, "t1": list(h), "t2": list(h), "t3": list(h)})
    alone = compare_headline([s], "h", ["c"], "base", ["src"]).comparisons[0]
    assert alone.p == pytest.approx(2 / 2**7, abs=0.006) and alone.verdict == BETTER
    many = compare_headline([s], "h", ["c", "t1", "t2", "t3"], "base", ["src"]).comparisons
    assert [m.p_holm for m in many] == pytest.approx(holm([m.p for m in many]).tolist())
    assert many[0].p == alone.p and many[0].p_holm == pytest.approx(min(1.0, 4 * alone.p))
    assert many[0].p_holm > 0.05 and many[0].verdict == NO_DIFFERENCE
    per = compare_suites([s], "h", ["c", "t1", "t2", "t3"])
    assert per[0].p == pytest.approx(2 / 2**7, abs=0.006) and per[0].tests == 4 and per[0].verdict == NO_DIFFERENCE
    assert compare_suites([s], "h", "c")[0].verdict == BETTER


def test_lower_is_better_oriented(world):
    rows = {r.suite: r for r in compare_suites(world, "h", "weak")}
    refusal = rows["over_refusal"]
    assert refusal.diff < 0 and refusal.verdict == BETTER  # h refuses less
    assert rows["qa"].diff > 0 and rows["qa"].verdict == BETTER
    assert {r.suite: r.verdict for r in compare_suites(world, "weak", "h")}["over_refusal"] == WORSE
    assert headline_scores(world, objectives=["harmless"], **KW).scores["h"] > 1.0
    only = compare_headline(world, "h", ["weak"], objectives=["harmless"], **KW).comparisons[0]
    assert only.diff > 0 and only.verdict == BETTER and only.n == {"over_refusal": 200}
    assert "lower is better" in render_suites([refusal])[0]
    assert render_suites([refusal])[0].startswith("over_refusal: h is better than weak by -")


def test_zero_width_scale_is_reported_not_divided(world):
    qa = world[0]
    flat = SuiteScores("flat", "honest", True, {**qa.scores, "src_a": qa.scores["base"], "src_b": qa.scores["base"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = headline_scores([*world, flat], **KW)
        v = compare_headline([*world, flat], "h", ["weak"], **KW)
    assert "flat" in out.excluded and "zero-width" in out.excluded["flat"] and "flat" not in out.per_suite
    assert out.scores == headline_scores(world, **KW).scores
    assert "flat" in v.excluded and np.isfinite(v.comparisons[0].diff)
    with pytest.raises(MergeLabError, match="no suite can place"):
        headline_scores([flat], **KW)
    const = SuiteScores("c", "honest", True, {"base": [1.0] * 5, "x": bits(2, 5)})
    with pytest.raises(MergeLabError, match="zero spread"):
        headline_scores([const], "base", scale="z")


def test_seeded_and_fast(world):
    a = compare_headline(world, "h", ["weak", "near"], seed=1, **KW).as_dict()
    assert a == compare_headline(world, "h", ["weak", "near"], seed=1, **KW).as_dict()
    assert a != compare_headline(world, "h", ["weak", "near"], seed=2, **KW).as_dict()


def test_non_separating_flag():
    same = {f"m{i}": bits(3, 10) for i in range(3)}
    assert non_separating(same) == "does not separate these candidates: all 3 candidates give identical per-example scores"
    eleven = {f"m{i}": bits(3, 10) for i in range(10)} | {"odd": bits(7, 10)}
    assert non_separating(eleven) == "does not separate these candidates: 10 of 11 candidates give identical per-example scores"
    differ = {"a": bits(3, 10), "b": bits(7, 10), "c": [0.0, 1.0] * 5}
    assert non_separating(differ) is None
    almost = {"a": bits(0, 100), "b": bits(3, 100), "c": bits(0, 99) + [1.0]}
    assert "same score on 96 of 100 items (96%)" in non_separating(almost)
    suites = [SuiteScores("s", "h", True, same), SuiteScores("t", "h", True, differ)]
    assert list(non_separating_suites(suites)) == ["s"]


def test_sample_size_warning():
    rng = np.random.default_rng(0)
    def suites(n):
        return [SuiteScores(f"s{k}", "helpful", True, {"base": binary(rng, 0.3, n), "src": binary(rng, 0.8, n)})
                for k in range(3)]
    small = sample_size_check(suites(40), "base", ["src"])
    assert small.flagged and "fewer than 100 items" in small.message and "n = 40/40/40" in small.message
    big = sample_size_check(suites(3000), "base", ["src"])
    assert not big.flagged and big.message is None and big.headline_mde < 0.1
    s = SuiteScores("x", "helpful", True, {"base": [0.0, 1.0] * 50, "src": [1.0] * 100})
    check = sample_size_check([s], "base", ["src"])
    z = 1.959963984540054 + 0.8416212335729143
    sigma = math.sqrt(100 * 0.25 / 99)  # ddof=1 std of 50 zeros and 50 ones
    assert check.mde["x"] == pytest.approx(z * math.sqrt(2) * sigma / 10)
    assert check.headline_mde == pytest.approx(check.mde["x"] / 0.5)  # width: base 0.5 -> source 1.0


def test_user_errors():
    s = SuiteScores("qa", "helpful", True, {"base": [0.0, 1.0], "src": [1.0, 1.0], "c": [1.0]})
    with pytest.raises(MergeLabError, match="same items"):
        headline_scores([s], "base", ["src"])
    ok = SuiteScores("qa", "helpful", True, {"base": [0.0, 1.0], "src": [1.0, 1.0]})
    with pytest.raises(MergeLabError, match="unknown headline scale"):
        headline_scores([ok], "base", ["src"], scale="minmax")
    with pytest.raises(MergeLabError, match="no scores for candidate 'nope'"):
        compare_headline([ok], "src", ["nope"], "base", ["src"])
    with pytest.raises(MergeLabError, match="needs the source models"):
        headline_scores([ok], "base")


def test_suites_from_results_shape():
    results = {"suites": {"qa": {"objective": "helpful", "higher_is_better": True}},
               "per_example": {"qa": {"a": [{"id": 1, "score": 1}, {"id": 2, "score": 0}]}}}
    (s,) = suites_from_results(results)
    assert s.name == "qa" and s.scores == {"a": [1.0, 0.0]} and s.higher_is_better


def test_randomization_p_is_valid_under_the_null():
    """Exchangeable pairs: the raw p falls below 0.05 about 5% of the time, also when the comparator is
    the base that anchors the scale (the swaps then move the scale, and the statistic is recomputed)."""
    rejections = {"other": 0, "base": 0}
    reps = 150
    for r in range(reps):
        rng = np.random.default_rng(1000 + r)
        ss = [SuiteScores(f"s{k}", "helpful", True, {"base": binary(rng, 0.4, 40), "src": binary(rng, 0.8, 40),
                                                    "a": binary(rng, 0.4, 40), "b": binary(rng, 0.4, 40)})
              for k in range(2)]
        v = compare_headline(ss, "a", ["b", "base"], "base", ["src"], n_boot=20, n_perm=200, seed=r)
        rejections["other"] += v.comparisons[0].p < 0.05
        rejections["base"] += v.comparisons[1].p < 0.05
    assert all(k / reps < 0.1 for k in rejections.values()), rejections


def test_scale_collapsing_in_resamples_is_reported(world):
    n = 50
    base = bits(10, n)
    src = list(base)
    src[-1] = 1.0  # the source beats the base on one item only
    s = SuiteScores("thin", "helpful", True, {"base": base, "src": src, "h": bits(30, n), "c": bits(10, n)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = compare_headline([s], "h", ["c"], "base", ["src"])
    c = v.comparisons[0]
    assert c.unstable == pytest.approx(math.exp(-1), abs=0.05)  # draws that miss that one item
    assert any("collapsed" in note for note in v.notes) and any("not resolved" in note for note in v.notes)
    # collapsed draws count as an infinite gap in the gap's direction: the size is unknown, the sign is not
    assert c.ci[1] == math.inf and c.ci[0] > 0 and c.verdict == BETTER


def test_base_beating_every_source_keeps_orientation():
    s = SuiteScores("qa", "helpful", True, {"base": bits(6, 10), "src": bits(2, 10), "c": bits(8, 10)})
    out = headline_scores([s], "base", ["src"])
    assert out.scores["src"] == pytest.approx(-1.0) and out.scores["c"] == pytest.approx(0.5)
    assert any("scores above every source" in note for note in out.notes)
