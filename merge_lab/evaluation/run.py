"""The cache-first evaluation loop: each (candidate, suite) pair is evaluated only when the result
cache lacks it, written to the cache as soon as it is done (an interrupted run resumes there).

Under `accelerate launch` every process runs this loop in step (processes.py): the main process
reads the cache and its answer holds for all, each process scores and generates its share of the
batches, every process ends with every entry (so `choose:` decides the same everywhere), and only
the main process writes the cache; token counts are summed over the processes, peak memory is the
largest one process reached."""

from __future__ import annotations

import time

import torch
from rich.console import Console

from merge_lab.core.progress import progress_bar
from merge_lab.evaluation.cost import PeakMemory
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.prepare import Comparison
from merge_lab.evaluation.processes import current


def evaluate(comp: Comparison, progress: bool = True, console: Console | None = None,
             routing: bool = True) -> dict[str, dict[str, dict]]:
    """Fill (candidate, suite) -> cache entry, evaluating only what the cache lacks (`routing`:
    also record an MoE's expert use over the suite's rows, which the report plots; selection does
    without)."""
    console = console or Console(stderr=True)
    procs = current()
    settings_key = comp.settings.key()
    entries: dict[str, dict[str, dict]] = {}
    if procs.main:
        reference_from_cache(comp, settings_key)
    comp.ctx.known_answers.update(procs.from_main(lambda: comp.ctx.known_answers))
    if procs.world > 1:  # merged once, by the main process, before any process loads them
        procs.main_first(lambda: [m.model_paths() for m in helpers(comp)])
    with progress_bar(console, progress and procs.main, eta=False) as bar:
        for name, cand in comp.candidates.items():
            entries[name] = {}
            todo = []
            keys = [comp.cache.key(cand.fingerprint(), suite.fingerprint(comp.ctx), settings_key) for suite in comp.suites]
            hits = procs.from_main(lambda keys=keys: [comp.cache.get(key) for key in keys])
            for suite, key, hit in zip(comp.suites, keys, hits):
                if hit is not None:
                    entries[name][suite.name] = hit
                    bar.add_task(f"{name} · {suite.name} (cached)", total=1, completed=1)
                else:
                    todo.append((suite, key, bar.add_task(f"{name} · {suite.name}", total=None, start=False)))
            if not todo:
                continue
            with PeakMemory(comp.settings.device) as mem:
                if procs.world > 1 and getattr(cand, "made_by_all_processes", False):
                    cand.model_paths()  # a baseline: every process trains its share, the main one saves
                elif procs.world > 1:
                    procs.main_first(cand.model_paths)  # a recipe is merged into the cache once
                cand.load()
                params = cand.params()
                answer_ahead(cand, [suite for suite, _, _ in todo], bar)
                fresh = []
                for suite, key, task in todo:
                    bar.start_task(task)
                    cand.on_progress = lambda done, total, task=task: bar.update(task, completed=done, total=total)
                    torch.manual_seed(comp.settings.seed)
                    before = cand.counters.as_dict()
                    cand.start_routing()
                    t0 = time.perf_counter()
                    records = suite.evaluate(cand, comp.ctx)
                    routes = cand.routing_shares() if routing and cand.is_moe else None
                    after = cand.counters.as_dict()
                    spent = procs.all_gather({k: after[k] - before[k] for k in after})
                    entry = {
                        "candidate": name, "suite": suite.name, "records": records,
                        "seconds": time.perf_counter() - t0, "params": list(params),
                        "counters": {k: sum(c[k] for c in spent) for k in spent[0]},
                        "routing": routes,
                        "peak_memory_bytes": mem.peak_bytes,
                    }
                    if procs.main:
                        comp.cache.put(key, entry)  # at once: an interrupted run resumes from here
                    fresh.append((key, entry))
                    comp.evaluated.append((name, suite.name))
                    bar.update(task, completed=len(records), total=len(records))
                cand.on_progress = None
            peak = max(procs.all_gather(mem.peak_bytes))
            for key, entry in fresh:  # the peak over the whole candidate run, for every entry
                entry["peak_memory_bytes"] = peak
                if procs.main:
                    comp.cache.put(key, entry)
                entries[name][entry["suite"]] = entry
            if comp.ctx.reference is not cand and not is_judge(comp, cand):
                cand.unload()
    if procs.main:
        reference_to_cache(comp, settings_key)
    return entries


def answer_ahead(cand: Candidate, suites: list, bar) -> None:
    """Greedy answers to every prompt these suites will ask, decoded together and remembered
    before any suite runs: on a CPU a decoding step reads every weight once whatever the batch,
    so one pass over 48 prompts costs about half of three passes over 16 (spec.py). Each suite's
    own `generate` then finds its answers, with their tokens and seconds, in the memo. Nothing
    happens for fewer than two generating suites."""
    asking = [p for p in (s.greedy_prompts() for s in suites) if p]
    if len(asking) < 2:
        return
    prompts = list(dict.fromkeys(p for ps in asking for p in ps))
    task = bar.add_task(f"{cand.name} · greedy answers for {len(asking)} suites", total=len(prompts))
    cand.on_progress = lambda done, total: bar.update(task, completed=done, total=total)
    cand.generate(prompts)
    cand.on_progress = None
    bar.update(task, completed=len(prompts))


def helpers(comp: Comparison) -> list[Candidate]:
    """The judge and the reference: candidates other candidates' suites load (for their models)."""
    judge = getattr(comp.ctx.judge, "judge", None)
    return [c for c in (judge, comp.ctx.reference) if isinstance(c, Candidate)]


def is_judge(comp: Comparison, c: Candidate) -> bool:
    """Whether `c` is the comparison's judge (kept loaded: every win rate scores with it)."""
    return comp.ctx.judge is not None and getattr(comp.ctx.judge, "judge", None) is c


def reference_key(comp: Comparison, settings_key: dict) -> str | None:
    """The cache key of the reference candidate's answers (shared by every win-rate suite)."""
    if comp.ctx.reference is None:
        return None
    return comp.cache.key(comp.ctx.reference.fingerprint(), "reference-answers", settings_key)


def reference_from_cache(comp: Comparison, settings_key: dict) -> None:
    key = reference_key(comp, settings_key)
    hit = comp.cache.get(key) if key else None
    if hit:
        comp.ctx.known_answers.update(hit["answers"])


def reference_to_cache(comp: Comparison, settings_key: dict) -> None:
    key = reference_key(comp, settings_key)
    if key and comp.ctx.known_answers:
        comp.cache.put(key, {"answers": comp.ctx.known_answers})
