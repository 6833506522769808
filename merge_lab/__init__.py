"""merge_lab: merge and fuse language models.

The public plugin API, importable from here without loading torch until it is used:
`Strategy`, `TensorContext`, `register` (merge strategies) and `check_strategy` (their contract suite).
"""

from __future__ import annotations

from collections.abc import Callable
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


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package's door, imported on first use: `__getattr__ = lazy_exports(__name__, {name: module})`.
    Importing a light submodule (a schema, the errors) then never loads torch or the package's
    heavy modules, and no package's __init__ adds an import cycle."""

    def get(name: str) -> Any:
        if name in exports:
            return getattr(import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return get


__getattr__ = lazy_exports(__name__, _EXPORTS)
