"""`make demo` / `merge-lab demo`: the recipes in merge_lab/demo/recipes/, in order, end to end on a real model.

Each step is an ordinary recipe a user can copy and run alone (the header of each file says how);
the demo only adds what a pipeline needs around them:
- the base: the shipped SmolLM2-135M-Instruct, converted once into the cache and linked at
  OUT/base (or any base given with --base);
- profiles: QUICK (minutes), default, THOROUGH (hours on 2 cores) override a few numbers (steps,
  suite sizes); the recipes as actually run are written to OUT/recipes/;
- reuse: a step whose effective recipe and inputs are unchanged is not run again (--fresh redoes all);
- an overall ETA from per-step estimates, corrected by how fast this machine has been so far;
- a manifest (OUT/manifest.json, copied beside the report) listing by source and index the items
  each expert trained on and each suite evaluated, checked to be disjoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from merge_lab.demo.manifest import write_manifest
from merge_lab.errors import MergeLabError

# package data, so a non-editable install has the demo too
DEMO_RECIPES = Path(__file__).resolve().parent / "recipes"
DEFAULT_OUT = Path("runs/demo")
# how the shipped recipes spell the demo folder (from the working directory)
PREFIXES = ("runs/demo/",)


@dataclass(frozen=True)
class Step:
    recipe: str  # file name in DEMO_RECIPES
    kind: str  # align | merge | fuse | assemble (a fuse recipe's MoE, untrained) | compare
    out: str  # output folder, relative to the demo folder

    @property
    def profile_kind(self) -> str:
        """Whose profile overrides apply: an assembly is a fusion's first half, so the fusion's (same rows)."""
        return "fuse" if self.kind == "assemble" else self.kind


STEPS = (
    Step("01_align_helpful.yaml", "align", "experts/helpful"),
    Step("02_align_harmless.yaml", "align", "experts/harmless"),
    Step("03_align_honest.yaml", "align", "experts/honest"),
    Step("04_merge_linear.yaml", "merge", "merges/linear"),
    Step("06_merge_ties.yaml", "merge", "merges/ties"),
    Step("08_fuse_h3_moe.yaml", "fuse", "fused/h3_moe"),
    # the fusion's ablations: routers at initialisation only, routers trained alone (experts frozen)
    Step("08_fuse_h3_moe_init_only.yaml", "assemble", "fused/h3_moe_init_only"),
    Step("08_fuse_h3_moe_router_only.yaml", "fuse", "fused/h3_moe_router_only"),
    Step("09_compare.yaml", "compare", "report"),
)

# Per-kind overrides, merged into each recipe (dicts merge key by key; `data_limit` caps every
# data block of align and fuse recipes). The default profile runs the recipes as shipped.
PROFILES: dict[str, dict[str, dict]] = {
    "quick": {
        "align": {"train": {"steps": 6, "batch_size": 4, "max_tokens": 64}, "lora": {"layers": 4}, "data_limit": 40},
        "fuse": {"train": {"steps": 3, "batch_size": 4, "max_length": 64, "eval_rows": 12}, "data_limit": 12},
        # one suite per objective in distribution and one out of distribution (the headline's basis), 5 items
        # each (harmless_ood: 3 harmful + 3 ordinary requests): a smoke run (6 items took 5:01 with make)
        "compare": {"settings": {"limit": 5, "max_new_tokens": 16, "max_length": 256}, "selection": {"limit": 4},
                    "suites": ["harmless_refusal", "honest_truefalse", "helpful_likelihood",
                               {"name": "harmless_ood", "limit": 6}, "helpful_likelihood_ood", "honest_factual_ood"]},
    },
    "default": {},
    "thorough": {
        # two passes over each expert's rows (60-118 steps): 200 steps, 3-7 passes, drove the helpful
        # expert's training loss to 0.01 on its 240 rows (memorised, not aligned)
        "align": {"train": {"steps": None, "epochs": 2, "max_tokens": 192}, "lora": {"layers": None}},
        "fuse": {"train": {"steps": 55, "eval_rows": 96}},  # two passes over its 221 labelled rows, batch 8
        "compare": {"settings": {"limit": 260, "max_new_tokens": 48}, "selection": {"limit": 64},
                    # the broad suites: ~240 benign prompts, ~250 true/false pairs (the shipped test splits);
                    # then every objective out of distribution (the headline's suites): 120 prompts a side
                    # for refusals (two decoding passes), 160 reference answers, every held-out true/false pair
                    "suites": ["harmless_refusal", "harmless_overrefusal_broad", "helpful_likelihood", "helpful_winrate",
                               "honest_factual", "honest_truthfulqa", "honest_deceptive",
                               "capability_commonsenseqa",
                               {"name": "harmless_refusal_ood", "limit": 120},
                               {"name": "harmless_overrefusal_ordinary", "limit": 120},
                               {"name": "helpful_likelihood_ood", "limit": 160}, "honest_factual_ood"]},
    },
}

# Nominal seconds per step on 2 CPU cores, for the ETA before anything has been timed here
# (default: `make demo` on this project's idle 2 cores, 2026-12-02, 38 min: fuse is the mean of the
# fusion, 285 s, and its routers-alone ablation, 166 s; assemble takes the centroid rows the fusion
# computed in the same process; quick: `make demo QUICK=1` on the same idle cores, 2026-12-01,
# 13 min, fuse the mean of 57 and 27 s; thorough: `make demo THOROUGH=1` to the end on 2 idle AVX-512
# cores, 2026-12-07, 1 h 55 min: fuse the mean of 533 and 261 s, the experts 176-330 s).
NOMINAL = {
    "quick": {"base": 40, "align": 7, "merge": 8, "fuse": 42, "assemble": 4, "compare": 602},
    "default": {"base": 45, "align": 54, "merge": 9, "fuse": 226, "assemble": 5, "compare": 1604},
    "thorough": {"base": 21, "align": 244, "merge": 5, "fuse": 397, "assemble": 3, "compare": 5360},
}


@dataclass
class DemoResult:
    out: Path
    report: Path | None
    manifest: Path
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ recipes as run


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _relocate(value: Any, root: Path) -> Any:
    """Point the shipped recipes' runs/demo/... paths at the demo folder actually used."""
    if isinstance(value, str):
        for p in PREFIXES:
            if value.startswith(p) or value == p.rstrip("/"):
                return str(root / value[len(p):]) if value != p.rstrip("/") else str(root)
        return value
    if isinstance(value, list):
        return [_relocate(v, root) for v in value]
    if isinstance(value, dict):
        return {k: _relocate(v, root) for k, v in value.items()}
    return value


def effective_recipe(step: Step, source: Path, root: Path, overrides: dict, base: str | None) -> dict:
    """The recipe as the demo runs it: paths into `root`, profile overrides, the chosen base."""
    doc = yaml.safe_load(source.read_text())
    if not isinstance(doc, dict):
        raise MergeLabError(f"{source}: not a YAML mapping.")
    doc = _relocate(doc, root.resolve())
    over = copy.deepcopy(overrides.get(step.profile_kind, {}))
    limit = over.pop("data_limit", None)
    doc = deep_merge(doc, over)
    if limit is not None:
        blocks = doc["data"] if step.profile_kind == "align" else (doc.get("train") or {}).get("data")
        for block in blocks if isinstance(blocks, list) else []:
            block["limit"] = min(block.get("limit") or limit, limit)
    if step.kind == "align" and base is not None:
        doc["base_model"] = base
    return doc


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ running one step


def _run_align(path: Path, out: Path, console: Console, progress: bool) -> None:
    from merge_lab.training.align import align

    align(path, out, force=True, progress=progress, console=console)


def _run_merge(path: Path, out: Path, console: Console, progress: bool) -> None:
    import torch

    from merge_lab.merge.engine import merge

    device = "cuda" if torch.cuda.is_available() else "cpu"
    merge(path, out, force=True, progress=progress, hash_inputs=False, device=device, console=console)


def _run_fuse(path: Path, out: Path, console: Console, progress: bool) -> None:
    from merge_lab.moe.pipeline import fuse

    fuse(path, out, force=True, progress=progress, console=console)


def _run_compare(path: Path, out: Path, console: Console, progress: bool) -> None:
    from merge_lab.evaluation.compare import run_compare

    run_compare(path, out, progress=progress, console=console)


RUNNERS: dict[str, Callable[[Path, Path, Console, bool], None]] = {
    "align": _run_align, "merge": _run_merge, "fuse": _run_fuse, "assemble": _run_merge, "compare": _run_compare,
}


def _gpu_overrides() -> dict:
    """Evaluate on the GPU when there is one (align and fuse pick it up by themselves)."""
    import torch

    return {"compare": {"settings": {"device": "cuda"}}} if torch.cuda.is_available() else {}


# ------------------------------------------------------------------ base, ETA


def prepare_base(root: Path, base: str | None) -> Path:
    """Resolve the base (converting the shipped GGUF on first use) and link it at root/base."""
    from merge_lab.core.bases import resolve_base

    target = resolve_base(base or "smollm2").resolve()
    link = root / "base"
    if link.is_symlink() or link.exists():
        if link.is_symlink() and link.resolve() == target:
            return link
        if link.is_symlink() or link.is_file():
            link.unlink()
        else:
            shutil.rmtree(link)
    root.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link, target_is_directory=True)
    return link


class Eta:
    """Remaining time: nominal estimates per step, scaled by actual/nominal of the steps timed so far."""

    def __init__(self, estimates: list[float]):
        self.estimates = estimates
        self.done_nominal = 0.0
        self.done_actual = 0.0

    def finished(self, i: int, seconds: float, reused: bool) -> None:
        if not reused:
            self.done_nominal += self.estimates[i]
            self.done_actual += seconds
        self.estimates[i] = 0.0

    def remaining(self) -> float:
        scale = self.done_actual / self.done_nominal if self.done_nominal > 0 else 1.0
        return sum(self.estimates) * scale


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


# ------------------------------------------------------------------ the pipeline


def _quiet_libraries() -> None:
    """The demo shows one progress line per step and our own bars: transformers' per-load and per-save
    bars and its deprecation notices about its own internals would bury them."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")


@dataclass
class DemoRun:
    """What `setup` settles before the first step: folders, recipes, overrides, the base, the clock."""

    root: Path
    src: Path
    profile: str
    fresh: bool
    overrides: dict
    steps: list[Step]
    base_link: Path
    base_arg: str | None  # the base the align recipes are pointed at (None: as shipped)
    eta: Eta
    started: float
    console: Console
    progress: bool
    redone: set[str] = field(default_factory=set)  # outputs rebuilt in this run: their users are redone too


def setup(out: str | Path, profile: str, fresh: bool, base: str | None, recipes: str | Path | None,
          overrides: dict | None, only: list[str] | None, progress: bool, console: Console) -> DemoRun:
    """Check the profile and the recipes, make the folders, resolve and link the base."""
    if profile not in PROFILES:
        raise MergeLabError(f"unknown profile '{profile}'; use one of {', '.join(PROFILES)}.")
    root = Path(out)
    src = Path(recipes) if recipes is not None else DEMO_RECIPES
    missing = [s.recipe for s in STEPS if not (src / s.recipe).is_file()]
    if missing:
        raise MergeLabError(f"{src}: demo recipes missing: {', '.join(missing)}.")
    over = deep_merge(PROFILES[profile], _gpu_overrides())
    over = deep_merge(over, overrides or {})
    steps = [s for s in STEPS if only is None or s.kind in only or s.recipe in only]
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    (root / ".steps").mkdir(exist_ok=True)
    nominal = NOMINAL[profile]
    eta = Eta([nominal["base"]] + [nominal[s.kind] for s in steps])
    started = time.perf_counter()
    _quiet_libraries()
    console.rule(f"[bold]merge_lab demo[/bold] — profile {profile}, output {root}")

    t = time.perf_counter()
    base_link = prepare_base(root, base)
    base_arg = str(base_link.resolve()) if base is not None else None
    eta.finished(0, time.perf_counter() - t, reused=time.perf_counter() - t < 5)
    console.print(f"base: {base_link} -> {base_link.resolve()}")
    return DemoRun(root, src, profile, fresh, over, steps, base_link, base_arg, eta, started, console, progress)


def run_step(run: DemoRun, i: int, step: Step, result: DemoResult) -> None:
    """Write step i's recipe as run; reuse its output when recipe and inputs are unchanged, else run it."""
    root, console = run.root, run.console
    name = Path(step.recipe).stem
    doc = effective_recipe(step, run.src / step.recipe, root, run.overrides, run.base_arg)
    text = yaml.safe_dump(doc, sort_keys=False)
    run_path = root / "recipes" / step.recipe
    run_path.write_text(f"# as run by the demo (profile {run.profile}); source: merge_lab/demo/recipes/{step.recipe}\n" + text)
    target = root / step.out
    stamp = root / ".steps" / f"{name}.json"
    key = {"recipe": _hash(text), "base": str(run.base_link.resolve())}
    upstream_redone = any(str((root / o).resolve()) in text for o in run.redone)
    header = (f"[bold][{i}/{len(run.steps)}] {step.kind} {name}[/bold]  elapsed {_fmt(time.perf_counter() - run.started)}, "
              f"overall ETA {_fmt(run.eta.remaining())}")
    if (not run.fresh and not upstream_redone and target.exists() and stamp.is_file()
            and json.loads(stamp.read_text()).get("key") == key):
        console.print(f"{header}  [green]reused[/green] {target}")
        result.reused.append(name)
        run.eta.finished(i, 0.0, reused=True)
        return
    console.print(header)
    if run.fresh and target.exists():  # redo means from nothing: no cached comparison results either
        shutil.rmtree(target)
    t = time.perf_counter()
    RUNNERS[step.kind](run_path, target, console, run.progress)
    seconds = time.perf_counter() - t
    stamp.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "profile": run.profile}) + "\n")
    result.ran.append(name)
    result.seconds[name] = round(seconds, 1)
    run.redone.add(step.out)
    run.eta.finished(i, seconds, reused=False)
    console.print(f"  done in {_fmt(seconds)}")


def finish(run: DemoRun, result: DemoResult) -> DemoResult:
    """The manifest (checked disjoint) and timings.json, once every step is done."""
    root = run.root
    report = root / "report"
    result.report = report if (report / "results.json").is_file() else None
    result.manifest = write_manifest(root, run.profile, run.base_link, result.report, STEPS)
    total = time.perf_counter() - run.started
    (root / "timings.json").write_text(json.dumps({"profile": run.profile, "total_seconds": round(total, 1),
                                                  "steps": result.seconds, "reused": result.reused}, indent=1) + "\n")
    run.console.rule(f"demo finished in {_fmt(total)}")
    return result


def run_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    profile: str = "default",
    fresh: bool = False,
    base: str | None = None,
    recipes: str | Path | None = None,
    overrides: dict | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo's recipes in order into `out`, reusing steps already done unless `fresh`."""
    run = setup(out, profile, fresh, base, recipes, overrides, only, progress, console or Console(stderr=True))
    result = DemoResult(run.root, None, run.root / "manifest.json")
    for i, step in enumerate(run.steps, 1):
        run_step(run, i, step, result)
    return finish(run, result)
