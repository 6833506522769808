"""The engine: runs a Plan tensor by tensor into a ShardWriter.

Reading, computing and writing overlap: a loader thread turns the next task's memory-mapped
inputs into float32 while the current task computes, and a writer thread writes the previous
result. At most one task's inputs wait in each stage, so memory stays bound to a few tensors.
The engine sees files and never math; the strategies see tensors and never files.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from merge_lab.card import model_card, recipe_hash, recipe_text
from merge_lab.errors import MergeLabError
from merge_lab.plan import Plan, TensorTask, make_plan
from merge_lab.recipe import Recipe, load_recipe
from merge_lab.writer import ShardWriter, TensorSpec, parse_size

SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


@dataclass
class MergeResult:
    path: Path
    tensors: int
    bytes_written: int
    seconds: float


def _load(task: TensorTask, device: torch.device) -> list[torch.Tensor]:
    out = []
    for ckpt, name in task.inputs:
        t = ckpt.get(name)
        if t.dtype.is_floating_point:
            t = t.to(device=device, dtype=torch.float32, copy=True)
        else:
            t = t.to(device=device, copy=True)
        out.append(t)
    return out


def copy_side_files(source: Path | None, dest: Path) -> list[str]:
    copied = []
    if source is None:
        return copied
    for name in SIDE_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
            copied.append(name)
    return copied


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        DownloadColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def check_disk(plan: Plan, out: Path) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    need = plan.output_bytes
    if free < need * 1.02 + 64 * 2**20:
        raise MergeLabError(
            f"{out}: the merge writes {need / 1e9:.2f} GB but {parent} has only {free / 1e9:.2f} GB free. "
            "Free some space or choose another output folder."
        )


def run_plan(
    plan: Plan,
    out: str | Path,
    *,
    force: bool = False,
    shard_size: str | int | None = None,
    device: str = "cpu",
    progress: bool = True,
    hash_inputs: bool = True,
    console: Console | None = None,
) -> MergeResult:
    """Execute a plan into the folder `out` (built beside it, renamed into place when complete)."""
    out = Path(out)
    console = console or Console(stderr=True)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    check_disk(plan, out)
    specs = [TensorSpec(t.output, t.shape, t.dtype) for t in plan.tasks]
    shard_bytes = parse_size(shard_size if shard_size is not None else plan.recipe.shard_size)
    metadata = {"format": "pt", "merge_lab_recipe_sha256": recipe_hash(plan), "merge_lab_strategy": plan.strategy}
    start = time.perf_counter()
    written = 0
    with ShardWriter(out, specs, shard_bytes, metadata, force=force) as writer:
        with (
            _progress(console, progress) as bar,
            ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writer_pool,
        ):
            job = bar.add_task(f"{plan.strategy}", total=len(plan.tasks))
            pending_write: Future | None = None
            next_inputs: Future | None = reader.submit(_load, plan.tasks[0], dev) if plan.tasks else None
            for i, task in enumerate(plan.tasks):
                assert next_inputs is not None
                inputs = next_inputs.result()
                next_inputs = reader.submit(_load, plan.tasks[i + 1], dev) if i + 1 < len(plan.tasks) else None
                try:
                    result = task.compute(inputs)
                except MergeLabError:
                    raise
                except Exception as e:
                    raise MergeLabError(f"tensor '{task.output}': the strategy failed: {e}") from e
                del inputs
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer_pool.submit(writer.write, task.output, result)
                nbytes = task.numel * task.dtype.itemsize
                written += nbytes
                bar.update(job, advance=1, description=f"{plan.strategy} [dim]{task.output}[/dim]")
            if pending_write is not None:
                pending_write.result()
            bar.update(job, description=plan.strategy)
        (writer.folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
        copy_side_files(plan.side_files_from, writer.folder)
        hashes = {str(c.path): c.file_hashes() for c in plan.inputs} if hash_inputs else None
        (writer.folder / "README.md").write_text(model_card(plan, hashes))
        (writer.folder / "merge_recipe.yaml").write_text(recipe_text(plan))
        path = writer.finish()
    for c in plan.inputs:
        c.close()
    return MergeResult(path, len(plan.tasks), written, time.perf_counter() - start)


def merge(
    recipe: str | Path | Recipe,
    out: str | Path,
    **kwargs,
) -> MergeResult:
    """Plan and run a recipe: the one call behind `merge-lab merge`."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run_plan(make_plan(recipe), out, **kwargs)
