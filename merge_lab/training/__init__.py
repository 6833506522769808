"""Training: the one chat format, data blocks, LoRA experts. Door: `align`."""

from merge_lab import lazy_exports

_EXPORTS = {
    "align": "merge_lab.training.align",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
