"""Merge ops: what each output tensor reads and how it is computed, as small frozen values.

The planner turns a recipe into one TensorTask per output tensor, each holding an op (the shape
of mergekit's per-tensor tasks). The engine asks the op what to read (`arguments()`), reads
those tensors rounded to the op's `rounding_dtype` (mergekit's load cast) and held in its
`working_dtype` (`read_dtype` says how, in one conversion where it can) and hands them to
`execute()`; when the op `streams_rows`, it reads row blocks instead and drives the op's
RowStream (statistics passes, then the merge). So the engine never looks inside an op, and an op
never opens a file.

How tensors are cut into row blocks (CHUNK_ELEMENTS, `block_rows`) and the working memory that
follows from it (`predicted_peak_bytes`) live here too, so the plan's prediction and the engine's
blocks come from one rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.merge.interface import Strategy, TensorContext

Input = tuple[Checkpoint, str]  # (checkpoint, tensor name) an op reads

# Rows are processed in blocks of about this many elements (8 MB of float32 per input): small
# enough that the allocator reuses the blocks' memory instead of faulting in fresh pages for each
# (measured on the 0.5B linear benchmark: 5.5 s CPU at 2M elements, 7.5 s at 8M).
CHUNK_ELEMENTS = 2 * 2**20

# Freed blocks the allocator keeps for reuse: glibc caches allocations under 32 MB (a row block's
# 8 MB) in each thread's arena, and the reader, compute and writer threads each hold some. Measured
# on the 0.5B benchmark set (benchmarks.plan_probe): streamed merges grow up to ~240 MB beyond
# their units in flight (TIES: 341 MB growth, ~100 MB of units).
ALLOCATOR_SLACK = 384 * 2**20


class RowStream(Protocol):
    """One tensor computed row block by row block; its blocks run in order on one thread."""

    passes: int  # statistics passes over every block before the blocks are merged

    def fold(self, pass_index: int, last: bool, inputs: list[torch.Tensor]) -> None:
        """Fold one block into the statistics; `last` marks the pass's final block."""

    def merge(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The output rows of one block."""


class TensorOp:
    """Base of every op. Subclasses are frozen dataclasses; by default an op takes whole tensors,
    float ones as float32."""

    @property
    def rounding_dtype(self) -> torch.dtype:
        """The dtype float inputs are rounded to before any arithmetic (mergekit casts on load)."""
        return torch.float32

    @property
    def working_dtype(self) -> torch.dtype:
        """The dtype execute() gets float inputs in."""
        return torch.float32

    def arguments(self) -> tuple[Input, ...]:
        """The tensors this op reads, in the order execute() receives them."""
        raise NotImplementedError

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The output tensor from the whole inputs (float tensors in working_dtype)."""
        raise NotImplementedError

    @property
    def streams_rows(self) -> bool:
        """Whether output rows depend only on the same input rows (and whole-tensor statistics)."""
        return False

    def held_bytes(self, numel: int) -> int:
        """Bytes held across a tensor of `numel` entries beyond one work unit (Strategy.held_bytes)."""
        return 0

    def stream(self) -> RowStream:
        raise TypeError(f"{type(self).__name__} does not stream in row blocks")


@dataclass(frozen=True, eq=False)
class CopyOp(TensorOp):
    """A tensor copied unchanged (integer buffers and other non-float tensors)."""

    source: Input

    def arguments(self) -> tuple[Input, ...]:
        return (self.source,)

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return inputs[0]


@dataclass(frozen=True, eq=False)
class ConstantOp(TensorOp):
    """A tensor whose value is known before the engine runs (zeros, precomputed router rows)."""

    value: torch.Tensor

    def arguments(self) -> tuple[Input, ...]:
        return ()

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.value


@dataclass(frozen=True, eq=False)
class Deferred(TensorOp):
    """An output that one of the plan's steps computes after planning and before the engine runs
    (Plan.prepared binds it to a ConstantOp): planning stays header-only, the engine math-free."""

    step: str  # what computes it, for messages

    def arguments(self) -> tuple[Input, ...]:
        return ()

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        raise RuntimeError(f"internal: {self.step} has not run; the engine runs plan.prepared()")


@dataclass(frozen=True, eq=False)
class MergeOp(TensorOp):
    """A tensor-wise strategy over one tensor of every model (and of the base, when it takes part),
    with the parameters resolved for this tensor."""

    strategy: Strategy
    params: BaseModel
    model_params: tuple[BaseModel, ...]
    context: TensorContext
    models: tuple[Input, ...]
    base: Input | None = None
    # the recipe's arithmetic dtype for this tensor (planner.arithmetic_dtype)
    arithmetic: torch.dtype = torch.float32

    @property
    def rounding_dtype(self) -> torch.dtype:
        return self.arithmetic

    @property
    def working_dtype(self) -> torch.dtype:
        return self.strategy.working_dtype(self.arithmetic)

    def arguments(self) -> tuple[Input, ...]:
        return self.models if self.base is None else (*self.models, self.base)

    def split(self, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(the models' tensors, the base's or None) from inputs in arguments() order."""
        return (inputs[:-1], inputs[-1]) if self.base is not None else (inputs, None)

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.merge_rows(inputs, self.context)

    def merge_rows(self, inputs: list[torch.Tensor], context: TensorContext) -> torch.Tensor:
        """The merged rows, in the arithmetic dtype: mergekit's methods that upcast inside (linear,
        slerp) give their result back in the dtype they were given, rounded once."""
        tensors, base = self.split(inputs)
        out = self.strategy.merge(tensors, base, self.params, list(self.model_params), context)
        return out if out.dtype == self.arithmetic else out.to(self.arithmetic)

    @property
    def streams_rows(self) -> bool:
        return self.strategy.row_separable

    def stats_passes(self) -> int:
        return self.strategy.stats_passes(self.params, list(self.model_params), self.working_dtype)

    def held_bytes(self, numel: int) -> int:
        return self.strategy.held_bytes(numel, self.params, list(self.model_params), self.working_dtype)

    def stream(self) -> MergeStream:
        return MergeStream(self)


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


class MergeStream:
    """A MergeOp's tensor streamed in row blocks: its statistics, folded pass by pass, then its merge."""

    def __init__(self, op: MergeOp) -> None:
        c = op.context
        self.op = op
        self.context: TensorContext = _StreamContext(c.name, c.role, c.seed, c.model_ids)
        self.passes = op.stats_passes()
        self.stats: Any = None

    def fold(self, pass_index: int, last: bool, inputs: list[torch.Tensor]) -> None:
        op = self.op
        tensors, base = op.split(inputs)
        mp = list(op.model_params)
        self.stats = op.strategy.fold_stats(pass_index, self.stats, tensors, base, op.params, mp, self.context)
        if last:
            self.stats = op.strategy.finish_stats(pass_index, self.stats, op.params, mp)
            if pass_index == self.passes - 1:  # generators stay shared: replace() keeps the dict
                self.context = replace(self.context, stats=self.stats)

    def merge(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return self.op.merge_rows(inputs, self.context)


@dataclass(frozen=True, eq=False)
class TensorTask:
    """One output tensor: its name, shape and dtype as written, and the op that computes it."""

    output: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: TensorOp

    @property
    def inputs(self) -> list[Input]:
        return list(self.op.arguments())

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_dtype(op: TensorOp, stored: torch.dtype) -> torch.dtype:
    """The dtype to read a float input stored as `stored` in: the op's working dtype when one
    conversion gives the values rounded to its rounding dtype (nothing to round, or rounding and
    working dtypes alike), else the rounding dtype (the engine then converts to the working one)."""
    rounding, working = op.rounding_dtype, op.working_dtype
    return working if stored == rounding or rounding == working else rounding


def block_rows(task: TensorTask, chunk_elements: int | None = None) -> int | None:
    """Rows per work unit when the task is streamed in row blocks of about `chunk_elements`
    (default CHUNK_ELEMENTS), else None: the tensor goes whole."""
    chunk = chunk_elements or CHUNK_ELEMENTS
    rows = task.shape[0] if task.shape else 0
    if task.numel <= chunk or rows <= 1 or not task.op.streams_rows:
        return None
    if not all(c.info(n).shape == task.shape for c, n in task.op.arguments()):
        return None
    return max(1, chunk // (task.numel // rows))


def predicted_peak_bytes(tasks: list[TensorTask], prefetch: int = 1, chunk_elements: int | None = None) -> int:
    """Working memory: copies of the inputs of the work units in flight in the op's working dtype
    (a whole tensor, or a row block of a streamed one: bfloat16 arithmetic halves float32's), plus
    about three unit-sized float32 temporaries for the op and the output (low-precision arithmetic
    still sums in float32, as torch does), plus what a strategy holds across the tensor (della's
    kept masks), plus ALLOCATOR_SLACK. Excludes the interpreter itself."""
    per_unit = [0]
    for t in tasks:
        rows = block_rows(t, chunk_elements)
        numel = t.numel if rows is None else t.numel // t.shape[0] * rows
        per_unit.append(numel * (t.op.working_dtype.itemsize * len(t.inputs) + 4 * 3) + t.op.held_bytes(t.numel))
    return max(per_unit) * (1 + prefetch) + ALLOCATOR_SLACK
