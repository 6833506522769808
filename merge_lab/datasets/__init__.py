"""The shipped data sets: sources, content-hash splits, disjointness checks."""

from merge_lab import lazy_exports

_EXPORTS = {
    "Example": "merge_lab.datasets.sources",
    "load_source": "merge_lab.datasets.sources",
    "select": "merge_lab.datasets.sources",
    "check_disjoint": "merge_lab.datasets.sources",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
