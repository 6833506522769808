"""The engine's fast paths give the same bytes as the plain ones, and the disk check holds."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
import yaml

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.merge.ops import block_rows
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import load_recipe


def _recipe(path, method, base, models):
    params = {"weight": 0.7, "density": 0.5} if method in ("ties", "dare_ties") else {"weight": 0.7}
    if method == "slerp":
        r = {"merge_method": "slerp", "base_model": str(base), "models": [str(models[0])], "parameters": {"t": 0.3}}
    elif method == "linear":
        r = {"merge_method": "linear", "models": [{"model": str(m), "parameters": params} for m in models]}
    else:
        r = {"merge_method": method, "base_model": str(base),
             "models": [{"model": str(m), "parameters": params} for m in models]}
    path.write_text(yaml.safe_dump(r))
    return path


def _tensors(folder):
    c = Checkpoint(folder)
    out = {n: c.read(n) for n in c.tensors}
    c.close()
    return out


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_ties", "slerp", "ties"])
def test_row_blocks_give_the_same_bytes(method, family, tmp_path):
    """Row-blocked units (forced tiny here) equal whole-tensor units bit for bit, DARE's
    random masks included (one stream per tensor and model, continued across blocks)."""
    base, models = family
    recipe = _recipe(tmp_path / "r.yaml", method, base, models)
    whole = _tensors(merge(recipe, tmp_path / "whole", progress=False, hash_inputs=False).path)
    tasks = make_plan(load_recipe(recipe)).tasks
    # ties and slerp too (statistics passes first): several blocks per streamed tensor
    assert any(r is not None and r < t.shape[0] for t in tasks for r in [block_rows(t, 100)])
    assert all(block_rows(t) is None for t in tasks)  # the default blocks hold the tiny tensors whole
    parts = _tensors(merge(recipe, tmp_path / "blocked", progress=False, hash_inputs=False, chunk_elements=100).path)
    assert whole.keys() == parts.keys()
    for name in whole:
        assert torch.equal(whole[name], parts[name]), name


def test_merge_refuses_when_the_disk_cannot_hold_the_output(family, tmp_path, monkeypatch):
    base, models = family
    recipe = _recipe(tmp_path / "r.yaml", "linear", base, models)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(MergeLabError, match=r"has only 1\.00 kB free"):  # units that show small sizes
        merge(recipe, tmp_path / "out", progress=False, hash_inputs=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))
