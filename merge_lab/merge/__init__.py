"""Weight merges: recipe -> plan (headers only) -> streamed engine -> shards. Doors: `merge`, `make_plan`, `run_plan`."""

from merge_lab import lazy_exports

_EXPORTS = {
    "merge": "merge_lab.merge.engine",
    "run_plan": "merge_lab.merge.engine",
    "make_plan": "merge_lab.merge.planner",
    "load_recipe": "merge_lab.merge.recipe",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
