"""Files in a model folder are a stranger's input: paths stay inside, JSON is read strictly.

A downloaded folder's index, shard names and side files may name `../../elsewhere`, an absolute
path or a symlink out of the folder, and its JSON files may hold anything. Every path a folder
names goes through `inside()` (resolved, symlinks included) before a byte of it is read, and every
JSON file through `read_json()`. Messages name the file and the offending entry, never bytes of
a file that is not what it claims to be.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from merge_lab.errors import MergeLabError

# config.json, an index or adapter_config.json is kilobytes (an index of 100k tensors: ~10 MB).
MAX_JSON_BYTES = 64 * 2**20
MAX_SHOWN = 80


def shown(text: object) -> str:
    """A value from an untrusted file, quoted (control characters escaped) and cut short."""
    r = repr(text)
    return r if len(r) <= MAX_SHOWN else r[: MAX_SHOWN - 4] + "...'"


def allowed_roots(folder: Path) -> list[Path]:
    """Where a folder's files may resolve: the folder itself and, for a Hugging Face cache snapshot
    (models--ORG--NAME/snapshots/REV, whose files are links into the repository's blobs/), that
    blobs/ folder."""
    real = Path(os.path.realpath(folder))
    roots = [real]
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        roots.append(real.parent.parent / "blobs")
    return roots


def is_inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def inside(folder: Path, name: object, source: Path | str, entry: str) -> Path:
    """The real path of the file `name` of `folder`, as `entry` of `source` names it.

    Refused (MergeLabError) unless it is a non-empty relative name that, symlinks resolved, lands
    inside the folder. Does not check that the file exists: see regular_file()."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise MergeLabError(f"{source}: {entry} is {shown(name)}, which is not a file name. Re-download or re-save it.")
    real = Path(os.path.realpath(folder / name))
    if Path(name).is_absolute() or not is_inside(real, allowed_roots(folder)):
        raise MergeLabError(
            f"{source}: {entry} names {shown(name)}, which lies outside the model folder {folder}. "
            "A checkpoint may refer only to files in its own folder; nothing was read from that path. "
            "Use a copy of the model whose files are all inside its folder."
        )
    return real


def regular_file(real: Path, label: Path | str) -> bool:
    """Whether `real` exists; MergeLabError when it exists but is no regular file (a folder, a
    FIFO that would block, a device) or cannot be looked at."""
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise MergeLabError(f"{label}: cannot be read ({e.strerror}).") from None
    if not stat.S_ISREG(mode):
        raise MergeLabError(f"{label}: is not a regular file; a model folder holds plain files only.")
    return True


class _Refused(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"the key {shown(key)} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def read_json(real: Path, label: Path | str, what: str) -> Any:
    """The strict JSON (see parse_json) in `real`, a regular file already found inside its folder,
    of at most MAX_JSON_BYTES. `label` names it in messages."""
    try:
        with open(real, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise MergeLabError(f"{label}: cannot be read ({e.strerror}).") from None
    if len(raw) > MAX_JSON_BYTES:
        raise MergeLabError(f"{label}: larger than {MAX_JSON_BYTES // 2**20} MB, which no {what} is.")
    return parse_json(raw, label, what)


def parse_json(raw: bytes, label: Path | str, what: str) -> Any:
    """Strict JSON from bytes: UTF-8, no NaN or Infinity, no key twice in an object; messages give
    positions, never content."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MergeLabError(f"{label}: not UTF-8 text (at byte {e.start}), so not a {what}.") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise MergeLabError(f"{label}: not a valid {what}: not JSON (line {e.lineno}, column {e.colno}: {e.msg}).") from None
    except _Refused as e:
        raise MergeLabError(f"{label}: not a valid {what}: {e}.") from None
    except RecursionError:
        raise MergeLabError(f"{label}: nested too deeply to be a {what}.") from None


def read_json_object(folder: Path, name: str, what: str, required: bool = True) -> dict | None:
    """The JSON object in the file `name` of `folder` (None when absent and not `required`)."""
    label = folder / name
    real = inside(folder, name, folder, f"the file {name}")
    if not regular_file(real, label):
        if required:
            raise MergeLabError(f"{label}: missing. A model folder needs its {name}.")
        return None
    data = read_json(real, label, what)
    if not isinstance(data, dict):
        raise MergeLabError(f"{label}: a {what} is a JSON object, not a {type(data).__name__}.")
    return data
