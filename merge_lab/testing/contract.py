"""The strategy contract suite, public for plugin authors.

A plugin author checks a strategy with

    from merge_lab.testing import check_strategy
    def test_my_strategy(tmp_path):
        check_strategy("my_strategy", tmp_path)

which runs every contract (identity, order symmetry, shapes and dtypes, determinism, the same
result streamed in row blocks, loads in transformers with finite logits) on tiny Llama
checkpoints made on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from merge_lab.merge import interface as registry
from merge_lab.testing.tiny import load_tensors, logits, make_checkpoint, write_recipe


def _contract_recipe(cls: type[registry.Strategy], models: list[Path], base: Path | None, params: dict) -> dict:
    recipe: dict = {"merge_method": cls.name, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        recipe["base_model"] = str(base)
    model_keys = registry.recipe_keys(cls.ModelParams)
    recipe["parameters"] = {k: v for k, v in params.items() if k not in model_keys}
    for entry in recipe["models"]:
        entry["parameters"] = {k: v for k, v in params.items() if k in model_keys}
    return recipe


def _run(recipe: dict, folder: Path, name: str, chunk_elements: int | None = None) -> Path:
    from merge_lab.merge.engine import merge

    path = write_recipe(folder / f"{name}.yaml", recipe)
    return merge(path, folder / name, progress=False, hash_inputs=False, chunk_elements=chunk_elements).path


def check_strategy(name: str, workdir: str | Path, arch: str = "llama") -> None:
    """Run the strategy contract; raises AssertionError naming the contract that fails."""
    cls = registry.get(name)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(work / "base", arch, seed=0, dtype=torch.bfloat16)
    a = make_checkpoint(work / "a", arch, seed=1, dtype=torch.bfloat16, base=base)
    b = make_checkpoint(work / "b", arch, seed=2, dtype=torch.bfloat16, base=base)
    c = make_checkpoint(work / "c", arch, seed=3, dtype=torch.bfloat16, base=base)
    with_base = cls.needs_base or cls.uses_base

    # 1. identity: one model with weight 1 (or the strategy's identity parameters) gives it back;
    # skipped for strategies that declare identity_params = None (no parameters give one model
    # back, e.g. arcee_fusion keeps only outlier changes, karcher averages the model with its base)
    # and for those that need several models (min_models > 1, e.g. model_stock)
    # (in float32 arithmetic: in the models' bfloat16, mergekit's default, base + (a - base) rounds
    # back to a only where the subtraction was exact)
    if cls.identity_params is not None and cls.min_models <= 1:
        identity = _contract_recipe(cls, [a], base if with_base else None, cls.identity_params)
        ident = _run(identity | {"compute_dtype": "float32"}, work, "identity")
        expected, got = load_tensors(a), load_tensors(ident)
        assert set(got) == set(expected), f"{name}: identity merge changed the tensor names"
        for n in expected:
            assert got[n].dtype == expected[n].dtype, f"{name}: identity merge changed dtype of {n}"
            assert torch.equal(got[n], expected[n]), f"{name}: identity merge changed tensor {n}"

    # 2. shapes and dtypes preserved; 3. deterministic for a seed
    k = 3 if cls.max_models is None else cls.max_models - (1 if with_base else 0)
    inputs = [a, b, c][: max(k, cls.min_models)]
    recipe = _contract_recipe(cls, inputs, base if with_base else None, {})
    recipe["seed"] = 7
    first, second = _run(recipe, work, "run1"), _run(recipe, work, "run2")
    t1, t2, ref = load_tensors(first), load_tensors(second), load_tensors(a)
    for n in ref:
        assert t1[n].shape == ref[n].shape and t1[n].dtype == ref[n].dtype, f"{name}: shape/dtype of {n} changed"
        assert torch.equal(t1[n], t2[n]), f"{name}: two runs with the same seed differ at {n}"

    # 4. symmetric strategies ignore the order of the models
    if cls.symmetric and len(inputs) > 1:
        rev = _contract_recipe(cls, list(reversed(inputs)), base if with_base else None, {})
        rev["seed"] = 7
        t3 = load_tensors(_run(rev, work, "reversed"))
        for n in ref:
            torch.testing.assert_close(t3[n], t1[n], rtol=1e-2, atol=1e-3, msg=f"{name}: order changed {n}")

    # 5. strategies that stream in row blocks (row_separable, with or without statistics passes)
    # give what they give on whole tensors: blocks forced far smaller than the tiny tensors
    if cls.row_separable:
        t4 = load_tensors(_run(recipe, work, "blocked", chunk_elements=64))
        for n in ref:
            torch.testing.assert_close(t4[n], t1[n], rtol=1e-2, atol=1e-3, msg=f"{name}: row blocks changed {n}")

    # 6. the output loads in transformers and gives finite logits
    out = logits(first)
    assert torch.isfinite(out).all(), f"{name}: merged model gives non-finite logits"
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == arch
