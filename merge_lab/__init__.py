"""merge_lab: merge and fuse language models.

The public plugin API, importable from here without loading torch until it is used:
`Strategy`, `TensorContext`, `register` (merge strategies) and `check_strategy` (their contract suite).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Strategy": "merge_lab.merge.interface",
    "TensorContext": "merge_lab.merge.interface",
    "register": "merge_lab.merge.interface",
    "check_strategy": "merge_lab.testing",
    "MergeLabError": "merge_lab.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'merge_lab' has no attribute {name!r}")
