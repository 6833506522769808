"""ShardWriter: writes a Hugging Face checkpoint folder atomically, tensor by tensor.

Every output tensor's name, shape and dtype are known before the first one is computed (the
plan is made from headers), so the shard layout and each shard's header are fixed up front and
each tensor is written straight to its final offset. Nothing is buffered beyond the tensor in
hand, and tensors may arrive in any order.

The folder is built as a hidden temporary sibling of the target and renamed into place only
when complete (core.output_folder: one run at a time, nothing replaced unless asked, nothing left
behind), so an interrupted or failed run never leaves a half-written model at the target. The
writer also owns what goes beside the tensors (the source's tokenizer and generation files, each
checked to lie inside its folder) and the free-space check that `plan` and `merge` share.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.core.checkpoint import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME
from merge_lab.core.output_folder import OutputClaim, disk_full, format_size
from merge_lab.core.untrusted import inside, regular_file
from merge_lab.errors import MergeLabError

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Largest dtype conversion done in a reused per-thread buffer (bigger ones allocate and free).
STAGING_BYTES = 64 * 2**20
# Free space a merge must find beyond its output: 2% for file-system overhead and 64 MiB for the
# side files, card and index.
DISK_MARGIN, DISK_SLACK = 1.02, 64 * 2**20
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


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a plain byte count; a positive whole number of bytes."""
    bad = MergeLabError(f"{text!r} is not a size: write e.g. 2GB, 500MB or 1GiB (more than 0 bytes).")
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise bad
    if isinstance(text, int):
        if text <= 0:
            raise bad
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise bad from None
    if not math.isfinite(value) or int(value) <= 0:
        raise bad
    return int(value)


def disk_space(out: str | Path, need: int) -> tuple[Path, int, bool]:
    """(the existing folder the output would go under, its free bytes, whether they suffice for an
    output of `need` bytes): the one rule `plan` reports and `merge` enforces."""
    folder = Path(os.path.abspath(out)).parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return folder, free, free >= need * DISK_MARGIN + DISK_SLACK


def check_disk(need: int, out: str | Path) -> None:
    """Refuse, before any work, an output of `need` bytes that the free space at `out` cannot hold."""
    folder, free, enough = disk_space(out, need)
    if not enough:
        raise MergeLabError(
            f"{out}: the merge writes {format_size(need)} but {folder} has only {format_size(free)} free. "
            "Free some space or choose another output folder."
        )


def side_files(source: Path) -> dict[str, Path]:
    """The tokenizer and generation files of `source` to copy (name -> real path), each checked to
    be a regular file inside the folder (links resolved): a link out of the folder is refused,
    never copied."""
    out = {}
    for name in SIDE_FILES:
        if not os.path.lexists(source / name):
            continue
        real = inside(source, name, source, f"the side file {name}")
        if not regular_file(real, source / name):
            raise MergeLabError(f"{source / name}: is a link to a file that does not exist; remove it or fix it.")
        out[name] = real
    return out


def copy_side_files(source: Path | None, dest: Path) -> list[str]:
    """Copy `source`'s side files into `dest` (contents only: modes come from the umask)."""
    if source is None:
        return []
    files = side_files(source)
    for name, real in files.items():
        shutil.copyfile(real, dest / name)
    return list(files)


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


@contextmanager
def atomic_folder(target: str | Path, inputs: Iterable[Path | None] = ()) -> Iterator[Path]:
    """Fill the yielded temporary folder; it becomes `target` (replacing it) when the block ends
    without error and is removed otherwise, so the target is never half-written. Refused while
    another run holds the target, or when the target is one of `inputs` (or holds or lies in one)."""
    claim = OutputClaim(target, replace=True, inputs=inputs)
    assert claim.folder is not None
    try:
        yield claim.folder
        claim.commit()
    except BaseException as e:
        claim.abort()
        full = disk_full(e, claim.target, 0)
        if full is not None:
            raise full from None
        raise


class ShardWriter:
    """Use as a context manager: on an exception the temporary folder (and every parent folder
    the run created) is removed, and a full disk becomes a MergeLabError.

    `inputs` are the folders the run reads: the target may not be, hold or lie inside one."""

    def __init__(
        self,
        target: str | Path,
        specs: list[TensorSpec],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        force: bool = False,
        inputs: Iterable[Path | None] = (),
    ):
        if len({s.name for s in specs}) != len(specs):
            raise MergeLabError("internal: duplicate output tensor names in the plan")
        self.force = force
        self.total_size = sum(s.nbytes for s in specs)
        self._files: list = []
        self._claim = OutputClaim(target, replace=force, inputs=inputs)
        self.target = self._claim.target
        assert self._claim.folder is not None
        self.tmp = self._claim.folder
        try:
            shards = _layout(specs, max_shard_bytes)
            n = len(shards)
            self.shard_names = (
                [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            )
            self.slots: dict[str, _Slot] = {}
            for i, shard_specs in enumerate(shards):
                head, offsets = _header_bytes(shard_specs, metadata or {})
                f = open(self.tmp / self.shard_names[i], "wb")
                self._files.append(f)
                f.write(head)
                f.truncate(len(head) + sum(s.nbytes for s in shard_specs))
                for spec, off in zip(shard_specs, offsets):
                    self.slots[spec.name] = _Slot(i, len(head) + off, spec)
        except BaseException as e:
            self._fail(e)
        self._written: set[str] = set()
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()  # per writing thread: its conversion buffers

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fail(exc)

    def _fail(self, exc: BaseException):
        """Abort, then re-raise `exc`, or the clear error for a full disk."""
        self.abort()
        full = disk_full(exc, self.target, self.total_size)
        if full is not None:
            raise full from None
        raise exc

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
        return self._claim.commit()

    def abort(self) -> None:
        for f in self._files:
            if not f.closed:
                try:
                    f.close()
                except OSError:  # a full disk may fail the last flush: the file goes anyway
                    pass
        self._claim.abort()
