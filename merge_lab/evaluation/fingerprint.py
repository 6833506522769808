"""Content fingerprints: what a candidate is, for the result cache and for a model's memo key.

A fingerprint hashes whole files, weights included: fine-tunes of one base can differ only in
tensors in the middle of a shard, and a partial hash would make their cached results collide.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from merge_lab.core.hashing import file_sha256


def fingerprint_folder(path: Path) -> str:
    """A content fingerprint of a model folder: every file's name and full sha256."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()[:16]


def combine(kind: str, parts: Iterable[str]) -> str:
    """The fingerprint of a candidate made of others (an ensemble, best-of-N): its kind and parts."""
    return hashlib.sha256((kind + "|" + "|".join(parts)).encode()).hexdigest()[:16]
