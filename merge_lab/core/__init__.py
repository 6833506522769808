"""The shared toolbox: checkpoints and adapters in, shards out, configs, registries, progress, processes."""

from merge_lab import lazy_exports

_EXPORTS = {
    "Checkpoint": "merge_lab.core.checkpoint",
    "ShardWriter": "merge_lab.core.writer",
    "atomic_folder": "merge_lab.core.writer",
    "Registry": "merge_lab.core.registry",
    "load_yaml": "merge_lab.core.config",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
