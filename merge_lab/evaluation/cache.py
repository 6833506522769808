"""Results cached per (candidate fingerprint, suite fingerprint, settings): adding a candidate to a
report evaluates only that one. One JSON file per entry, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ResultCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def key(self, candidate_fp: str, suite_fp: str, settings: dict) -> str:
        blob = json.dumps([candidate_fp, suite_fp, settings], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def _path(self, key: str) -> Path:
        return self.root / "results" / f"{key}.json"

    def get(self, key: str) -> dict | None:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:  # a torn write from an old crash: evaluate again
            return None

    def put(self, key: str, entry: dict) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry))
        tmp.replace(p)
