"""`merge-lab fuse`: assemble the MoE, train it, export it — one call.

Work happens in a hidden folder beside the output (`.<out>.fuse-work/`: the assembled MoE and
the training checkpoint); the output appears only when everything succeeded, and the work
folder is then removed. After an interruption, `--resume` reuses the assembled model and
continues from the last checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from merge_lab.errors import MergeLabError
from merge_lab.merge.card import recipe_text
from merge_lab.merge.engine import run_plan
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import Recipe, load_recipe


@dataclass
class FuseResult:
    path: Path | None  # None when training stopped early (resumable)
    steps_done: int
    accuracy_before: float
    accuracy_after: float
    last_terms: dict[str, float]
    notes: list[str]


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.fuse-work"


def fuse(recipe: str | Path | Recipe, out: str | Path, *, resume: bool = False, force: bool = False,
         progress: bool = True, stop_after: int | None = None, console=None) -> FuseResult:
    from merge_lab.moe.export import export_moe
    from merge_lab.moe.train import train, train_config, train_rows

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    if out.exists() and not force:
        raise MergeLabError(f"{out}: already exists. Choose another output folder or pass --force to replace it.")
    if recipe.merge_method != "h3_moe":
        raise MergeLabError(f"{recipe.where('merge_method')}: `fuse` runs h3_moe recipes; use `merge` for '{recipe.merge_method}'.")
    plan = make_plan(recipe)  # checks the train block too (once per recipe: train_config)
    if recipe.train is None:
        run_plan(plan, out, force=force, progress=progress, console=console)
        return FuseResult(out, 0, float("nan"), float("nan"), {}, plan.notes)
    cfg = train_config(recipe)
    rows = train_rows(recipe)  # read and check the data before writing anything
    work = work_dir(out)
    assembled = work / "moe"
    reuse = resume and (assembled / "config.json").exists()
    if reuse and (assembled / "merge_recipe.yaml").read_text() != recipe_text(plan):
        raise MergeLabError(f"{work}: was made from a different recipe; start again without --resume.")
    if not reuse:
        if work.exists():
            shutil.rmtree(work)
        run_plan(plan, assembled, force=True, progress=progress, console=console)
    result = train(assembled, cfg, work / "state", rows=rows, resume=resume, stop_after=stop_after,
                   progress=progress, console=console)
    last = result.history[-1] if result.history else {}
    notes = plan.notes + result.notes
    if not result.finished:
        return FuseResult(None, result.steps_done, result.accuracy_before, float("nan"), last, notes)
    path = export_moe(result.model, assembled, out, force=force, shard_size=recipe.shard_size,
                      card_extra=training_card(cfg, result.steps_done, result.accuracy_before,
                                               result.accuracy_after, last))
    shutil.rmtree(work, ignore_errors=True)
    return FuseResult(path, result.steps_done, result.accuracy_before, result.accuracy_after, last, notes)


def training_card(cfg, steps: int, before: float, after: float, last: dict[str, float]) -> str:
    """The model card's section on fusion training."""
    return (
        "\n## Fusion training\n\n"
        f"{steps} steps, trainable: {cfg.trainable}, lambda {cfg.gating_weight}, "
        f"gamma {cfg.drift_weight}, load balance {cfg.load_balance}, seed {cfg.seed}.\n"
        f"Routing accuracy on the training data: {before:.3f} before, {after:.3f} after.\n"
        f"Last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()) + "\n"
    )
