"""The engine: runs a Plan tensor by tensor into a ShardWriter.

Reading, computing and writing overlap: a loader thread reads the next work unit's inputs
(rounded to the recipe's arithmetic dtype and held in the op's working dtype, float32 unless a
strategy computes in bfloat16 / float16 as mergekit does; converted straight from the
memory-mapped page cache, into buffers the main thread allocates) while the current one
computes, and a writer thread writes the previous result at its final offset. At most one unit
waits in each stage.

A work unit is a whole tensor, or, for ops that say they stream in row blocks (elementwise or
row-wise strategies: `TensorOp.streams_rows`), a block of about ops.CHUNK_ELEMENTS elements of
rows. So for those peak memory is a few blocks whatever the model size: the 128k x 4096
embedding of a large model costs what a small one does. Strategies that are elementwise once they
know a few whole-tensor statistics (TIES' top-k thresholds, slerp's angle) declare statistics
passes: the op's RowStream folds the tensor's row blocks into them pass by pass (units that write
nothing), then merges every block with them (vocabulary tensors aligned by token stream too:
merge.embeddings re-indexes the rows a block reads). Every block read is checked for NaN / Inf on the way
(merge.finite). The engine sees files and never math; the ops see tensors and never files; work
that needs a model before the merge (centroid router rows) is done by the plan's steps, run when
the engine starts, before the output folder is opened.
"""

from __future__ import annotations

import ctypes
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import DownloadColumn, TextColumn

from merge_lab.core.progress import progress_bar
from merge_lab.core.writer import ShardWriter, TensorSpec, check_disk, copy_side_files, parse_size
from merge_lab.errors import MergeLabError
from merge_lab.merge.card import model_card, recipe_hash, recipe_text
from merge_lab.merge.finite import FiniteGuard, non_finite_count
from merge_lab.merge.ops import RowStream, TensorTask, block_rows, read_dtype
from merge_lab.merge.plan import Plan
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import Recipe, load_recipe
from merge_lab.merge.tokenizer import write_tokenizer


@dataclass
class MergeResult:
    path: Path
    tensors: int
    bytes_written: int
    seconds: float
    # (input folder, tensor) -> NaN / Inf values merged under allow_non_finite; empty otherwise
    non_finite: dict[tuple[str, str], int] = field(default_factory=dict)


# A unit whose inputs (in the op's working dtype) exceed this is not read ahead while another
# computes, nor computed while a result is still being written: two whole embeddings in flight
# would double the peak.
PREFETCH_BYTES = 256 * 2**20


@dataclass
class _Unit:
    """One step of the pipeline: the rows [start, stop) of a task's tensor, or all of it. A unit
    of a statistics pass (pass_index set) folds its block into the stream and writes nothing."""

    task: TensorTask
    rows: tuple[int, int] | None = None
    stream: RowStream | None = None
    pass_index: int | None = None
    first_element: int = 0

    @property
    def first_read(self) -> bool:
        """Whether this unit reads its rows for the first time (not a later statistics pass, nor
        the merge after them): only then are its inputs checked for NaN / Inf."""
        if self.stream is None:
            return True
        return self.pass_index == 0 or (self.pass_index is None and self.stream.passes == 0)

    @property
    def input_bytes(self) -> int:
        t = self.task
        n = t.numel if self.rows is None else t.numel // t.shape[0] * (self.rows[1] - self.rows[0])
        return t.op.working_dtype.itemsize * n * len(t.inputs)

    def run(self, inputs: list[torch.Tensor]) -> torch.Tensor | None:
        if self.stream is None:
            return self.task.op.execute(inputs)
        if self.pass_index is not None:
            assert self.rows is not None
            self.stream.fold(self.pass_index, self.rows[1] == self.task.shape[0], inputs)
            return None
        return self.stream.merge(inputs)


def _units(tasks: list[TensorTask], chunk_elements: int | None = None):
    """Split tasks into work units (lazily, in plan order)."""
    for task in tasks:
        step = block_rows(task, chunk_elements)
        if step is None:
            yield _Unit(task)
            continue
        rows, per_row = task.shape[0], task.numel // task.shape[0]
        stream = task.op.stream()
        blocks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
        for p in range(stream.passes):
            for start, stop in blocks:
                yield _Unit(task, (start, stop), stream, p, start * per_row)
        for start, stop in blocks:
            yield _Unit(task, (start, stop), stream, None, start * per_row)


def _load(unit: _Unit, device: torch.device, buffers: list[torch.Tensor | None]) -> tuple[list[torch.Tensor], list[int]]:
    """A unit's inputs, and how many non-finite values each holds (checked here, on the reader,
    at the first read of the rows: statistics passes come first, so every block is checked before
    any is merged)."""
    out, counts = [], []
    working = unit.task.op.working_dtype
    for (ckpt, name), buf in zip(unit.task.inputs, buffers):
        t = ckpt.read(name, unit.rows, buf.dtype, out=buf) if buf is not None else ckpt.read(name, unit.rows)
        counts.append(non_finite_count(t) if unit.first_read else 0)
        t = t.to(device) if device.type != "cpu" else t
        out.append(t.to(working) if buf is not None and t.dtype != working else t)
    return out, counts


def _prefetch(reader: ThreadPoolExecutor, unit: _Unit, device: torch.device) -> Future:
    """Start reading a unit's inputs on the reader thread, into buffers allocated here (of the
    dtype ops.read_dtype gives: the working dtype, or the rounding one to convert from).

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
        buffers.append(torch.empty(n, dtype=read_dtype(unit.task.op, info.dtype)))
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


def _compute_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeLabError(f"--device {device}: not a device torch knows; use cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu.")
    return dev


def _open_output(plan: Plan, out: Path, shard_size: str | int | None, force: bool) -> ShardWriter:
    specs = [TensorSpec(t.output, t.shape, t.dtype) for t in plan.tasks]
    shard_bytes = parse_size(shard_size if shard_size is not None else plan.recipe.shard_size)
    metadata = {"format": "pt", "merge_lab_recipe_sha256": recipe_hash(plan), "merge_lab_strategy": plan.strategy}
    inputs = [*(c.path for c in plan.inputs), plan.side_files_from]  # the output may not touch any of them
    return ShardWriter(out, specs, shard_bytes, metadata, force=force, inputs=inputs)


def _compute(unit: _Unit, inputs: list[torch.Tensor]) -> torch.Tensor | None:
    try:
        return unit.run(inputs)
    except MergeLabError:
        raise
    except Exception as e:
        raise MergeLabError(f"tensor '{unit.task.output}': the strategy failed: {e}") from e


def _run_units(plan: Plan, writer: ShardWriter, device: torch.device, chunk_elements: int | None,
               guard: FiniteGuard, console: Console, progress: bool) -> int:
    """Run every work unit in plan order, reading the next one's inputs while this one computes
    and the previous result is written. Returns the bytes written."""
    written = done = 0
    with (
        progress_bar(console, progress, DownloadColumn(), TextColumn("{task.fields[tensors]} tensors")) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="merge-read") as reader,
        ThreadPoolExecutor(1, thread_name_prefix="merge-write") as writer_pool,
    ):
        job = bar.add_task(plan.strategy, total=plan.output_bytes, tensors=f"0/{len(plan.tasks)}")
        pending_write: Future | None = None
        units = _units(plan.tasks, chunk_elements)
        unit = next(units, None)
        next_inputs: Future | None = _prefetch(reader, unit, device) if unit is not None else None
        while unit is not None:
            assert next_inputs is not None
            inputs, counts = next_inputs.result()
            following = next(units, None)
            defer = following is not None and following.input_bytes > PREFETCH_BYTES
            next_inputs = _prefetch(reader, following, device) if following is not None and not defer else None
            task = unit.task
            guard.check_inputs(task, unit.rows, counts)
            result = _compute(unit, inputs)
            del inputs
            if result is not None:
                guard.check_output(task, unit.rows, result)
                if pending_write is not None:
                    pending_write.result()
                nbytes = result.numel() * task.dtype.itemsize
                written += nbytes
                pending_write = writer_pool.submit(writer.write_part, task.output, unit.first_element, result)
                del result
                if unit.rows is None or unit.rows[1] == task.shape[0]:
                    done += 1
                bar.update(job, advance=nbytes, tensors=f"{done}/{len(plan.tasks)}",
                           description=f"{plan.strategy} [dim]{task.output}[/dim]")
            if defer:  # `following` is large: read it only once nothing else is in flight
                if pending_write is not None:
                    pending_write.result()
                next_inputs = _prefetch(reader, following, device)
            unit = following
        if pending_write is not None:
            pending_write.result()
        bar.update(job, description=plan.strategy)
    return written


def _write_beside(plan: Plan, folder: Path, hash_inputs: bool, non_finite: dict[tuple[str, str], int]) -> None:
    """The files beside the weights: config, model card, recipe (the tokenizer files come first)."""
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    hashes = {str(c.path): c.file_hashes() for c in plan.inputs} if hash_inputs else None
    (folder / "README.md").write_text(model_card(plan, hashes, non_finite))
    (folder / "merge_recipe.yaml").write_text(recipe_text(plan))


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
    chunk_elements: int | None = None,
    allow_non_finite: bool | None = None,
) -> MergeResult:
    """Execute a plan into the folder `out` (built beside it, renamed into place when complete).

    chunk_elements: elements per row block of streamed tensors (default ops.CHUNK_ELEMENTS).
    allow_non_finite: merge inputs holding NaN / Inf (default: the recipe's allow_non_finite).
    """
    out = Path(out)
    console = console or Console(stderr=True)
    dev = _compute_device(device)
    check_disk(plan.output_bytes, out)
    _tune_malloc()
    start = time.perf_counter()
    plan = plan.prepared()  # e.g. centroid router rows: may run a model; nothing is open yet
    allow = plan.recipe.allow_non_finite if allow_non_finite is None else allow_non_finite
    guard = FiniteGuard(plan.strategy, allow, chunk_elements)
    with _open_output(plan, out, shard_size, force) as writer:
        if plan.tokenizer is None:
            copy_side_files(plan.side_files_from, writer.folder)  # checked before any tensor is read
        else:  # the vocabulary built by merge.tokenizer (or the chat template set)
            write_tokenizer(plan.tokenizer, plan.side_files_from, writer.folder)
        written = _run_units(plan, writer, dev, chunk_elements, guard, console, progress)
        _write_beside(plan, writer.folder, hash_inputs, guard.seen)
        path = writer.finish()
    for c in plan.inputs:
        c.close()
    return MergeResult(path, len(plan.tasks), written, time.perf_counter() - start, dict(guard.seen))


def merge(recipe: str | Path | Recipe, out: str | Path, **kwargs) -> MergeResult:
    """Plan and run a recipe: the one call behind `merge-lab merge`. kwargs: run_plan's."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return run_plan(make_plan(recipe), out, **kwargs)
