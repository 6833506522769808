"""The words that open the report: the verdict block and the per-suite sentences, built only
from the tested results (merge_lab.evaluation.headline), so "better" and "worse" appear only
where a Holm-corrected test says so, always with the interval and n."""

from __future__ import annotations

from dataclasses import dataclass, field

from merge_lab.evaluation.resampling import NO_DIFFERENCE
from merge_lab.report.tables import Table, fmt

SCALE_WORDS = {"source": "{base} = 0, best source = 1", "z": "units of {base}'s per-item standard deviation above it"}


@dataclass
class Verdict:
    """The verdict block: a lead sentence, the comparison table (may be empty), plain points."""

    lead: str
    table: Table = field(default_factory=lambda: (["against", "candidate", "its score [95% CI]",
                                                   "difference [95% CI]", "p", "p (Holm)", "verdict", "n"], []))
    points: list[str] = field(default_factory=list)


def _ci(v: float | None, ci) -> str:
    return f"{fmt(v, 2)} [{fmt(ci[0], 2)}, {fmt(ci[1], 2)}]" if ci else fmt(v, 2)


def _scale(hs: dict) -> str:
    return f"{hs['scale']} scale: " + SCALE_WORDS[hs["scale"]].format(base=hs["base"])


def verdict(results: dict) -> Verdict:
    """What the report says first: the headline candidate, its score, each tested comparison."""
    hs, h = results.get("headline_scores", {}), results.get("headline")
    if "overall" not in hs:
        why = (h or {}).get("error") or hs.get("error", "no headline scores")
        return Verdict(f"No verdict: {why}.", points=_left_out(hs))
    objectives = ", ".join(hs["objectives"])
    if not h:
        ranked = sorted(hs["overall"].items(), key=lambda kv: -kv[1])
        return Verdict("No `headline:` candidate is declared, so nothing is tested here. Headline scores "
                       f"({_scale(hs)}; objectives {objectives}): "
                       + ", ".join(f"{n} {v:.2f}" for n, v in ranked) + ".", points=_left_out(hs))
    v = Verdict(f"{h['candidate']}: headline score {_ci(h['score'], h.get('score_ci'))} ({_scale(hs)}; "
                f"objectives {objectives}; 95% interval).")
    for c in h["comparisons"]:
        n = "/".join(str(x) for x in c["n"].values())
        v.table[1].append([c["what"], c["against"], _ci(c["against_score"], c["against_ci"]),
                           _ci(c["diff"], c["ci"]), fmt(c["p"], 3), fmt(c["p_holm"], 3), c["verdict"], n])
    v.points += [(f"{h['candidate']}: " if c["verdict"] == NO_DIFFERENCE else "") + c["sentence"] + "."
                 for c in h["comparisons"]]
    if msg := h.get("sample_size", {}).get("message"):
        v.points.append(msg[0].upper() + msg[1:])
    v.points += _left_out(hs) + [f"Note: {x}." for x in h.get("notes", [])]
    return v


def _left_out(hs: dict) -> list[str]:
    return _distribution(hs) + [f"Left out of the headline: {s}: {why}." for s, why in hs.get("excluded", {}).items()]


def _distribution(hs: dict) -> list[str]:
    """Which suites the headline is computed on, when the comparison has out-of-distribution ones."""
    if hs.get("distribution") != "out-of-distribution":
        return []
    shown = hs.get("in_distribution_shown") or []
    return [f"The headline uses the out-of-distribution suites only ({', '.join(hs.get('suites', [])) or 'none'}: "
            "items from sources no candidate trains on)"
            + (f"; the in-distribution ones ({', '.join(shown)}) test held-out items of the training sources "
               "and are reported beside them." if shown else ".")]


def distribution_label(results: dict, suite: str) -> str:
    """"out of distribution" or "in distribution": the label the per-suite tables and sentences carry."""
    return "out of distribution" if results.get("suites", {}).get(suite, {}).get("ood") else "in distribution"


def suite_sentences(results: dict) -> list[str]:
    """Per suite: the best candidate against the runner-up, Holm-corrected over the suites; each
    suite labelled in or out of distribution when the comparison has out-of-distribution ones."""
    lines = []
    ood = any(i.get("ood") for i in results.get("suites", {}).values())
    for name, b in results["best"].items():
        s = f"{name} ({distribution_label(results, name)})" if ood else name
        if name in results.get("non_separating", {}):
            lines.append(f"{s}: {results['non_separating'][name]}.")
        elif "runner_up" not in b:
            lines.append(f"{s}: only {b['candidate']} was evaluated.")
        elif b["diff"] == 0 and list(b["ci"]) == [0, 0]:
            lines.append(f"{s}: {b['candidate']} and {b['runner_up']} tie (identical per-example scores, n = {b['n']}).")
        else:
            tail = (f"{b['diff']:+.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}] "
                    f"(p = {b.get('p_holm', b['p']):.2g}, Holm-corrected over {b.get('tests', 1)} suites, n = {b['n']})")
            if b.get("verdict", NO_DIFFERENCE) == NO_DIFFERENCE:
                lines.append(f"{s}: best is {b['candidate']}, no significant difference from {b['runner_up']}: {tail}.")
            else:
                lines.append(f"{s}: best is {b['candidate']}, significantly ahead of {b['runner_up']}: {tail}.")
    return lines


def definition(results: dict) -> str | None:
    """The one paragraph that says what the headline score is."""
    return results.get("headline_scores", {}).get("definition")
