"""results.json from cache entries: estimates with intervals, paired tests, the oracle, the best
candidate per suite, cost, the reference-anchored headline scores and the tested verdict
(headline.py), and the relative objectives (min-max scaled across the candidates in the file)."""

from __future__ import annotations

from typing import Any

from merge_lab.evaluation.candidates import describe
from merge_lab.evaluation.cost import summarize
from merge_lab.evaluation.headline import fill_verdict, rivals, suite_verdicts
from merge_lab.evaluation.metrics import bootstrap_ci, oracle, paired_test
from merge_lab.evaluation.prepare import Comparison
from merge_lab.evaluation.resampling import holm, verdict_word
from merge_lab.evaluation.spec import CompareSpec, references
from merge_lab.evaluation.suites import ranked_objectives
from merge_lab.evaluation.suites.refusal import CLASSIFIER


def scaled(values: dict[str, float], higher: bool) -> dict[str, float]:
    """Min-max scaling across candidates: 1 for the best, 0 for the worst, 1 for all when tied."""
    lo, hi = min(values.values()), max(values.values())
    if hi - lo < 1e-12:
        return dict.fromkeys(values, 1.0)
    return {k: ((v - lo) / (hi - lo) if higher else (hi - v) / (hi - lo)) for k, v in values.items()}


def objective_means(objectives: dict[str, dict[str, float]]) -> tuple[list[str], dict[str, float]]:
    """The objectives a single mean is taken over (the H3 ones when present) and each candidate's mean."""
    chosen = ranked_objectives(objectives)
    return chosen, {n: sum(objectives[o][n] for o in chosen) / len(chosen) for n in objectives[chosen[0]]}


def headline(spec: CompareSpec, results: dict[str, Any], n_boot: int = 1000, seed: int = 0) -> None:
    """Reference-anchored headline scores for every candidate and, with `headline:` set, its tested
    verdict against the best source model, each group's best and `verdict.against` (headline.py)."""
    suite_verdicts(results, spec.verdict.alpha, n_boot, max(2000, n_boot), seed)
    refs = references(spec)
    if refs is None:
        results["headline_scores"] = {"error": "no headline scale: name a candidate `base` and mark source models "
                                               "with `source: true`, or write a `verdict:` block"}
        return
    fill_verdict(results, refs, spec.headline, rivals(spec, refs), n_boot=n_boot, n_perm=max(2000, n_boot), seed=seed)


def _paired_verdicts(out: dict[str, Any], alpha: float = 0.05) -> None:
    """Holm over the table of candidates against the best source, with the verdict words."""
    tests = [(s, n) for s, p in out["paired"].items() for n in p["candidates"]]
    adj = holm([out["paired"][s]["candidates"][n]["p"] for s, n in tests]) if tests else []
    for (s, n), ph in zip(tests, adj):
        t = out["paired"][s]["candidates"][n]
        t.update(p_holm=float(ph), verdict=verdict_word(float(ph), t["ci"][0], t["ci"][1], alpha,
                                                        out["suites"][s]["higher_is_better"]))


def aggregate(comp: Comparison, entries: dict[str, dict[str, dict]], full: bool = True) -> dict:
    """results.json: settings, suites, candidates with cost, estimates, paired tests, oracle, best
    (`full=False`: estimates and objectives only, as selection needs)."""
    n_boot, seed = comp.settings.bootstrap, comp.settings.seed
    names = list(comp.candidates)
    out: dict[str, Any] = {
        "settings": comp.settings.model_dump(), "sources": comp.sources,
        "refusal_classifier": CLASSIFIER,
        "training_checked": comp.training_checked,
        "suites": {}, "candidates": {}, "results": {}, "paired": {}, "oracle": {}, "best": {},
        "objectives": {}, "per_example": {},
    }
    for suite in comp.suites:
        info = suite.info()
        ids = [r["id"] for r in entries[names[0]][suite.name]["records"]]
        info.update(split=suite.split, n=len(ids))
        out["suites"][suite.name] = info
        per: dict[str, list[float]] = {}
        for n in names:
            recs = {r["id"]: r for r in entries[n][suite.name]["records"]}
            per[n] = [float(recs[i]["score"]) for i in ids]
            out["per_example"].setdefault(suite.name, {})[n] = [recs[i] for i in ids]
        higher = suite.higher_is_better
        est = {n: bootstrap_ci(per[n], n_boot, seed) for n in names}
        out["results"][suite.name] = {n: e.as_dict() for n, e in est.items()}
        out["oracle"][suite.name] = bootstrap_ci(oracle(per, higher), n_boot, seed).as_dict()
        if not full:
            continue
        ranked = sorted(names, key=lambda n: est[n].value, reverse=higher)
        best = {"candidate": ranked[0]}
        if len(ranked) > 1:
            t = paired_test(per[ranked[0]], per[ranked[1]], n_boot, seed)
            best.update(runner_up=ranked[1], **t.as_dict(), significant=t.p < 0.05)
        out["best"][suite.name] = best
        if comp.sources:
            src = sorted(comp.sources, key=lambda n: est[n].value, reverse=higher)[0]
            out["paired"][suite.name] = {  # candidates apart from the rest: a candidate may be named "reference"
                "reference": src,
                "candidates": {n: paired_test(per[n], per[src], n_boot, seed).as_dict() for n in names if n != src},
            }
    norm = {s: scaled({n: out["results"][s][n]["value"] for n in names}, out["suites"][s]["higher_is_better"])
            for s in out["suites"]}
    for obj in dict.fromkeys(out["suites"][s]["objective"] for s in out["suites"]):
        members = [s for s in out["suites"] if out["suites"][s]["objective"] == obj]
        out["objectives"][obj] = {n: sum(norm[s][n] for s in members) / len(members) for n in names}
    if not full:
        return out
    out["notes"] = list(comp.spec.notes)
    _paired_verdicts(out, comp.spec.verdict.alpha)
    headline(comp.spec, out, n_boot, seed)
    anchored = out["headline_scores"].get("overall", {})
    for n, c in comp.candidates.items():
        es = list(entries[n].values())
        counters = {k: sum(e["counters"][k] for e in es) for k in es[0]["counters"]}
        desc = describe(c)
        desc.update(
            source=n in comp.sources,
            group=next((c.group for c in comp.spec.candidates if c.name == n), None),  # the report lists by group
            cost=summarize(tuple(es[0]["params"]), counters, max(e.get("peak_memory_bytes", 0) for e in es)),
            quality=anchored.get(n),  # the headline score (None when it cannot be computed)
            quality_relative=sum(norm[s][n] for s in norm) / len(norm),
            routing={e["suite"]: e["routing"] for e in es if e.get("routing")},
            cached=all((n, s.name) not in comp.evaluated for s in comp.suites),
        )
        out["candidates"][n] = desc
    return out
