"""Bad input gets a clear error (naming the file, tensor or key), a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.testing import make_checkpoint, write_recipe

runner = CliRunner()


def ties(base, models, **params):
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in models],
            "parameters": params}


def assert_fails(tmp_path, recipe: dict | str, *fragments: str, out_name="out"):
    """Through the CLI: exit 2, each fragment in the message, and no output nor temp folder left."""
    path = tmp_path / "recipe.yaml"
    if isinstance(recipe, str):
        path.write_text(recipe)
    else:
        write_recipe(path, recipe)
    out = tmp_path / out_name
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for frag in fragments:
        assert frag in text, f"{frag!r} not in: {text}"
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out_name}.partial-*"))
    return text


def test_missing_model_folder(family, tmp_path):
    base, models = family
    assert_fails(tmp_path, ties(base, [models[0], tmp_path / "nope"]), "nope", "model folder not found")


def test_missing_shard_file(family, tmp_path):
    base, models = family
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert_fails(tmp_path, ties(base, [broken]), shard.name, "not in the folder")


def test_truncated_safetensors(family, tmp_path):
    base, models = family
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_fails(tmp_path, ties(base, [broken]), shard.name, "truncated")


def test_corrupt_header(family, tmp_path):
    base, models = family
    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"\xff" * 64)
    assert_fails(tmp_path, ties(base, [broken]), shard.name, "corrupt safetensors header")


def test_mismatched_shapes(family, tmp_path):
    base, _ = family
    other = make_checkpoint(tmp_path / "wide", "llama", seed=5, dtype=torch.bfloat16)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 48
    from transformers import AutoConfig, AutoModelForCausalLM

    wide = tmp_path / "narrow"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg)).save_pretrained(wide)
    assert_fails(tmp_path, ties(base, [wide]), "mlp.down_proj.weight", "shape", "(32, 48)")


def test_missing_tensor(family, tmp_path):
    base, models = family
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(models[0], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = broken / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_fails(tmp_path, ties(base, [broken]), "lacks 1 tensor", name)


def test_unknown_strategy_suggests(family, tmp_path):
    base, models = family
    recipe = ties(base, models[:2]) | {"merge_method": "tie"}
    assert_fails(tmp_path, recipe, "unknown merge method 'tie'", "Did you mean 'ties'")


def test_wrong_parameter_type_names_key_and_line(family, tmp_path):
    base, models = family
    text = (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {models[0]}\n    parameters:\n      weight: 1.0\n      density: lots\n"
    )
    assert_fails(tmp_path, text, "line 7", "density", "'lots'")


def test_out_of_range_parameter(family, tmp_path):
    base, models = family
    recipe = ties(base, models[:1])
    recipe["models"][0]["parameters"]["density"] = 1.5
    assert_fails(tmp_path, recipe, "density", "less than or equal to 1")


def test_unknown_key_suggests_closest(family, tmp_path):
    base, models = family
    text = f"merge_method: linear\nmodels:\n  - model: {models[0]}\nparamters:\n  normalize: true\n"
    assert_fails(tmp_path, text, "line 4", "unknown key 'paramters'", "Did you mean 'parameters'")


def test_unknown_parameter_suggests_closest(family, tmp_path):
    base, models = family
    assert_fails(tmp_path, ties(base, models[:1], lamda=0.5), "no parameter 'lamda'", "Did you mean 'lambda'")


def test_missing_base_for_delta_method(family, tmp_path):
    _, models = family
    recipe = ties("x", models[:2])
    del recipe["base_model"]
    assert_fails(tmp_path, recipe, "'ties' needs 'base_model:'")


def test_output_exists_refused_unless_force(family, tmp_path):
    base, models = family
    path = write_recipe(tmp_path / "r.yaml", ties(base, models[:2]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2 and "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_failure_mid_merge_leaves_nothing(family, tmp_path, monkeypatch):
    """A strategy that fails (or Ctrl-C) after some tensors were written: no output, no temp folder."""
    base, models = family
    from merge_lab.strategies.ties import Ties

    calls = {"n": 0}
    original = Ties.merge

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Ties, "merge", flaky)
    path = write_recipe(tmp_path / "r.yaml", ties(base, models[:2]))
    with pytest.raises(KeyboardInterrupt):
        merge(path, tmp_path / "out", progress=False)
    assert calls["n"] == 5
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_invalid_yaml(tmp_path):
    assert_fails(tmp_path, "merge_method: [unclosed\n", "not valid YAML", "line")


def test_mergekit_slices_and_models_together_are_rejected_clearly(tmp_path):
    text = "slices:\n  - sources: []\nmodels: [a]\nmerge_method: passthrough\n"
    assert_fails(tmp_path, text, "line 1", "'slices:'", "not both")


def test_library_raises_merge_lab_error(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [str(tmp_path / "none")]})
    with pytest.raises(MergeLabError):
        merge(path, tmp_path / "out")


def test_different_architectures(family, tmp_path):
    base, models = family
    mistral = make_checkpoint(tmp_path / "mistral", "mistral", seed=4, dtype=torch.bfloat16)
    assert_fails(tmp_path, ties(base, [models[0], mistral]), "'mistral' model", "'llama'")


def test_a_killed_run_leaves_nothing_after_the_next_run(family, tmp_path):
    """SIGKILL cannot clean up; the next merge to the same target removes the dead run's folder."""
    import subprocess
    import sys

    base, models = family
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale = tmp_path / f".out.partial-{pid}-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".out.partial-{os.getpid()}-xyz"  # a run still going: left alone
    live.mkdir()
    merge(write_recipe(tmp_path / "r.yaml", ties(base, models[:2])), tmp_path / "out", progress=False)
    assert not stale.exists() and live.exists()
    assert (tmp_path / "out" / "config.json").exists()


def test_atomic_folder_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    """align, the GGUF conversion and compare's config variants write through atomic_folder."""
    from merge_lab.core.writer import atomic_folder

    target = tmp_path / "expert"
    target.mkdir()
    (target / "old.txt").write_text("previous run")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "adapter.safetensors").write_bytes(b"half")
            raise KeyboardInterrupt
    assert (target / "old.txt").exists() and not (target / "adapter.safetensors").exists()
    with atomic_folder(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(f".expert.partial-{os.getpid()}-")
        (tmp / "adapter.safetensors").write_bytes(b"whole")
    assert [p.name for p in target.iterdir()] == ["adapter.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]
