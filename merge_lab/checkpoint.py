"""Checkpoint: one Hugging Face model folder, read lazily.

Headers are parsed without touching tensor data, so a whole merge can be planned and validated
from headers alone. Tensors are views into memory-mapped files (no copy until the strategy casts
them), which keeps peak memory bound to the tensors in flight, not to the model size.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from merge_lab.errors import MergeLabError

# safetensors dtype names <-> torch dtypes
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
TORCH_DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the safetensors header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; returns (header dict, absolute offset where data starts).

    Checks that every tensor's bytes lie inside the file, so a truncated download is caught
    at plan time with the file and tensor named.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise MergeLabError(f"{path}: file is too short to be safetensors ({size} bytes).")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8 or header_len > 100_000_000:
                raise MergeLabError(
                    f"{path}: corrupt safetensors header (declares {header_len} header bytes in a "
                    f"{size}-byte file). Re-download or re-save this file."
                )
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise MergeLabError(f"{path}: file not found.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeLabError(f"{path}: corrupt safetensors header ({e}). Re-download or re-save it.") from e
    data_start = 8 + header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        if data_start + end > size:
            raise MergeLabError(
                f"{path}: tensor '{name}' ends at byte {data_start + end} but the file has {size} bytes; "
                "the file is truncated. Re-download or re-save it."
            )
        if entry["dtype"] not in DTYPES:
            raise MergeLabError(f"{path}: tensor '{name}' has unsupported dtype {entry['dtype']}.")
    return header, data_start


class Checkpoint:
    """A model folder: config.json plus one or more safetensors shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeLabError(
                f"{self.path}: model folder not found. Give a local folder with config.json and "
                "*.safetensors (download hub models first with `huggingface-cli download`)."
            )
        self._maps: dict[Path, mmap.mmap] = {}
        self._fds: dict[Path, int] = {}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    @cached_property
    def config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise MergeLabError(f"{cfg}: missing. A model folder needs its config.json.")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise MergeLabError(f"{cfg}: not valid JSON ({e}).") from e

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "unknown")

    @cached_property
    def files(self) -> list[Path]:
        index = self.path / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).exists()]
            if missing:
                raise MergeLabError(f"{index}: lists shard(s) {missing} that are not in the folder.")
            return [self.path / n for n in names]
        if (self.path / SINGLE_NAME).exists():
            return [self.path / SINGLE_NAME]
        found = sorted(self.path.glob("*.safetensors"))
        if found:
            return found
        raise MergeLabError(
            f"{self.path}: no safetensors weights (expected {SINGLE_NAME} or shards with {INDEX_NAME}). "
            "Convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True)."
        )

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's header entry, in file order."""
        out: dict[str, TensorInfo] = {}
        for file in self.files:
            header, start = read_header(file)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                out[name] = TensorInfo(
                    name, file, DTYPES[entry["dtype"]], tuple(entry["shape"]), start + begin, start + end
                )
        return out

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeLabError(
                f"{self.path}: has no tensor '{name}'. Are all models fine-tunes of the same base?"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """A tensor viewing the memory-mapped file (copy-on-write: the file is never changed)."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mm
        count = 1
        for d in info.shape:
            count *= d
        if count == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(mm, dtype=info.dtype, count=count, offset=info.begin)
        return flat.view(info.shape)

    def read(
        self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """A fresh tensor (owned, writable) with the rows [start, stop) of `name`, or all of it.

        Read with pread into a staging buffer rather than through the memory map, so the file's
        pages never count in this process's resident memory and reading the same model twice
        does not keep the first copy alive; converted to `dtype` (e.g. float32) in one pass.
        """
        info = self.info(name)
        shape = info.shape
        row = info.dtype.itemsize
        for d in shape[1:]:
            row *= d
        start, stop = rows if rows is not None else (0, shape[0] if shape else 1)
        out_shape = (stop - start, *shape[1:]) if shape else ()
        staged = torch.empty(out_shape, dtype=info.dtype)
        nbytes = (stop - start) * row
        if nbytes:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
            buf = memoryview(staged.reshape(-1).view(torch.uint8).numpy())
            offset, done = info.begin + start * row, 0
            while done < nbytes:
                n = os.preadv(fd, [buf[done:]], offset + done)
                if n <= 0:
                    raise MergeLabError(f"{info.file}: tensor '{name}' is cut short; re-download or re-save it.")
                done += n
        if dtype is None or dtype == info.dtype:
            return staged
        return staged.to(dtype)

    @property
    def num_params(self) -> int:
        total = 0
        for info in self.tensors.values():
            n = 1
            for d in info.shape:
                n *= d
            total += n
        return total

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def file_hashes(self) -> dict[str, str]:
        """sha256 of each weight file, for the model card's provenance."""
        out = {}
        for file in self.files:
            h = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            out[file.name] = h.hexdigest()
        return out

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it; the OS unmaps at exit
                pass
        self._maps.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
