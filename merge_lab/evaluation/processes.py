"""A comparison over several processes (`accelerate launch -m merge_lab compare`): each process
scores and generates its share of every call's batches, and every process gets all the results.

The split is of the batches a one-process run makes (sorted by length, longest first): batch k
goes to process k mod N (strided, so the long batches spread over the processes). Each item is
computed in the same batch, with the same padding, as in a one-process run, so per-example results
do not depend on the number of processes, to the bit, with the same threads per process. Every
process then holds every result: suites, judges, reference answers, `choose:` and aggregation run
the same everywhere and take the same decisions; only the main process writes (cache, report).

A call made inside another call's batch (a best-of-N's judge scoring its members' answers) is
computed whole where it is made: the processes are not in step there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from merge_lab.core.distributed import record_rows

T = TypeVar("T")


@dataclass
class Processes:
    """This process's rank among `world` processes of one comparison (0 of 1 without a launcher)."""

    rank: int = 0
    world: int = 1
    calls: int = 0  # calls shared so far: the same sequence on every process (the record hook's step)

    @classmethod
    def launched(cls, cpu: bool) -> Processes:
        """The processes `accelerate launch` (or torchrun) started, joined in one group. Without a
        launcher, one process, and accelerate's process state is left unmade (it is one per Python
        process: a `fuse` later in this process makes its own, for its own device)."""
        from merge_lab.core.distributed import launched

        if not any(k in os.environ for k in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_CPU")):
            return cls()
        state = launched(cpu)
        return cls(state.process_index, state.num_processes)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def all_gather(self, obj: T) -> list[T]:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the main process, its value on every process (one decision for all)."""
        if self.world == 1:
            return fn()
        box = [fn() if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """`fn()` on the main process, then on the others: what it writes (a recipe merged into the
        cache, a `choose:` variant) is written once, and the others find it written."""
        if self.world == 1:
            return fn()
        out = fn() if self.main else None
        self.barrier()
        if not self.main:
            out = fn()
        self.barrier()
        return out


_ACTIVE: ContextVar[Processes | None] = ContextVar("merge_lab_processes", default=None)
_INSIDE: ContextVar[bool] = ContextVar("merge_lab_inside_shared_call", default=False)


@contextmanager
def sharing(processes: Processes) -> Iterator[Processes]:
    """Within the block, candidates' scoring and generation calls split their batches over `processes`."""
    token = _ACTIVE.set(processes)
    try:
        yield processes
    finally:
        _ACTIVE.reset(token)


def current() -> Processes:
    """The processes sharing the work now (one process outside `sharing`)."""
    return _ACTIVE.get() or Processes()


def share(batches: list[list[int]], rank: int, world: int) -> list[list[int]]:
    """Process `rank`'s batches: every `world`-th, from its rank on (disjoint, together all)."""
    return batches[rank::world]


def map_batches(batches: list[list[int]], compute: Callable[[list[int]], list[T]]) -> dict[int, T]:
    """`compute(batch)` (one result per item index of the batch) on this process's share of the
    batches, and every process's results on every process, by item index."""
    procs = current()
    nested = _INSIDE.get()
    spread = procs.world > 1 and not nested
    mine = share(batches, procs.rank, procs.world) if spread else batches
    token = _INSIDE.set(True)
    try:
        local: dict[int, T] = {}
        for batch in mine:
            local.update(zip(batch, compute(batch)))
    finally:
        _INSIDE.reset(token)
    if not spread:
        return local
    procs.calls += 1
    record_rows(procs.rank, procs.world, procs.calls, sorted(local))
    merged: dict[int, T] = {}
    for part in procs.all_gather(local):
        merged.update(part)
    return merged
