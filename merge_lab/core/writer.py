"""ShardWriter: writes a Hugging Face checkpoint folder atomically, tensor by tensor.

Every output tensor's name, shape and dtype are known before the first one is computed (the
plan is made from headers), so the shard layout and each shard's header are fixed up front and
each tensor is written straight to its final offset. Nothing is buffered beyond the tensor in
hand, and tensors may arrive in any order.

The folder is built as a hidden temporary sibling of the target and renamed into place only
when complete, so an interrupted or failed run never leaves a half-written model at the target.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.core.checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from merge_lab.errors import MergeLabError

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Largest dtype conversion done in a reused per-thread buffer (bigger ones allocate and free).
STAGING_BYTES = 64 * 2**20


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        if unit not in units:
            raise ValueError
        return int(float(num) * units[unit])
    except ValueError:
        raise MergeLabError(f"'{text}' is not a size: write e.g. 2GB, 500MB or 1GiB.") from None


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Slot:
    shard: int
    offset: int  # absolute offset in the shard file
    spec: TensorSpec


def _layout(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offsets, pos = [], 0
    for spec in specs:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [pos, pos + spec.nbytes],
        }
        offsets.append(pos)
        pos += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: Path) -> list[Path]:
    """Delete temporary folders that a killed run (SIGKILL, power loss) left beside `target`.

    Exceptions and Ctrl-C clean up after themselves; a killed process cannot, so the next run
    towards the same target removes folders whose writing process no longer exists."""
    removed = []
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def partial_folder(target: Path) -> Path:
    """A new hidden temporary sibling of `target`, named with this process id so that
    remove_stale_partials can tell a killed run's folder from a live one's."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))


def move_into_place(tmp: Path, target: Path) -> Path:
    """Rename the finished `tmp` to `target`; an existing target is moved aside first, then deleted."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Fill the yielded temporary folder; it becomes `target` (replacing it) when the block ends
    without error and is removed otherwise, so the target is never half-written."""
    target = Path(target)
    tmp = partial_folder(target)
    try:
        yield tmp
        move_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Use as a context manager: on an exception the temporary folder is removed."""

    def __init__(
        self,
        target: str | Path,
        specs: list[TensorSpec],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        force: bool = False,
    ):
        self.target = Path(target)
        if self.target.exists() and not force:
            raise MergeLabError(
                f"{self.target}: already exists. Choose another output folder or pass --force to replace it."
            )
        if len({s.name for s in specs}) != len(specs):
            raise MergeLabError("internal: duplicate output tensor names in the plan")
        self.force = force
        self.tmp = partial_folder(self.target)
        shards = _layout(specs, max_shard_bytes)
        n = len(shards)
        self.shard_names = (
            [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.slots: dict[str, _Slot] = {}
        self._files = []
        for i, shard_specs in enumerate(shards):
            head, offsets = _header_bytes(shard_specs, metadata or {})
            path = self.tmp / self.shard_names[i]
            f = open(path, "wb")
            f.write(head)
            f.truncate(len(head) + sum(s.nbytes for s in shard_specs))
            self._files.append(f)
            for spec, off in zip(shard_specs, offsets):
                self.slots[spec.name] = _Slot(i, len(head) + off, spec)
        self.total_size = sum(s.nbytes for s in specs)
        self._written: set[str] = set()
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per writing thread: its conversion buffers

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    @property
    def folder(self) -> Path:
        """The temporary folder: put side files (config, tokenizer, card) here before finish()."""
        return self.tmp

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self.slots.get(name)
        if slot is None:
            raise MergeLabError(f"internal: tensor '{name}' is not in the planned output")
        if tuple(tensor.shape) != slot.spec.shape:
            raise MergeLabError(
                f"tensor '{name}': computed shape {tuple(tensor.shape)} but the plan says {slot.spec.shape}"
            )
        self.write_part(name, 0, tensor)

    def write_part(self, name: str, first_element: int, tensor: torch.Tensor) -> None:
        """Write `tensor` as the elements [first_element, first_element + numel) of `name`
        (in row-major order), e.g. a block of rows. The tensor counts as written once all its
        elements have been. Safe to call from several threads (positioned writes, no seek)."""
        slot = self.slots.get(name)
        if slot is None:
            raise MergeLabError(f"internal: tensor '{name}' is not in the planned output")
        shape = slot.spec.shape
        total = 1
        for d in shape:
            total *= d
        n = tensor.numel()
        if (first_element == 0 and n == total and tuple(tensor.shape) != shape) or (
            n != total and (tuple(tensor.shape[1:]) != shape[1:] or first_element + n > total)
        ):
            raise MergeLabError(
                f"tensor '{name}': computed shape {tuple(tensor.shape)} at element {first_element} "
                f"does not fit the planned shape {shape}"
            )
        data = self._converted(tensor.detach(), slot.spec.dtype)
        fd = self._files[slot.shard].fileno()
        if n:
            buf = memoryview(data.view(torch.uint8).numpy())
            pos, done = slot.offset + first_element * data.element_size(), 0
            while done < len(buf):
                done += os.pwrite(fd, buf[done:], pos + done)
        with self._lock:
            got = self._counts.get(name, 0) + n
            self._counts[name] = got
            if got >= total:
                self._written.add(name)

    def _converted(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` as flat contiguous CPU `dtype`. Conversions up to STAGING_BYTES go into a
        buffer this thread reuses: a fresh one per row block cost a page fault per 4 KiB
        (0.5B linear benchmark: about 250k faults for the 1 GB output)."""
        if tensor.device.type == "cpu" and tensor.dtype == dtype and tensor.is_contiguous():
            return tensor.reshape(-1)
        n = tensor.numel()
        if n * dtype.itemsize > STAGING_BYTES:
            return tensor.to(device="cpu", dtype=dtype).contiguous().reshape(-1)
        staging = getattr(self._local, "staging", {})
        buf = staging.get(dtype)
        if buf is None or buf.numel() < n:
            buf = staging[dtype] = torch.empty(n, dtype=dtype)
            self._local.staging = staging
        return buf[:n].view(tensor.shape).copy_(tensor).reshape(-1)

    def finish(self) -> Path:
        """Check completeness, write the index, and move the folder into place."""
        missing = set(self.slots) - self._written
        if missing:
            self.abort()
            raise MergeLabError(f"internal: {len(missing)} planned tensors were never written, e.g. {sorted(missing)[:3]}")
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        if len(self.shard_names) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {n: self.shard_names[s.shard] for n, s in self.slots.items()},
            }
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return move_into_place(self.tmp, self.target)

    def abort(self) -> None:
        for f in self._files:
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
