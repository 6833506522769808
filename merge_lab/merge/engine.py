"""The engine: runs a Plan tensor by tensor into a ShardWriter.

Reading, computing and writing overlap: a loader thread reads the next work unit's inputs
(converted to float32 straight from the memory-mapped page cache, into buffers the main thread
allocates) while the current one computes, and a writer thread writes the previous result at its
final offset. At most one unit waits in each stage.

A work unit is a whole tensor, or, for strategies that treat rows independently (elementwise
or row-wise math), a block of about CHUNK_ELEMENTS elements of rows. So for those strategies
peak memory is a few blocks whatever the model size: the 128k x 4096 embedding of a large
model costs what a small one does. Strategies that are elementwise once they know a few
whole-tensor statistics (TIES' top-k thresholds, slerp's angle) declare statistics passes
(Strategy.stats_passes): the tensor's row blocks are then read once per pass and folded into the
statistics (units that write nothing), then once more and merged with them in ctx.stats. Only
tensors whose vocabularies differ (`tokenizer: base`) still go whole to such strategies. The
engine sees files and never math; the strategies see tensors and never files.
"""

from __future__ import annotations

import ctypes
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import DownloadColumn, TextColumn

from merge_lab.core.progress import progress_bar
from merge_lab.core.writer import ShardWriter, TensorSpec, check_disk, copy_side_files, parse_size
from merge_lab.errors import MergeLabError
from merge_lab.merge.card import model_card, recipe_hash, recipe_text
from merge_lab.merge.interface import TensorContext
from merge_lab.merge.planner import Compute, Plan, TensorTask, _merge_group, make_plan
from merge_lab.merge.recipe import Recipe, load_recipe


@dataclass
class MergeResult:
    path: Path
    tensors: int
    bytes_written: int
    seconds: float


# Rows are processed in blocks of about this many elements (8 MB of float32 per input): small
# enough that the allocator reuses the blocks' memory instead of faulting in fresh pages for each
# (measured on the 0.5B linear benchmark: 5.5 s CPU at 2M elements, 7.5 s at 8M).
CHUNK_ELEMENTS = 2 * 2**20
# A unit whose float32 inputs exceed this is not read ahead while another computes, nor computed
# while a result is still being written: two whole embeddings in flight would double the peak.
PREFETCH_BYTES = 256 * 2**20

@dataclass(frozen=True)
class _StreamContext(TensorContext):
    """A TensorContext whose generators persist across a tensor's row blocks: block k continues
    the random stream where block k-1 stopped, so blocked and whole-tensor results are equal."""

    _generators: dict = field(default_factory=dict, compare=False, repr=False)

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator:
        key = (model_index, str(torch.device(device)))
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = super().generator(model_index, device)
        return g


@dataclass
class _Unit:
    """One step of the pipeline: the rows [start, stop) of a task's tensor, or all of it. A unit
    of a statistics pass computes None and writes nothing."""

    task: TensorTask
    rows: tuple[int, int] | None
    compute: Compute
    first_element: int = 0


class _Stream:
    """One tensor streamed in row blocks: its statistics, folded pass by pass, then its merge.
    Its units run in plan order on one thread, so they share this state without locks."""

    def __init__(self, task: TensorTask) -> None:
        self.strategy, self.params, self.model_params, ctx, self.has_base, _ = task.compute.args  # type: ignore[attr-defined]
        self.ctx = _StreamContext(ctx.name, ctx.role, ctx.seed, ctx.model_ids)
        self.passes = self.strategy.stats_passes(self.params, self.model_params)
        self.stats = None

    def fold(self, pass_index: int, last: bool, inputs: list[torch.Tensor]) -> None:
        base, tensors = (inputs[-1], inputs[:-1]) if self.has_base else (None, inputs)
        s, p, mp = self.strategy, self.params, self.model_params
        self.stats = s.fold_stats(pass_index, self.stats, tensors, base, p, mp, self.ctx)
        if last:
            self.stats = s.finish_stats(pass_index, self.stats, p, mp)
            if pass_index == self.passes - 1:  # generators stay shared: replace() keeps the dict
                self.ctx = replace(self.ctx, stats=self.stats)

    def merge(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return _merge_group(self.strategy, self.params, self.model_params, self.ctx, self.has_base, None, inputs)


def _streamable(task: TensorTask) -> bool:
    """Whether the task may run block by block: a tensor-wise merge by a row-separable strategy."""
    c = task.compute
    if not (isinstance(c, partial) and c.func is _merge_group and len(c.args) == 6 and not c.keywords):
        return False
    strategy, vocab_rows = c.args[0], c.args[5]
    return vocab_rows is None and strategy.row_separable


def block_rows(task: TensorTask, chunk: int | None = None) -> int | None:
    """Rows per work unit when the task is streamed in row blocks, else None (whole tensor)."""
    chunk = chunk or CHUNK_ELEMENTS
    rows = task.shape[0] if task.shape else 0
    if task.numel <= chunk or rows <= 1 or not all(c.info(n).shape == task.shape for c, n in task.inputs):
        return None
    if not _streamable(task):
        return None
    return max(1, chunk // (task.numel // rows))


def _units(tasks: list[TensorTask], chunk: int | None = None):
    """Split tasks into work units (lazily, in plan order)."""
    for task in tasks:
        step = block_rows(task, chunk)
        if step is None:
            yield _Unit(task, None, task.compute)
            continue
        rows, per_row = task.shape[0], task.numel // task.shape[0]
        stream = _Stream(task)
        blocks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        for p in range(stream.passes):
            for start, stop in blocks:
                yield _Unit(task, (start, stop), partial(stream.fold, p, stop == rows), start * per_row)
        for start, stop in blocks:
            yield _Unit(task, (start, stop), stream.merge, start * per_row)


def _input_bytes(unit: _Unit) -> int:
    n = unit.task.numel if unit.rows is None else unit.task.numel // unit.task.shape[0] * (unit.rows[1] - unit.rows[0])
    return 4 * n * len(unit.task.inputs)


def _load(unit: _Unit, device: torch.device, buffers: list[torch.Tensor | None]) -> list[torch.Tensor]:
    out = []
    for (ckpt, name), buf in zip(unit.task.inputs, buffers):
        t = ckpt.read(name, unit.rows, torch.float32, out=buf) if buf is not None else ckpt.read(name, unit.rows)
        out.append(t.to(device) if device.type != "cpu" else t)
    return out


def _prefetch(reader: ThreadPoolExecutor, unit: _Unit, device: torch.device) -> Future:
    """Start reading a unit's inputs on the reader thread, into float32 buffers allocated here.

    Allocated on the main thread, the blocks come from glibc's main heap, which (with
    _tune_malloc's thresholds) keeps freed blocks for the next unit; blocks malloc'ed on the
    reader thread live in its arena's 64 MB heaps, which glibc unmaps and maps again as units
    come and go, a page fault per 4 KiB each time."""
    buffers: list[torch.Tensor | None] = []
    for ckpt, name in unit.task.inputs:
        info = ckpt.info(name)
        if not info.dtype.is_floating_point:
            buffers.append(None)
            continue
        n = 1
        for d in info.shape[1:]:
            n *= d
        n *= (unit.rows[1] - unit.rows[0]) if unit.rows is not None else (info.shape[0] if info.shape else 1)
        buffers.append(torch.empty(n, dtype=torch.float32))
    return reader.submit(_load, unit, device, buffers)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def _tune_malloc() -> None:
    """Let glibc keep freed row blocks for reuse instead of returning them to the kernel.

    By default blocks of a few MB are mmap'ed and unmapped, or trimmed off the heap top, so
    every block faults in fresh zeroed pages. Serving allocations up to 32 MiB from the heap and
    trimming only above 256 MiB free (the most this lets the process keep) took the 0.5B
    linear merge from about 250k to about 60k page faults (sys time 2.5 s -> 1.5 s, at load 9).
    Process-wide and harmless elsewhere; a no-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no glibc (TypeError: Windows' CDLL(None))
        return
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 256 * 2**20)


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
    check_disk(plan.output_bytes, out)
    _tune_malloc()
    specs = [TensorSpec(t.output, t.shape, t.dtype) for t in plan.tasks]
    shard_bytes = parse_size(shard_size if shard_size is not None else plan.recipe.shard_size)
    metadata = {"format": "pt", "merge_lab_recipe_sha256": recipe_hash(plan), "merge_lab_strategy": plan.strategy}
    start = time.perf_counter()
    written = 0
    inputs = [*(c.path for c in plan.inputs), plan.side_files_from]
    with ShardWriter(out, specs, shard_bytes, metadata, force=force, inputs=inputs) as writer:
        copy_side_files(plan.side_files_from, writer.folder)  # checked before any tensor is read
        with (
            progress_bar(console, progress, DownloadColumn(), TextColumn("{task.fields[tensors]} tensors")) as bar,
            ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader,
            ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writer_pool,
        ):
            done = 0
            job = bar.add_task(plan.strategy, total=plan.output_bytes, tensors=f"0/{len(plan.tasks)}")
            pending_write: Future | None = None
            units = _units(plan.tasks)
            unit = next(units, None)
            next_inputs: Future | None = _prefetch(reader, unit, dev) if unit is not None else None
            while unit is not None:
                assert next_inputs is not None
                inputs = next_inputs.result()
                following = next(units, None)
                defer = following is not None and _input_bytes(following) > PREFETCH_BYTES
                next_inputs = _prefetch(reader, following, dev) if following is not None and not defer else None
                task = unit.task
                try:
                    result = unit.compute(inputs)
                except MergeLabError:
                    raise
                except Exception as e:
                    raise MergeLabError(f"tensor '{task.output}': the strategy failed: {e}") from e
                del inputs
                if result is None:  # a statistics pass: nothing to write
                    if defer:
                        if pending_write is not None:
                            pending_write.result()
                        next_inputs = _prefetch(reader, following, dev)
                    unit = following
                    continue
                if pending_write is not None:
                    pending_write.result()
                nbytes = result.numel() * task.dtype.itemsize
                written += nbytes
                pending_write = writer_pool.submit(writer.write_part, task.output, unit.first_element, result)
                del result
                if defer:
                    pending_write.result()
                    next_inputs = _prefetch(reader, following, dev)
                if unit.rows is None or unit.rows[1] == task.shape[0]:
                    done += 1
                bar.update(job, advance=nbytes, tensors=f"{done}/{len(plan.tasks)}",
                           description=f"{plan.strategy} [dim]{task.output}[/dim]")
                unit = following
            if pending_write is not None:
                pending_write.result()
            bar.update(job, description=plan.strategy)
        (writer.folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
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
