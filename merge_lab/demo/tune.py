"""`python -m merge_lab.demo.tune`: choose the demo's expert and fusion settings on validation items only.

Each variant in a tuning file (merge_lab/demo/tuning.yaml) changes the shipped demo recipes: an
expert's data mix, or the fusion's top-k, trainable parts, lambda, gamma, steps and rows. Every
variant is trained at the file's budget (per-kind overrides, as a demo profile's), then all of them
are scored in one comparison on the *validation* split, in-distribution and out-of-distribution
suites alike, never on the 'test' split the demo's report evaluates on (the held-out sources split
0/20/80, so their validation items are theirs alone). Variants whose experts are the same share
them. The score that chooses is the verdict's headline score on the out-of-distribution suites
(headline.selection_scores), on the z scale by default: per suite, the difference from the base in
units of the base's per-item spread, averaged per objective, then over the objectives; it depends on
nothing but the variant and the base. The reference experts (the first variant's) are scored beside
them for context (and anchor the `scale: source` option). The table (TUNING.md) shows every
variant's score with its interval, the chosen one's paired difference from each, and the sizes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console

from merge_lab.core.config import load_yaml
from merge_lab.demo.pipeline import DEMO_RECIPES, STEPS, deep_merge, effective_recipe, run_demo
from merge_lab.errors import MergeLabError

TUNING_FILE = Path(__file__).resolve().parent / "tuning.yaml"
FUSE_STEP = next(s for s in STEPS if s.recipe == "08_fuse_h3_moe.yaml")
ALIGN_RECIPES = tuple(s.recipe for s in STEPS if s.kind == "align")
EXPERT_LABELS = tuple(Path(s.out).name for s in STEPS if s.kind == "align")


class Evaluation(BaseModel):
    """What every variant is scored on: suites on the validation split, small sizes."""

    model_config = ConfigDict(extra="forbid")
    suites: list[str | dict[str, Any]] = Field(min_length=1)
    limit: int = Field(16, ge=1, description="items per suite (a suite entry's own limit wins)")
    max_new_tokens: int = Field(16, ge=1)
    max_length: int = Field(256, ge=16)
    bootstrap: int = Field(1000, ge=10)
    # z: each suite in units of the base's per-item spread (needs no source model to differ from the
    # base: at a tuning budget the experts often score as the base does, and the source scale then has
    # no width on that suite and drops it); source: base = 0, best reference expert = 1 (the verdict's)
    scale: Literal["z", "source"] = "z"


class Variant(BaseModel):
    """One setting to try: overrides of the shipped recipes (dicts merge key by key, lists are replaced)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9_]+$")
    why: str = Field(description="what it changes and what it tests, for the table")
    experts: dict[str, dict[str, Any]] = Field({}, description="align recipe file name -> overrides")
    fuse: dict[str, Any] = Field({}, description="overrides of 08_fuse_h3_moe.yaml")


class TuningSpec(BaseModel):
    """A tuning file: the training budget, the evaluation, the variants (the first is the reference)."""

    model_config = ConfigDict(extra="forbid")
    budget: dict[str, dict[str, Any]] = Field({}, description="per-kind overrides (align, fuse), as a demo profile's")
    evaluation: Evaluation
    variants: list[Variant] = Field(min_length=1)


@dataclass
class TuningResult:
    out: Path
    chosen: str
    table: Path
    scores: dict[str, Any]  # tuning.json's content


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def load_tuning(path: str | Path) -> TuningSpec:
    """The tuning file, checked: unique names, overrides only of the demo's align recipes."""
    spec, where = load_yaml(path, TuningSpec, "tuning file")
    for i, entry in enumerate(spec.evaluation.suites):
        if isinstance(entry, dict) and ({"split", "path"} & set(entry)):
            raise MergeLabError(f"{where('evaluation', 'suites', i)}: a tuning suite is a registered one on the "
                                "validation split: give neither `split` nor `path`.")
    names = [v.name for v in spec.variants]
    for i, v in enumerate(spec.variants):
        if names.index(v.name) != i:
            raise MergeLabError(f"{where('variants', i, 'name')}: variant '{v.name}' is listed twice.")
        for recipe in v.experts:
            if recipe not in ALIGN_RECIPES:
                raise MergeLabError(f"{where('variants', i, 'experts', recipe)}: '{recipe}' is not one of the demo's "
                                    f"expert recipes ({', '.join(ALIGN_RECIPES)}).")
    return spec


# ------------------------------------------------------------------ training


def build_experts(spec: TuningSpec, out: Path, base: str | None, progress: bool, console: Console) -> dict[str, Path]:
    """One demo folder per distinct expert mix (named after the first variant using it), experts
    trained by the demo's own steps at the budget; returns variant name -> its mix folder."""
    folders: dict[str, Path] = {}
    by_mix: dict[str, Path] = {}
    for v in spec.variants:
        mix = _digest(v.experts)
        if mix not in by_mix:
            root = out / "experts" / v.name
            src = root / "src"
            if src.exists():
                shutil.rmtree(src)
            shutil.copytree(DEMO_RECIPES, src)
            for recipe, over in v.experts.items():
                doc = deep_merge(yaml.safe_load((src / recipe).read_text()), over)
                (src / recipe).write_text(yaml.safe_dump(doc, sort_keys=False))
            run_demo(root, profile="default", base=base, recipes=src, overrides=spec.budget, only=["align"],
                     progress=progress, console=console)
            by_mix[mix] = root
        folders[v.name] = by_mix[mix]
    return folders


def build_fusion(spec: TuningSpec, v: Variant, root: Path, out: Path, progress: bool, console: Console) -> Path:
    """The variant's fused model from its mix's experts: the shipped fuse recipe with the budget and
    the variant's overrides; reused when that recipe is unchanged."""
    from merge_lab.moe.pipeline import fuse

    over = deep_merge(spec.budget, {"fuse": v.fuse})
    doc = effective_recipe(FUSE_STEP, root / "src" / FUSE_STEP.recipe, root, over, None)
    text = yaml.safe_dump(doc, sort_keys=False)
    folder = out / "fusions" / v.name
    recipe, stamp = folder.with_suffix(".yaml"), folder.with_suffix(".key")
    folder.parent.mkdir(parents=True, exist_ok=True)
    experts = [(root / ".steps" / f"{Path(r).stem}.json").read_text() for r in ALIGN_RECIPES]  # retrained: redo
    key = _digest([text, str((root / "base").resolve()), experts])
    if folder.is_dir() and stamp.is_file() and stamp.read_text() == key:
        console.print(f"fusion {v.name}: reused {folder}")
        return folder
    recipe.write_text(text)
    console.print(f"fusion {v.name}: training")
    fuse(recipe, folder, force=True, progress=progress, console=console)
    stamp.write_text(key)
    return folder


# ------------------------------------------------------------------ scoring on validation


def compare_file(spec: TuningSpec, out: Path, reference_root: Path, fusions: dict[str, Path]) -> Path:
    """The comparison that scores every variant: the validation split, the base and the reference
    experts (the headline scale's anchors) and each variant's fused model."""
    import torch

    ev = spec.evaluation
    settings = {"split": "validation", "limit": ev.limit, "seed": 0, "max_new_tokens": ev.max_new_tokens,
                "max_length": ev.max_length, "bootstrap": ev.bootstrap,
                **({"device": "cuda"} if torch.cuda.is_available() else {})}
    candidates = [{"name": "base", "checkpoint": str(reference_root / "base")}]
    candidates += [{"name": f"expert_{x}", "checkpoint": str(reference_root / "experts" / x / "merged"), "source": True}
                   for x in EXPERT_LABELS]
    candidates += [{"name": n, "checkpoint": str(p)} for n, p in fusions.items()]
    doc = {"output": str(out / "report"), "settings": settings, "suites": ev.suites, "candidates": candidates,
           "verdict": {"base": "base", "scale": ev.scale}}
    path = out / "compare.yaml"
    path.write_text("# written by merge_lab.demo.tune: every variant on the validation split\n"
                    + yaml.safe_dump(doc, sort_keys=False))
    return path


def check_validation_only(results: dict[str, Any]) -> None:
    """Refuse to score when any evaluated item is not a validation item (proof, not convention)."""
    from merge_lab.datasets.sources import split_of

    wrong = sorted({r["id"] for per in results["per_example"].values() for recs in per.values() for r in recs
                    if split_of(r["id"]) != "validation"})
    if wrong:
        raise MergeLabError(f"the tuning comparison scored {len(wrong)} item(s) outside the validation split "
                            f"({', '.join(wrong[:5])}); settings must be chosen on validation items only.")


def only_suites(results: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """results restricted to `names` (suites info and per-example records)."""
    return {"suites": {s: results["suites"][s] for s in names},
            "per_example": {s: results["per_example"][s] for s in names}}


def score_variants(results: dict[str, Any], variants: list[str], n_boot: int, scale: str = "z") -> dict[str, Any]:
    """Per variant the out-of-distribution and in-distribution selection scores (with intervals),
    the chosen variant (best out of distribution; the first listed wins a tie) and its paired
    difference from every other variant (Holm over them)."""
    from merge_lab.evaluation.headline import held_out_suites, selection_scores
    from merge_lab.evaluation.resampling import suites_from_results
    from merge_lab.evaluation.spec import References
    from merge_lab.evaluation.verdict import compare_headline

    refs = References("base", tuple(f"expert_{x}" for x in EXPERT_LABELS), scale, 0.05, ())
    ood, in_dist = held_out_suites(results)
    if not ood:
        raise MergeLabError("the tuning file's evaluation has no out-of-distribution suite; the demo's verdict is "
                            "computed on those, so the choice must be too (add e.g. harmless_ood).")
    shown = [*refs.sources, *variants]
    scored = {"ood": selection_scores(only_suites(results, ood), refs, shown, n_boot),
              "in_distribution": selection_scores(only_suites(results, in_dist), refs, shown, n_boot) if in_dist else None}
    scores = scored["ood"]["scores"]
    chosen = max(variants, key=lambda n: scores[n])
    scored["chosen"] = chosen
    scored["n"] = {s: len(next(iter(results["per_example"][s].values()))) for s in results["suites"]}
    scored["means"] = {c: {s: sum(r["score"] for r in per[c]) / len(per[c]) for s, per in results["per_example"].items()}
                       for c in ["base", *shown]}
    scored["higher_is_better"] = {s: bool(info["higher_is_better"]) for s, info in results["suites"].items()}
    scored["ood_suites"], scored["in_distribution_suites"] = ood, in_dist
    others = [n for n in variants if n != chosen]
    if others and scored["ood"].get("kind") == "headline":
        suites = [s for s in suites_from_results(only_suites(results, ood)) if s.name in scored["ood"]["suites"]]
        v = compare_headline(suites, chosen, others, refs.base, refs.sources, refs.scale,
                             objectives=scored["ood"]["objectives"], n_boot=n_boot, seed=0)
        scored["chosen_against"] = {c.against: {"diff": c.diff, "ci": list(c.ci), "p_holm": c.p_holm,
                                                "verdict": c.verdict} for c in v.comparisons}
    return scored


# ------------------------------------------------------------------ the table


def _ci(scored: dict[str, Any] | None, name: str) -> str:
    if not scored:
        return "—"
    value = f"{scored['scores'][name]:.2f}"
    if "intervals" in scored:
        lo, hi = scored["intervals"][name]
        value += f" [{lo:.2f}, {hi:.2f}]"
    return value


def render_table(spec: TuningSpec, scored: dict[str, Any], command: str) -> str:
    """TUNING.md: how the settings were chosen, every variant's validation scores, the choice and why."""
    ood, ind = scored["ood"], scored["in_distribution"]
    sizes = ", ".join(f"{s} {n}" + (" (OOD)" if s in scored["ood_suites"] else "") for s, n in scored["n"].items())
    objectives = ood["objectives"]
    lines = [
        "# How the demo's settings were chosen",
        "",
        f"Written by `{command}` (merge_lab/demo/tune.py). Every variant below was trained at the tuning budget "
        f"`{json.dumps(spec.budget, sort_keys=True)}` and scored on the **validation** split only (items per suite: "
        f"{sizes}); no test-split score was computed, let alone looked at.",
        "",
        f"Choosing score: {ood['definition']} Out-of-distribution suites only: {', '.join(ood['suites'])}. "
        "The expert rows are the reference variant's experts (the first variant's mix), for context.",
        "",
        "| variant | what it changes | OOD score [95% CI] | " + " | ".join(f"OOD {o}" for o in objectives)
        + " | in-distribution score [95% CI] | chosen − this [95% CI], p (Holm) |",
        "|" + "---|" * (5 + len(objectives)),
    ]
    why = {v.name: v.why for v in spec.variants}
    against = scored.get("chosen_against", {})
    for name in [*(f"expert_{x}" for x in EXPERT_LABELS), *why]:
        per = ood["per_objective"][name]
        mark = f"**{name}** (chosen)" if name == scored["chosen"] else name
        diff = against.get(name)
        versus = (f"{diff['diff']:+.2f} [{diff['ci'][0]:.2f}, {diff['ci'][1]:.2f}], {diff['p_holm']:.3f}"
                  if diff else "—")
        lines.append(f"| {mark} | {why.get(name, 'reference expert')} | {_ci(ood, name)} | "
                     + " | ".join(f"{per[o]:.2f}" if o in per else "—" for o in objectives)
                     + f" | {_ci(ind, name)} | {versus} |")
    suites = list(scored["n"])
    lines += ["", "Mean item score per suite on the same validation items (↑/↓: higher/lower is better; OOD marked):", "",
              "| candidate | " + " | ".join(f"{s}{' (OOD)' if s in scored['ood_suites'] else ''} "
                                          f"{'↑' if scored['higher_is_better'][s] else '↓'} n={scored['n'][s]}"
                                          for s in suites) + " |",
              "|" + "---|" * (1 + len(suites))]
    lines += [f"| {c} | " + " | ".join(f"{scored['means'][c][s]:.3f}" for s in suites) + " |" for c in scored["means"]]
    chosen = scored["chosen"]
    first = spec.variants[0].name
    lines += ["", f"**Chosen: {chosen}**, the highest out-of-distribution validation score."]
    if chosen != first and first in against:
        d = against[first]
        lines.append(f"Against the reference variant ({first}) the difference is {d['diff']:+.2f} "
                     f"[{d['ci'][0]:.2f}, {d['ci'][1]:.2f}] (p = {d['p_holm']:.3f} after Holm): {d['verdict']}.")
    if against and all(d["verdict"] == "no significant difference" for d in against.values()):
        lines.append("No difference between variants is significant at these sizes: the choice follows the point "
                     "estimates and may not hold on more items.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the whole run


def tune(spec_path: str | Path = TUNING_FILE, out: str | Path = "runs/tune", *, base: str | None = None,
         table: str | Path | None = None, command: str = "python -m merge_lab.demo.tune", progress: bool = True,
         console: Console | None = None) -> TuningResult:
    """Train every variant, score them all on the validation split, write tuning.json and TUNING.md
    (also at `table` when given); returns the chosen variant."""
    from merge_lab.evaluation.compare import run_compare

    console = console or Console(stderr=True)
    spec = load_tuning(spec_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mixes = build_experts(spec, out, base, progress, console)
    fusions = {v.name: build_fusion(spec, v, mixes[v.name], out, progress, console) for v in spec.variants}
    path = compare_file(spec, out, mixes[spec.variants[0].name], fusions)
    results = run_compare(path, progress=progress, console=console).results
    check_validation_only(results)
    scored = score_variants(results, list(fusions), spec.evaluation.bootstrap, spec.evaluation.scale)
    (out / "tuning.json").write_text(json.dumps(scored, indent=1) + "\n")
    text = render_table(spec, scored, command)
    written = out / "TUNING.md"
    written.write_text(text)
    if table is not None:
        Path(table).write_text(text)
    console.print(f"chosen on validation: [bold]{scored['chosen']}[/bold]; table: {written}")
    return TuningResult(out, scored["chosen"], written, scored)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m merge_lab.demo.tune", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(TUNING_FILE), help="tuning file (default: the shipped tuning.yaml)")
    parser.add_argument("--out", default="runs/tune", help="work folder: experts, fusions, the validation report")
    parser.add_argument("--base", default=None, help="base checkpoint (default: the shipped SmolLM2)")
    parser.add_argument("--table", default=None, help="also write TUNING.md here (e.g. merge_lab/demo/TUNING.md)")
    args = parser.parse_args(argv)
    command = "python -m merge_lab.demo.tune" + (f" --table {args.table}" if args.table else "")
    try:
        tune(args.spec, args.out, base=args.base, table=args.table, command=command)
    except MergeLabError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
