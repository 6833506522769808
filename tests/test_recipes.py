"""Every merge recipe shipped in recipes/ and the demo's is valid against the schema and the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merge_lab.merge import interface as registry
from merge_lab.merge.planner import check_keys
from merge_lab.merge.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [*ROOT.glob("recipes/**/*.y*ml"), *ROOT.glob("merge_lab/demo/recipes/*.y*ml")]
MERGE_RECIPES = sorted(p for p in SHIPPED if "merge_method" in (yaml.safe_load(p.read_text()) or {}))


@pytest.mark.parametrize("path", MERGE_RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_is_valid(path):
    recipe = parse_recipe(path.read_text(), source=str(path))
    cls = registry.get(recipe.merge_method)
    check_keys(recipe, cls)
    cls.check_recipe(recipe)


def test_single_file_checkpoint_input(tmp_path):
    """Unsharded inputs (one model.safetensors, no index) merge like sharded ones."""
    import torch

    from merge_lab.merge.engine import merge
    from merge_lab.testing import load_tensors, make_checkpoint, write_recipe

    a = make_checkpoint(tmp_path / "a", seed=1, shards=False)
    b = make_checkpoint(tmp_path / "b", seed=2, shards=False)
    assert (a / "model.safetensors").exists() and not (a / "model.safetensors.index.json").exists()
    out = merge(write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [str(a), str(b)]}),
                tmp_path / "out", progress=False).path
    ta, tb, to = load_tensors(a), load_tensors(b), load_tensors(out)
    for n in ta:
        torch.testing.assert_close(to[n], (ta[n] + tb[n]) / 2)
