"""What is chosen on the selection split, never on the split the report evaluates on:

- `choose:`: config.json values of a checkpoint candidate; every combination is evaluated and the
  best replaces the candidate everywhere it takes part;
- `merge_then_train:` with several merges: the merge it is trained from.

Best means the highest mean of the objectives (as the headline ranks, scaled 0-1 across what was
tried), the first listed winning a tie; the report says what was tried, what won, on which items.
"""

from __future__ import annotations

import itertools

from rich.console import Console

from merge_lab.evaluation.aggregate import aggregate, objective_means
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.prepare import Comparison
from merge_lab.evaluation.processes import current
from merge_lab.evaluation.run import evaluate


def best_on_selection(comp: Comparison, tried: dict[str, Candidate], progress: bool = True,
                      console: Console | None = None) -> tuple[str, list[str], dict[str, float]]:
    """The name of the best of `tried` on the selection suites, the objectives averaged and each mean."""
    sub = Comparison(comp.spec, comp.root, comp.output, comp.settings, comp.selection_suites, tried, [],
                     comp.ctx, comp.cache, comp.memo)
    objectives = aggregate(sub, evaluate(sub, progress, console, routing=False), full=False)["objectives"]
    picked, means = objective_means(objectives)
    return max(tried, key=lambda n: means[n]), picked, means


def _record(comp: Comparison, picked: list[str], tried: list[dict], means: list[float], chosen: dict) -> dict:
    return {
        "split": comp.spec.selection.split,
        "n": {x.name: len(x.items()) for x in comp.selection_suites},
        "ids": {x.name: [e.id for e in x.items()] for x in comp.selection_suites},
        "objectives": picked,
        "tried": [{"values": v, "mean": m} for v, m in zip(tried, means)],
        "chosen": chosen,
    }


def select(comp: Comparison, progress: bool = True, console: Console | None = None) -> dict[str, dict]:
    """For each candidate with `choose:`, keep the best variant and put it in the comparison in the
    candidate's place; for each merge_then_train with several merges, choose the one it trains from.
    Returns what was tried, for the report."""
    chosen: dict[str, dict] = {}
    for spec in comp.spec.candidates:
        if not spec.choose:
            continue
        cand = comp.candidates[spec.name]
        keys = list(spec.choose)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.choose[k] for k in keys))]
        variants = current().main_first(  # under accelerate launch the main process writes the variant folders
            lambda cand=cand, spec=spec, combos=combos: {
                f"{spec.name} ({', '.join(f'{k}={v}' for k, v in combo.items())})": cand.variant(combo, comp.cache.root)
                for combo in combos})
        best, picked, means = best_on_selection(comp, variants, progress, console)
        comp.replace(cand, variants[best])
        chosen[spec.name] = _record(comp, picked, combos, [means[n] for n in variants], combos[list(variants).index(best)])
    for spec in comp.spec.candidates:
        if spec.merge_then_train is None or not spec.selects:
            continue
        cand = comp.candidates[spec.name]
        merges = {m.name: m for m in cand.merges}
        best, picked, means = best_on_selection(comp, merges, progress, console)
        cand.choose_merge(merges[best])
        chosen[spec.name] = _record(comp, picked, [{"merge": n} for n in merges], [means[n] for n in merges],
                                    {"merge": best})
    return chosen
