"""The cache-first evaluation loop: each (candidate, suite) pair is evaluated only when the result
cache lacks it, written to the cache as soon as it is done (an interrupted run resumes there)."""

from __future__ import annotations

import time

import torch
from rich.console import Console

from merge_lab.core.progress import progress_bar
from merge_lab.evaluation.cost import PeakMemory
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.prepare import Comparison


def evaluate(comp: Comparison, progress: bool = True, console: Console | None = None,
             routing: bool = True) -> dict[str, dict[str, dict]]:
    """Fill (candidate, suite) -> cache entry, evaluating only what the cache lacks (`routing`:
    also record an MoE's expert use, which the report plots; selection does without)."""
    console = console or Console(stderr=True)
    settings_key = comp.settings.key()
    entries: dict[str, dict[str, dict]] = {}
    reference_from_cache(comp, settings_key)
    with progress_bar(console, progress, eta=False) as bar:
        for name, cand in comp.candidates.items():
            entries[name] = {}
            todo = []
            for suite in comp.suites:
                key = comp.cache.key(cand.fingerprint(), suite.fingerprint(comp.ctx), settings_key)
                hit = comp.cache.get(key)
                if hit is not None:
                    entries[name][suite.name] = hit
                    bar.add_task(f"{name} · {suite.name} (cached)", total=1, completed=1)
                else:
                    todo.append((suite, key, bar.add_task(f"{name} · {suite.name}", total=None, start=False)))
            if not todo:
                continue
            with PeakMemory(comp.settings.device) as mem:
                cand.load()
                params = cand.params()
                fresh = []
                for suite, key, task in todo:
                    bar.start_task(task)
                    cand.on_progress = lambda done, total, task=task: bar.update(task, completed=done, total=total)
                    torch.manual_seed(comp.settings.seed)
                    before = cand.counters.as_dict()
                    t0 = time.perf_counter()
                    records = suite.evaluate(cand, comp.ctx)
                    after = cand.counters.as_dict()
                    entry = {
                        "candidate": name, "suite": suite.name, "records": records,
                        "seconds": time.perf_counter() - t0, "params": list(params),
                        "counters": {k: after[k] - before[k] for k in after},
                        "routing": cand.routing(suite.routing_texts(cand)) if routing and cand.is_moe else None,
                        "peak_memory_bytes": mem.peak_bytes,
                    }
                    comp.cache.put(key, entry)  # at once: an interrupted run resumes from here
                    fresh.append((key, entry))
                    comp.evaluated.append((name, suite.name))
                    bar.update(task, completed=len(records), total=len(records))
                cand.on_progress = None
            for key, entry in fresh:  # the peak over the whole candidate run, for every entry
                entry["peak_memory_bytes"] = mem.peak_bytes
                comp.cache.put(key, entry)
                entries[name][entry["suite"]] = entry
            if comp.ctx.reference is not cand and not is_judge(comp, cand):
                cand.unload()
    reference_to_cache(comp, settings_key)
    return entries


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
