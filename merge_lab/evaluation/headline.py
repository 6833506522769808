"""The verdict part of results.json, from per-example scores: reference-anchored headline scores
for every candidate, the headline candidate's tested comparisons, per-suite verdicts under the
same rule, suites that do not separate the candidates, and the sample-size warning.

Kept apart from aggregate.py so a results dict built from known scores can be judged directly
(the tests do), and because every word the report uses ("better", "worse", "no significant
difference") comes from here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.resampling import NO_DIFFERENCE, SuiteScores, suites_from_results
from merge_lab.evaluation.spec import CompareSpec, References
from merge_lab.evaluation.suite_tests import as_family, compare_suites, non_separating_suites
from merge_lab.evaluation.suites import ranked_objectives
from merge_lab.evaluation.verdict import compare_headline, headline_scores, sample_size_check

DEFINITIONS = {
    "source": ("Headline score: per suite, a candidate's mean is placed on a scale fixed by declared references, "
               "never by the other candidates in the file: the base ({base}) is 0 and the best source model "
               "({sources}) on that suite is 1 (higher is better, whatever the metric's direction). Suite scores "
               "are averaged within each objective, then over the objectives ({objectives}). A suite where the "
               "best source scores the same as the base has no scale and is left out, as is a suite that does not "
               "separate the candidates. Intervals resample items within each suite (references included); "
               "p-values come from paired swaps of items, Holm-corrected over the comparisons shown, and a "
               "verdict says better or worse only when the corrected p < {alpha} and the interval excludes 0."),
    "z": ("Headline score: per suite, (candidate mean - base mean) in units of the base's ({base}) per-item "
          "standard deviation, oriented so higher is better; averaged within each objective, then over the "
          "objectives ({objectives}). A suite where the base gives one score on every item, or that does not "
          "separate the candidates, is left out. Intervals resample items within each suite; p-values come from "
          "paired swaps of items, Holm-corrected over the comparisons shown; better or worse only when the "
          "corrected p < {alpha} and the interval excludes 0."),
}


OOD_DEFINITION = (" Only the out-of-distribution suites ({ood}: items from sources no candidate trains on) enter "
                  "the headline score and verdict; the in-distribution suites are reported beside them.")


def held_out_suites(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(out-of-distribution, in-distribution) suite names of a results dict: when the first is not
    empty, the headline is computed on it alone, since in-distribution suites test the sources the
    candidates were trained on and so reward fitting them."""
    ood = [s for s, info in results["suites"].items() if info.get("ood")]
    return ood, [s for s in results["suites"] if s not in ood]


def rivals(spec: CompareSpec, refs: References) -> dict[str, list[str]]:
    """What the headline candidate is compared with: label -> the names the best is picked from."""
    out: dict[str, list[str]] = {}
    for c in spec.candidates:
        if c.name == spec.headline:
            continue
        if c.source:
            out.setdefault("best source model", []).append(c.name)
        if c.group:
            out.setdefault(f"best {c.group}", []).append(c.name)
    for name in refs.against:
        out[f"listed ({name})"] = [name]
    return out


def _objectives(suites: Sequence[SuiteScores]) -> list[str]:
    return ranked_objectives(list(dict.fromkeys(s.objective for s in suites)))


def fill_verdict(results: dict[str, Any], refs: References, headline: str | None = None,
          against: Mapping[str, Sequence[str]] | None = None, n_boot: int = 1000, n_perm: int = 2000,
          seed: int = 0) -> None:
    """Fill results["non_separating"], ["headline_scores"] and, with a headline candidate, ["headline"] (comparators: the best of each `against` list by
    headline score). Needs results["suites"] and results["per_example"]."""
    suites = suites_from_results(results)
    flagged = non_separating_suites(suites)
    results["non_separating"] = flagged
    ood, in_dist = held_out_suites(results)
    usable = [s for s in suites if s.name not in flagged and (not ood or s.name in ood)]
    chosen = _objectives(usable) if usable else []
    left_out = {k: f"{v}; left out of the headline" for k, v in flagged.items()}
    block: dict[str, Any] = {"scale": refs.scale, "base": refs.base, "sources": list(refs.sources),
                             "objectives": chosen, "suites": [s.name for s in usable],
                             "distribution": "out-of-distribution" if ood else "all",
                             "in_distribution_shown": in_dist if ood else [],
                             "definition": DEFINITIONS[refs.scale].format(
                                 base=refs.base, sources=", ".join(refs.sources) or "none",
                                 objectives=", ".join(chosen) or "none", alpha=refs.alpha)
                             + (OOD_DEFINITION.format(ood=", ".join(ood)) if ood else "")}
    results["headline_scores"] = block
    try:
        if not usable:
            raise MergeLabError(f"every {'out-of-distribution ' if ood else ''}suite was left out (" + "; ".join(f"{k}: {v}" for k, v in flagged.items()) + ")")
        every = headline_scores(usable, refs.base, refs.sources, refs.scale)
        overall = headline_scores(usable, refs.base, refs.sources, refs.scale, objectives=chosen)
    except MergeLabError as e:
        block.update(error=str(e), excluded=left_out)
        if headline:
            results["headline"] = {"candidate": headline, "error": f"no headline score: {e}"}
        return
    block.update(overall=overall.scores, per_objective=every.per_objective, per_suite=every.per_suite,
                 reference=every.reference, excluded={**every.excluded, **left_out}, notes=every.notes)
    if not headline:
        return
    picked: dict[str, str] = {}  # comparator -> why it was picked
    for what, names in (against or {}).items():
        names = [n for n in names if n != headline and n in overall.scores]
        if names:
            picked.setdefault(max(names, key=lambda n: overall.scores[n]), what)
    out: dict[str, Any] = {"candidate": headline, "score": overall.scores.get(headline), "objectives": chosen,
                           "excluded": block["excluded"], "comparisons": [], "per_suite": []}
    results["headline"] = out
    size = sample_size_check(usable, refs.base, refs.sources, refs.scale, objectives=chosen, alpha=refs.alpha)
    out["sample_size"] = size.as_dict()
    if not picked:
        out["notes"] = ["nothing to compare with: mark source models or give candidates a `group:`"]
        return
    v = compare_headline(usable, headline, list(picked), refs.base, refs.sources, refs.scale, objectives=chosen,
                         alpha=refs.alpha, n_boot=n_boot, n_perm=n_perm, seed=seed)
    out.update(score_ci=v.comparisons[0].score_ci, alpha=v.alpha, method=v.method, notes=v.notes,
               comparisons=[{"what": picked[c.against], **c.as_dict(), "sentence": c.sentence()}
                            for c in v.comparisons])
    per = compare_suites(usable, headline, list(picked), refs.alpha, n_boot, n_perm, seed)
    out["per_suite"] = [{**c.as_dict(), "sentence": c.sentence()} for c in per]


def suite_verdicts(results: dict[str, Any], alpha: float = 0.05, n_boot: int = 1000, n_perm: int = 2000,
                   seed: int = 0) -> None:
    """Each suite's best against its runner-up in results["best"], Holm over the suites (the
    report's per-suite sentences), and results["non_separating"]; needs no references."""
    suites = suites_from_results(results)
    results["non_separating"] = non_separating_suites(suites)
    rows = []
    for s in suites:
        b = results.get("best", {}).get(s.name)
        if b and "runner_up" in b:
            rows.append(compare_suites([s], b["candidate"], b["runner_up"], alpha, n_boot, n_perm, seed)[0])
    for c in as_family(rows, alpha):
        b = results["best"][c.suite]
        b.update(diff=c.diff, ci=list(c.ci), p=c.p, p_holm=c.p_holm, verdict=c.verdict, n=c.n, tests=c.tests,
                 significant=c.verdict != NO_DIFFERENCE)


RAW_MEAN_DEFINITION = ("Selection score (no verdict references declared): per suite, the variant's mean item score "
                       "(negated where lower is better), averaged within each objective, then over the objectives "
                       "({objectives}); it depends on nothing but the variant itself.")


def selection_scores(results: dict[str, Any], refs: References | None, tried: Sequence[str], n_boot: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Each of `tried`'s score on the selection suites in `results` (results["suites"] and
    ["per_example"], which hold the references too): the headline score fill_verdict computes, on the
    same references, when `refs` is given and places the variants on its scale; else the mean raw
    suite score per objective, averaged over the objectives. Neither depends on the other variants
    (no min-max across what was tried, no suite dropped for not separating them), so adding a
    variant to the grid moves neither a variant's score nor the choice. With references, each score
    also gets its bootstrap interval ("intervals": items resampled within each suite, the same draws
    whatever else was tried)."""
    suites = suites_from_results(results)
    ood, _ = held_out_suites(results)
    usable = [s for s in suites if not ood or s.name in ood]
    objectives = _objectives(usable)
    out: dict[str, Any] = {"suites": [s.name for s in usable], "objectives": objectives,
                           "distribution": "out-of-distribution" if ood else "all"}
    if refs is not None:
        try:
            every = headline_scores(usable, refs.base, refs.sources, refs.scale)
            overall = headline_scores(usable, refs.base, refs.sources, refs.scale, objectives=objectives)
        except MergeLabError as e:
            out["anchored_error"] = str(e)
        else:
            used = [o for o in objectives if o in every.per_objective]
            out.update(kind="headline", scale=refs.scale, base=refs.base, sources=list(refs.sources),
                       objectives=used, excluded=every.excluded,
                       definition=DEFINITIONS[refs.scale].format(base=refs.base,
                                                                 sources=", ".join(refs.sources) or "none",
                                                                 objectives=", ".join(used), alpha=refs.alpha)
                       + " On the selection split no suite is left out for not separating the variants.",
                       scores={n: overall.scores[n] for n in tried},
                       per_objective={n: {o: every.per_objective[o][n] for o in used} for n in tried},
                       intervals=_intervals(usable, refs, list(tried), used, n_boot, seed))
            return out
    per_objective: dict[str, dict[str, float]] = {}
    for n in tried:
        by_obj: dict[str, list[float]] = {}
        for s in usable:
            sign = 1.0 if s.higher_is_better else -1.0
            by_obj.setdefault(s.objective, []).append(sign * float(s.array(n).mean()))
        per_objective[n] = {o: sum(by_obj[o]) / len(by_obj[o]) for o in objectives}
    out.update(kind="raw mean", definition=RAW_MEAN_DEFINITION.format(objectives=", ".join(objectives)),
               scores={n: sum(per_objective[n].values()) / len(objectives) for n in tried},
               per_objective=per_objective)
    return out


def _intervals(suites: Sequence[SuiteScores], refs: References, tried: list[str], objectives: list[str],
               n_boot: int, seed: int) -> dict[str, list[float]]:
    """Each variant's bootstrap interval of its headline score, from one compare_headline call (its
    draws resample items only, so a variant's interval does not depend on the others)."""
    v = compare_headline(suites, tried[0], [*tried[1:], refs.base], refs.base, refs.sources, refs.scale,
                         objectives=objectives, alpha=refs.alpha, n_boot=n_boot, n_perm=100, seed=seed)
    out = {tried[0]: list(v.comparisons[0].score_ci)} | {c.against: list(c.against_ci) for c in v.comparisons}
    return {n: out[n] for n in tried}
