"""Running one recipe through mergekit 0.1.5 and through merge_lab, for the parity tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from merge_lab.merge.engine import merge
from merge_lab.testing import load_tensors, write_recipe


def run_mergekit(recipe: dict, out: Path, **options) -> dict[str, torch.Tensor]:
    """mergekit's tensors for `recipe` (a dict in mergekit's YAML schema); `options`: more
    MergeOptions (e.g. lora_merge_cache, where mergekit writes a `model+lora` merged in full)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    shutil.rmtree(out, ignore_errors=True)
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=MergeOptions(copy_tokenizer=False, quiet=True, **options))
    return load_tensors(out)


def run_ours(recipe: dict, tmp_path: Path, name: str = "ours", **merge_options) -> dict[str, torch.Tensor]:
    """merge_lab's tensors for the same recipe."""
    path = write_recipe(tmp_path / f"{name}.yaml", recipe)
    return load_tensors(merge(path, tmp_path / name, progress=False, hash_inputs=False, **merge_options).path)


def assert_same_tensors(ours: dict, theirs: dict, case: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert set(ours) == set(theirs), f"{case}: tensor names differ: {sorted(set(ours) ^ set(theirs))[:5]}"
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=atol, msg=f"{case}: {name}")
