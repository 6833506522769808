"""Several processes under `accelerate launch` (or torchrun): who this process is, and its share.

One door for every data-parallel job (fusion training, align, compare): `launched` gives this
process's rank among those started; shares of a batch or an item list are pure functions of
(seed, step, rank, world), so each process can work out its own and a resume finds the same ones;
`process_device` is the one reading of a file's `device:` setting, each launched process its own.
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


def device_for_process(name: str, local_rank: int | None, world: int, where: str = "device") -> tuple[str, str | None]:
    """The device process `local_rank` of `world` computes on when a file says `name`, and a note
    when the file named one fixed device. One process keeps what the file says; under a launcher
    each process takes its own index (`cuda` -> `cuda:LOCAL_RANK`, as accelerator.device does):
    `cuda:0` taken literally would put every process on the first GPU."""
    dev = torch.device(name)
    if dev.type in ("cpu", "meta") or world <= 1 or local_rank is None:
        return name, None
    mine = f"{dev.type}:{local_rank}"
    if dev.index is None:
        return mine, None
    return mine, (f"{where}: '{name}' names one device, but each of the {world} launched processes computes on its "
                  f"own ({dev.type}:LOCAL_RANK; this one {mine}); write '{dev.type}' to say so")


def process_device(name: str, where: str = "device") -> tuple[str, str | None]:
    """The one reading of a `device:` setting (align's train block, compare's settings): `auto`
    is a GPU when torch sees one, else the CPU; a GPU asked for where there is none is refused;
    under `accelerate launch` / torchrun (LOCAL_RANK, WORLD_SIZE) each process gets its own
    (`device_for_process`). Returns (device, note or None)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MergeLabError(f"{where}: device '{name}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError(f"{where}: device '{name}' was asked for but torch sees no CUDA GPU; use 'auto' or 'cpu'.")
    local = os.environ.get("LOCAL_RANK")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device, note = device_for_process(name, int(local) if local is not None else None, world, where)
    index = torch.device(device).index
    if torch.device(device).type == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise MergeLabError(f"{where}: this process would compute on '{device}', but torch sees "
                            f"{torch.cuda.device_count()} GPU(s); launch at most one process per GPU.")
    return device, note
