"""How a compare file's paths resolve: from the working directory as in recipes, else beside the file."""

from __future__ import annotations

from pathlib import Path


def resolve(root: Path, p: str) -> Path:
    """Relative paths count from the working directory, as in recipes; one that does not exist
    there but does beside the compare file (in `root`) is taken from there."""
    q = Path(p).expanduser()
    if q.is_absolute() or q.exists() or not (root / q).exists():
        return q
    return root / q


def checkpoint_folder(root: Path, ref: str) -> Path:
    """A checkpoint folder; 'smollm2' names the shipped SmolLM2-135M-Instruct (converted once)."""
    p = resolve(root, ref)
    if not p.exists():
        from merge_lab.core import bases as assets

        if ref.lower() in assets.SMOLLM2_ALIASES:
            return assets.smollm2_base()
    return p
