"""The demo: its recipes (package data) run in order. Door: `run_demo`."""

from merge_lab import lazy_exports

_EXPORTS = {
    "run_demo": "merge_lab.demo.pipeline",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
