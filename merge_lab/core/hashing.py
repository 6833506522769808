"""The one whole-file sha256 of the project, remembered per file state.

Fingerprints of model folders, provenance in model cards and checks of aligned experts all hash
whole files, often the same multi-gigabyte shards several times in one process. The digest is
remembered per (resolved path, size, modification time): a file rewritten in place gets a new
mtime and is hashed again, an untouched one is read once per process. `folder_state` is the
cheaper key of the same idea, for memos within one process: a stat of each file, nothing read.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB reads: large enough to stream a shard at disk speed, small in memory


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the whole file at `path`, read once per (path, size, mtime) in this process."""
    f = Path(path)
    st = f.stat()
    return _digest(str(f.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4096)
def _digest(resolved: str, size: int, mtime_ns: int) -> str:
    """The digest of one file state; size and mtime are part of the cache key, not read here."""
    h = hashlib.sha256()
    with open(resolved, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def forget_file_digests() -> None:
    """Drop every remembered digest (a file changed without a new mtime, e.g. on a coarse clock)."""
    _digest.cache_clear()


def folder_state(path: Path) -> tuple:
    """What a model folder is within this process, from a stat of its files (no hashing: loading a
    model must not read its weights twice): a memo key. Symlinks resolve, so a config-only
    variant of a folder differs from it by its own config.json."""
    return tuple(sorted((f.name, str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in Path(path).iterdir() if f.is_file()))
