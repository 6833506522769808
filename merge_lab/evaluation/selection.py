"""`choose:`: config.json values of a checkpoint candidate tried on the selection split.

Every combination of the values is evaluated on the selection split's suites (never the split the
report evaluates on); the best on the mean of the objectives (as the headline ranks) replaces the
candidate everywhere it takes part, and the report says what was tried, what won, on which items.
"""

from __future__ import annotations

import itertools

from rich.console import Console

from merge_lab.evaluation.aggregate import aggregate, objective_means
from merge_lab.evaluation.prepare import Comparison
from merge_lab.evaluation.processes import current
from merge_lab.evaluation.run import evaluate


def select(comp: Comparison, progress: bool = True, console: Console | None = None) -> dict[str, dict]:
    """For each candidate with `choose:`, keep the best variant (the first listed wins a tie) and
    put it in the comparison in the candidate's place. Returns what was tried, for the report."""
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
        sub = Comparison(comp.spec, comp.root, comp.output, comp.settings, comp.selection_suites, variants, [],
                         comp.ctx, comp.cache, comp.memo)
        objectives = aggregate(sub, evaluate(sub, progress, console, routing=False), full=False)["objectives"]
        picked, means = objective_means(objectives)
        best = max(variants, key=lambda n: means[n])
        comp.replace(cand, variants[best])
        chosen[spec.name] = {
            "split": comp.spec.selection.split,
            "n": {x.name: len(x.items()) for x in comp.selection_suites},
            "ids": {x.name: [e.id for e in x.items()] for x in comp.selection_suites},
            "objectives": picked,
            "tried": [{"values": combo, "mean": means[n]} for combo, n in zip(combos, variants)],
            "chosen": combos[list(variants).index(best)],
        }
    return chosen
