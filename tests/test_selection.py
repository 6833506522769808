"""`choose:` ranks variants by a score that depends on nothing but the variant and the declared
references (headline.selection_scores): adding a variant to the grid moves neither a variant's
score nor the choice, and where min-max over the tried set and the anchored score disagree, the
anchored one chooses."""

from __future__ import annotations

import pytest

from merge_lab.evaluation.aggregate import objective_means, scaled
from merge_lab.evaluation.headline import selection_scores
from merge_lab.evaluation.spec import References

REFS = References(base="base", sources=("source",), scale="source", alpha=0.05, against=())


def _results(means: dict[str, dict[str, float]], objective: dict[str, str] | None = None, n: int = 4) -> dict:
    """A results dict (suites + per_example) where every item of candidate c on suite s scores means[s][c]
    (plus a +-0.05 wobble, in a phase that differs between candidates, that keeps each mean)."""
    objective = objective or dict.fromkeys(means, "helpful")

    def wobble(c: str) -> list[float]:
        return [0.05 if (i + ord(c[0])) % 2 else -0.05 for i in range(n)]

    return {"suites": {s: {"objective": objective[s], "higher_is_better": True} for s in means},
            "per_example": {s: {c: [{"id": f"{s}-{i}", "score": m + w} for i, w in enumerate(wobble(c))]
                                for c, m in per.items()} for s, per in means.items()}}


# A wins suite s1 by far; B wins s2 and s3 by a hair. Base 0, best source 1 on every suite.
DISAGREE = {"s1": {"base": 0.0, "source": 1.0, "A": 0.9, "B": 0.1, "C": 0.3},
            "s2": {"base": 0.0, "source": 1.0, "A": 0.50, "B": 0.51, "C": 0.2},
            "s3": {"base": 0.0, "source": 1.0, "A": 0.50, "B": 0.51, "C": 0.2}}


def _only(means: dict[str, dict[str, float]], keep: list[str]) -> dict[str, dict[str, float]]:
    return {s: {c: v for c, v in per.items() if c in keep} for s, per in means.items()}


def _minmax_choice(means: dict[str, dict[str, float]], tried: list[str]) -> str:
    """What the old rule picked: per suite min-max over the tried variants, averaged."""
    norm = {s: scaled({c: means[s][c] for c in tried}, True) for s in means}
    _, mean = objective_means({"helpful": {c: sum(norm[s][c] for s in norm) / len(norm) for c in tried}})
    return max(tried, key=mean.get)


def test_the_anchored_score_chooses_where_min_max_disagrees():
    tried = ["A", "B"]
    assert _minmax_choice(DISAGREE, tried) == "B"  # B wins two suites of three: min-max prefers it
    scored = selection_scores(_results(_only(DISAGREE, ["base", "source", *tried])), REFS, tried)
    assert scored["kind"] == "headline" and scored["base"] == "base" and scored["sources"] == ["source"]
    assert scored["scores"] == pytest.approx({"A": (0.9 + 0.5 + 0.5) / 3, "B": (0.1 + 0.51 + 0.51) / 3})
    assert max(tried, key=scored["scores"].get) == "A"
    assert scored["per_objective"]["A"] == pytest.approx({"helpful": (0.9 + 0.5 + 0.5) / 3})


def test_adding_a_variant_moves_no_score_and_not_the_choice():
    two = selection_scores(_results(_only(DISAGREE, ["base", "source", "A", "B"])), REFS, ["A", "B"])
    three = selection_scores(_results(DISAGREE), REFS, ["A", "B", "C"])
    assert {n: three["scores"][n] for n in ("A", "B")} == pytest.approx(two["scores"])
    assert max(two["scores"], key=two["scores"].get) == max(three["scores"], key=three["scores"].get) == "A"
    assert [three["intervals"][n] for n in ("A", "B")] == [pytest.approx(two["intervals"][n]) for n in ("A", "B")]
    assert all(lo <= two["scores"][n] <= hi for n, (lo, hi) in two["intervals"].items())
    assert two["intervals"]["A"][0] < two["intervals"]["A"][1]  # the items vary, so the interval has width
    # the old rule's scores did move: C, worst on s2 and s3, rescales them
    assert _minmax_choice(DISAGREE, ["A", "B"]) == "B" and _minmax_choice(DISAGREE, ["A", "B", "C"]) == "A"


def test_without_references_the_raw_mean_per_objective_ranks_and_is_stable():
    objective = {"s1": "helpful", "s2": "honest", "s3": "honest"}
    means = {s: {c: v for c, v in per.items() if c not in ("base", "source")} for s, per in DISAGREE.items()}
    two = selection_scores(_results(_only(means, ["A", "B"]), objective), None, ["A", "B"])
    three = selection_scores(_results(means, objective), None, ["A", "B", "C"])
    assert two["kind"] == three["kind"] == "raw mean" and "no verdict references" in two["definition"]
    assert two["objectives"] == ["helpful", "honest"]
    assert two["scores"] == pytest.approx({"A": (0.9 + 0.5) / 2, "B": (0.1 + 0.51) / 2})
    assert {n: three["scores"][n] for n in ("A", "B")} == pytest.approx(two["scores"])
    assert max(three["scores"], key=three["scores"].get) == "A"


def test_lower_is_better_suites_count_negated_and_anchored_failure_falls_back():
    res = _results({"loss": {"base": 1.0, "source": 1.0, "A": 2.0, "B": 3.0}})
    res["suites"]["loss"]["higher_is_better"] = False
    scored = selection_scores(res, REFS, ["A", "B"])  # base == source: no scale, so the raw mean decides
    assert scored["kind"] == "raw mean" and "zero-width" in scored["anchored_error"]
    assert scored["scores"] == pytest.approx({"A": -2.0, "B": -3.0})
