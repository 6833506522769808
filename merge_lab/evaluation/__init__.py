"""Evaluation: candidates behind one interface, suites, metrics with uncertainty, cost. Door: `run_compare`."""

from merge_lab import lazy_exports

_EXPORTS = {
    "run_compare": "merge_lab.evaluation.compare",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
