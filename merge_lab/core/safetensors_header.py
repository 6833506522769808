"""Safetensors headers, checked as strictly as the format (and the safetensors library) demands.

A file is an 8-byte little-endian header length N, N bytes of a JSON object (maybe padded with
spaces), then the data section. The object maps each tensor name to exactly
{"dtype": str, "shape": [int >= 0, ...], "data_offsets": [begin, end]} with offsets relative to
the data section, plus an optional "__metadata__" str -> str map. The spans, sorted, must tile
the data section: the first begins at 0, each begins where the previous ends, the last ends at
the end of the file, and each is exactly prod(shape) * itemsize bytes. Anything else is refused,
so no merge reads bytes that a negative, overlapping or short span points at.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.core.untrusted import parse_json, shown
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
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
REDO = "Re-download or re-save this file."


@dataclass(frozen=True)
class HeaderEntry:
    """One tensor's header entry, checked; begin and end are absolute offsets in the file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _entry(path: Path, name: str, value: object, data_start: int) -> HeaderEntry:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(value, dict) or set(value) != ENTRY_KEYS:
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise MergeLabError(f"{where}: its header entry must hold exactly dtype, shape and data_offsets (has {shown(keys)}). {REDO}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MergeLabError(
            f"{where}: has dtype {shown(dtype)}, which merge-lab does not read (known: {', '.join(DTYPES)})."
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise MergeLabError(f"{where}: its shape {shown(shape)} is not a list of non-negative integers. {REDO}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise MergeLabError(f"{where}: its data_offsets {shown(offsets)} are not two integers. {REDO}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise MergeLabError(f"{where}: its data_offsets [{begin}, {end}] are not an ordered span of the data. {REDO}")
    count = 1
    for d in shape:
        count *= d
    want = count * DTYPES[dtype].itemsize
    if end - begin != want:
        raise MergeLabError(
            f"{where}: its data_offsets span {end - begin} bytes but a {dtype} tensor of shape {tuple(shape)} "
            f"has {want}. {REDO}"
        )
    return HeaderEntry(name, DTYPES[dtype], tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: Path, entries: list[HeaderEntry], data_start: int, size: int) -> None:
    """The spans, in order, cover the data section exactly: no gap, no overlap, nothing after."""
    pos = data_start
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != pos:
            what = "overlaps the tensor before it" if e.begin < pos else f"leaves {e.begin - pos} unused bytes before it"
            raise MergeLabError(f"{path}: tensor {shown(e.name)} {what} in the data section. {REDO}")
        pos = e.end
    if pos != size:
        if pos > size:
            raise MergeLabError(
                f"{path}: tensors end at byte {pos} but the file has {size} bytes; the file is truncated. {REDO}"
            )
        raise MergeLabError(
            f"{path}: {size - pos} bytes after the last tensor are covered by no header entry. {REDO}"
        )


def _bad(label: Path, reason: str) -> MergeLabError:
    return MergeLabError(f"{label}: corrupt safetensors header: {reason}. {REDO}")


def read_header(path: Path, label: Path | None = None) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """The checked tensor entries (in header order) and the metadata of the safetensors file `path`.

    `label` is the name messages give the file (the path its folder spells, when `path` is where
    a link resolved to). Reads the header only, never tensor data."""
    label = label or path
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise _bad(label, f"the file has {size} bytes, too few for a safetensors file")
            (header_len,) = struct.unpack("<Q", raw_len)
            if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
                raise _bad(
                    label, f"its first 8 bytes give no header length that fits this {size}-byte file "
                    f"(nor the format's limit of {MAX_HEADER_BYTES} bytes); is it a safetensors file at all?"
                )
            raw = f.read(header_len)
    except FileNotFoundError:
        raise MergeLabError(f"{label}: file not found.") from None
    except OSError as e:
        raise MergeLabError(f"{label}: cannot be read ({e.strerror}).") from None
    if not raw.startswith(b"{"):
        raise _bad(label, "the header is not a JSON object")
    header = parse_json(raw, label, "safetensors header (corrupt or not safetensors)")
    if not isinstance(header, dict):
        raise _bad(label, "the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(label, "its __metadata__ is not a map of strings to strings")
    data_start = 8 + header_len
    entries = [_entry(label, name, value, data_start) for name, value in header.items()]
    _check_tiling(label, entries, data_start, size)
    return {e.name: e for e in entries}, metadata
