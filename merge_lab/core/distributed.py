"""Several processes under `accelerate launch` (or torchrun): who this process is, and its share.

One door for every data-parallel job (fusion training, align, compare): `launched` gives this
process's rank among those started; shares of a batch or an item list are pure functions of
(seed, step, rank, world), so each process can work out its own and a resume finds the same ones.
"""

from __future__ import annotations

import json
import os

import torch

from merge_lab.errors import MergeLabError


def launched(cpu: bool):
    """accelerate's process state: this process's rank among those `accelerate launch` (or
    torchrun) started; one process, rank 0, without them. Made before the Accelerator, which
    shares it. CPU processes join a gloo group only when asked for the CPU, so on a machine
    without GPUs the CPU is asked for: otherwise each process would train, and write, alone."""
    from accelerate import PartialState

    from_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu or from_launch or not torch.cuda.is_available())
    if state.num_processes == 1 and from_launch and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise MergeLabError(
            "`accelerate launch --cpu --num_processes N` started a single process: accelerate starts several CPU "
            "processes only through mpirun (--mpirun_hostfile). For N processes on the CPU run `accelerate launch "
            "--multi_gpu --num_processes N -m merge_lab ...` on a machine without GPUs, or `torchrun "
            "--nproc_per_node N -m merge_lab ...` (with `cpu: true` in a train block where there are GPUs)."
        )
    return state


def per_process_batch(batch_size: int, world: int, where: str = "train.batch_size") -> int:
    """Rows each of `world` processes takes of a global batch. An uneven split is refused: the
    processes' rows would not weigh the same, and the run would not match a one-process run."""
    if batch_size % world:
        lower, higher = batch_size // world * world, -(-batch_size // world) * world
        hint = f"{lower} or {higher}" if lower else str(higher)
        raise MergeLabError(
            f"{where}: batch size {batch_size} is the global batch, split evenly over the processes, but "
            f"{world} processes cannot share {batch_size} rows evenly. Set batch_size to a multiple of {world} "
            f"(e.g. {hint}) or launch a number of processes that divides {batch_size}."
        )
    return batch_size // world


def global_batch(step: int, n: int, batch: int, seed: int) -> list[int]:
    """All examples of one step: a seeded permutation per epoch, read as one stream; a pure function of step."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(step * batch, (step + 1) * batch):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][i]))
    return out


def batch_indices(step: int, n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Process `rank`'s share of step's global batch of `batch` rows: its contiguous slice, so the
    processes' shares are disjoint and cover the batch; a pure function of (seed, step, rank, world)."""
    per = per_process_batch(batch, world)
    return global_batch(step, n, batch, seed)[rank * per:(rank + 1) * per]


def record_rows(rank: int, world: int, step: int, rows: list[int]) -> None:
    """Test hook: with MERGE_LAB_RECORD_ROWS=path, append {rank, world, step, rows} as a JSON line
    (one write per line, so processes can share the file); tests check the processes' shares."""
    path = os.environ.get("MERGE_LAB_RECORD_ROWS")
    if path:
        line = json.dumps({"rank": rank, "world": world, "step": step, "rows": rows}) + "\n"
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
