"""`merge-lab fuse`: assemble the MoE, train it, export it — one call.

Work happens in a hidden folder beside the output (`.<out>.fuse-work/`: the assembled MoE and
the training checkpoint); the output appears only when everything succeeded, and the work
folder is then removed. After an interruption, `--resume` reuses the assembled model and
continues from the last checkpoint.

Under `accelerate launch` every process runs this; only the main one assembles, saves
checkpoints, exports and writes the card, the others wait for it at each of those steps
(`wait_for_everyone`) and return without writing.
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
    processes: int = 1  # processes that trained (accelerate launch)
    per_process_batch: int = 0  # rows each took of every global batch
    main: bool = True  # the process that wrote the output (the one that reports)


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.fuse-work"


def fuse(recipe: str | Path | Recipe, out: str | Path, *, resume: bool = False, force: bool = False,
         progress: bool = True, stop_after: int | None = None, console=None) -> FuseResult:
    from merge_lab.core.distributed import launched, per_process_batch
    from merge_lab.moe.export import export_moe
    from merge_lab.moe.train import train
    from merge_lab.moe.train_config import train_config, train_rows

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out)
    if out.exists() and not force:
        raise MergeLabError(f"{out}: already exists. Choose another output folder or pass --force to replace it.")
    if recipe.merge_method != "h3_moe":
        raise MergeLabError(f"{recipe.where('merge_method')}: `fuse` runs h3_moe recipes; use `merge` for '{recipe.merge_method}'.")
    plan = make_plan(recipe)  # checks the train block too (once per recipe: train_config)
    cfg = train_config(recipe) if recipe.train is not None else None
    processes = launched(cfg.cpu if cfg else False)
    if recipe.train is None:
        if processes.is_main_process:
            run_plan(plan, out, force=force, progress=progress, console=console)
        processes.wait_for_everyone()
        return FuseResult(out, 0, float("nan"), float("nan"), {}, plan.notes, processes.num_processes,
                          main=processes.is_main_process)
    per_process_batch(cfg.batch_size, processes.num_processes, recipe.where("train", "batch_size"))
    rows = train_rows(recipe)  # read and check the data before writing anything
    work = work_dir(out)
    assembled = work / "moe"
    reuse = resume and (assembled / "config.json").exists()
    if reuse and (assembled / "merge_recipe.yaml").read_text() != recipe_text(plan):
        raise MergeLabError(f"{work}: was made from a different recipe; start again without --resume.")
    processes.wait_for_everyone()  # every process has checked the folders before the main one writes
    if not reuse and processes.is_main_process:
        if work.exists():
            shutil.rmtree(work)
        run_plan(plan, assembled, force=True, progress=progress, console=console)
    processes.wait_for_everyone()
    result = train(assembled, cfg, work / "state", rows=rows, resume=resume, stop_after=stop_after,
                   progress=progress, console=console)
    last = result.history[-1] if result.history else {}
    notes = plan.notes + result.notes
    shape = {"processes": result.processes, "per_process_batch": result.per_process_batch, "main": result.main}
    if not result.finished:
        processes.wait_for_everyone()  # the main process has saved the state
        return FuseResult(None, result.steps_done, result.accuracy_before, float("nan"), last, notes, **shape)
    path = out
    if result.main:
        path = export_moe(result.model, assembled, out, force=force, shard_size=recipe.shard_size,
                          inputs=[c.path for c in plan.inputs],
                   card_extra=training_card(cfg, result.steps_done, result.accuracy_before, result.accuracy_after,
                                            last, processes=result.processes))
        shutil.rmtree(work, ignore_errors=True)
    processes.wait_for_everyone()  # the output is complete before any process exits
    return FuseResult(path, result.steps_done, result.accuracy_before, result.accuracy_after, last, notes, **shape)


def training_card(cfg, steps: int, before: float, after: float, last: dict[str, float], *,
                  processes: int = 1) -> str:
    """The model card's section on fusion training."""
    return (
        "\n## Fusion training\n\n"
        f"{steps} steps, trainable: {cfg.trainable}, lambda {cfg.gating_weight}, "
        f"gamma {cfg.drift_weight}, load balance {cfg.load_balance}, seed {cfg.seed}.\n"
        f"Batch: {cfg.batch_size} rows per step, {processes_text(processes, cfg.batch_size)}.\n"
        f"Routing accuracy on the training data: {before:.3f} before, {after:.3f} after.\n"
        f"Last step: " + ", ".join(f"{k} {v:.4g}" for k, v in last.items()) + "\n"
    )


def processes_text(processes: int, batch_size: int) -> str:
    """'2 processes, 4 rows each': for the card and the summary."""
    if processes == 1:
        return "1 process"
    return f"{processes} processes, {batch_size // processes} rows each"
