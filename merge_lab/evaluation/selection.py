"""What is chosen on the selection split, never on the split the report evaluates on:

- `choose:`: config.json values of a checkpoint candidate; every combination is evaluated and the
  best replaces the candidate everywhere it takes part;
- `choose_as: other`: the values `other`'s `choose:` picked, nothing tried (an ablation that must
  differ from `other` in its training only);
- `merge_then_train:` with several merges: the merge it is trained from.

Best means the highest selection score (headline.selection_scores): the reference-anchored headline
score on the verdict's references (evaluated on the selection suites too, cached like the rest), or,
with no references, the mean raw suite score per objective averaged over the objectives. Neither
depends on the other variants tried; the first listed wins a tie. The report says what was tried,
what each scored, by which score, what won, on which items.
"""

from __future__ import annotations

import itertools
from typing import Any

from rich.console import Console

from merge_lab.evaluation.aggregate import aggregate
from merge_lab.evaluation.headline import selection_scores
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.prepare import Comparison
from merge_lab.evaluation.processes import current
from merge_lab.evaluation.run import evaluate
from merge_lab.evaluation.spec import references


def best_on_selection(comp: Comparison, tried: dict[str, Candidate], progress: bool = True,
                      console: Console | None = None) -> tuple[str, dict[str, Any]]:
    """The name of the best of `tried` on the selection suites and the scores it was chosen by
    (selection_scores: which score, its definition, each variant's score and per-objective scores)."""
    refs = references(comp.spec)
    anchors = {n: comp.candidates[n] for n in ((refs.base, *refs.sources) if refs else ()) if n not in tried}
    sub = Comparison(comp.spec, comp.root, comp.output, comp.settings, comp.selection_suites, {**anchors, **tried}, [],
                     comp.ctx, comp.cache, comp.memo)
    results = aggregate(sub, evaluate(sub, progress, console, routing=False), full=False)
    scored = selection_scores(results, refs, list(tried), comp.settings.bootstrap, comp.settings.seed)
    scores = scored["scores"]
    return max(tried, key=lambda n: scores[n]), scored


def _record(comp: Comparison, scored: dict[str, Any], names: list[str], tried: list[dict], chosen: dict) -> dict:
    return {
        "split": comp.spec.selection.split,
        "n": {x.name: len(x.items()) for x in comp.selection_suites},
        "ids": {x.name: [e.id for e in x.items()] for x in comp.selection_suites},
        "score": {k: v for k, v in scored.items() if k not in ("scores", "per_objective", "intervals")},
        "objectives": scored["objectives"],
        "tried": [{"values": v, "score": scored["scores"][n], "per_objective": scored["per_objective"][n],
                   **({"interval": scored["intervals"][n]} if "intervals" in scored else {})}
                  for n, v in zip(names, tried)],
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
        best, scored = best_on_selection(comp, variants, progress, console)
        comp.replace(cand, variants[best])
        chosen[spec.name] = _record(comp, scored, list(variants), combos, combos[list(variants).index(best)])
    for spec in comp.spec.candidates:  # after every `choose:`: the values they picked
        if spec.choose_as is None:
            continue
        cand, combo = comp.candidates[spec.name], chosen[spec.choose_as]["chosen"]
        variant = current().main_first(lambda cand=cand, combo=combo: cand.variant(combo, comp.cache.root))
        comp.replace(cand, variant)
        chosen[spec.name] = {"split": comp.spec.selection.split, "chosen": combo, "as": spec.choose_as}
    for spec in comp.spec.candidates:
        if spec.merge_then_train is None or not spec.selects:
            continue
        cand = comp.candidates[spec.name]
        merges = {m.name: m for m in cand.merges}
        best, scored = best_on_selection(comp, merges, progress, console)
        cand.choose_merge(merges[best])
        chosen[spec.name] = _record(comp, scored, list(merges), [{"merge": n} for n in merges], {"merge": best})
    return chosen
