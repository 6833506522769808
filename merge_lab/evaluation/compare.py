"""`merge-lab compare compare.yaml`: every candidate on the same suites, then the report.

The one door of the evaluation room: `run_compare` checks the file (prepare.py), tries `choose:`
values on the selection split (selection.py), evaluates what the cache lacks (run.py), aggregates
(aggregate.py) and writes report.md, report.html and results.json (merge_lab.report). The file's
schema is in spec.py.

`choose:` tries config.json values of a checkpoint candidate on the selection split and keeps the
best on the reference-anchored headline score (the raw mean per objective without references;
selection.py); the report says what was tried, what each scored, what won, and on which items.

Relative paths count from the working directory (as in recipes), falling back to the compare
file's folder. Everything that can be wrong in the file (unknown suites, candidates that do not load, ensembles
whose tokenizers differ, overlap between training data and suites) is reported before any model
runs. Results are cached per (candidate, suite, settings) under `cache_dir` (default:
OUTPUT/cache), so adding a candidate evaluates only that one.

`accelerate launch -m merge_lab compare compare.yaml` splits every suite's scoring and generation
over the processes (processes.py); each process gets every per-example result, and the main process
alone writes the cache and the report, which are those of a one-process run apart from timings and
the `processes` count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from merge_lab.evaluation.aggregate import aggregate, headline
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.prepare import Comparison, prepare
from merge_lab.evaluation.processes import Processes, sharing
from merge_lab.evaluation.run import evaluate
from merge_lab.evaluation.selection import select
from merge_lab.evaluation.spec import CompareSpec, Settings, load_spec

__all__ = ["CompareResult", "CompareSpec", "Comparison", "Memo", "Settings", "aggregate", "evaluate", "headline",
           "load_spec", "prepare", "run_compare", "select"]


@dataclass
class CompareResult:
    output: Path
    results: dict
    evaluated: list[tuple[str, str]]
    files: list[Path]  # empty on the processes other than the main one, which write nothing
    processes: int = 1  # processes that shared the work (accelerate launch)
    main: bool = True  # whether this is the process that wrote the report


def run_compare(path: str | Path, output: str | Path | None = None, progress: bool = True,
                console: Console | None = None, memo: Memo | None = None) -> CompareResult:
    """Check, evaluate (cache first), aggregate and write report.md, report.html, results.json.
    `memo`: what models already computed, shared only with comparisons given the same one."""
    from merge_lab.report import write_report

    spec, _ = load_spec(path)
    procs = Processes.launched(cpu=spec.settings.device == "cpu")
    with sharing(procs):
        comp = procs.main_first(lambda: prepare(path, output, memo))  # an inline recipe is written once
        for note in comp.notes if procs.main else []:
            (console or Console(stderr=True)).print(f"note: {note}", highlight=False)
        chosen = select(comp, progress=progress, console=console)
        entries = evaluate(comp, progress=progress, console=console)
    results = aggregate(comp, entries)
    results["selection"] = chosen
    results["processes"] = procs.world
    files = write_report(results, comp.output) if procs.main else []
    procs.barrier()  # the report is complete before any process exits
    return CompareResult(comp.output, results, comp.evaluated, files, procs.world, procs.main)
