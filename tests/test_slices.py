"""mergekit's `slices:` and `passthrough`: parity with mergekit 0.1.5, the `models:` equivalence,
loading the output, and the errors of bad slices (with their recipe line)."""

from __future__ import annotations

import json

import pytest
import torch
from parity_support import assert_same_tensors, run_mergekit, run_ours
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.errors import MergeLabError
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import parse_recipe
from merge_lab.testing import load_tensors, make_checkpoint

runner = CliRunner()


def src(model, a: int, b: int, **params) -> dict:
    out: dict = {"model": str(model), "layer_range": [a, b]}
    if params:
        out["parameters"] = params
    return out


def recipes(base, models) -> dict[str, dict]:
    m1, m2, _ = models
    return {
        "slerp": {"merge_method": "slerp", "base_model": str(base), "slices": [{
            "sources": [src(base, 0, 3), src(m1, 0, 3)],
            "parameters": {"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": [0.2, 0.7]}]}}]},
        "ties": {"merge_method": "ties", "base_model": str(base), "parameters": {"lambda": 0.9, "density": 0.6},
                 "slices": [{"sources": [src(base, 0, 3), src(m1, 0, 3, weight=1.0, density=0.5),
                                         src(m2, 0, 3, weight=[0.3, 0.8])]}]},
        "linear_two_slices": {"merge_method": "linear", "slices": [
            {"sources": [src(m1, 0, 2, weight=[0.2, 1.0]), src(m2, 1, 3, weight=0.5)]},
            {"sources": [src(m1, 2, 3), src(m2, 0, 1)], "parameters": {"weight": [0.5, 0.1]}}]},
        "passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [src(m1, 0, 2)]}, {"sources": [src(m1, 1, 3)]}]},
    }


@pytest.mark.parametrize("case", list(recipes("b", ["1", "2", "3"])))
def test_slices_same_tensors_as_mergekit(case, fp32_family, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")
    base, models = fp32_family
    recipe = recipes(base, models)[case] | {"dtype": "float32"}
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = run_ours(recipe, tmp_path)
    assert_same_tensors(ours, theirs, case)
    blocked = run_ours(recipe, tmp_path, "blocked", chunk_elements=200)  # streamed in small row blocks
    assert_same_tensors(blocked, theirs, f"{case} (row blocks)")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs_cfg = json.loads((tmp_path / "mergekit" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]


def test_frankenmerge_stacks_a_model_with_itself(fp32_family, tmp_path):
    from transformers import AutoModelForCausalLM

    _, models = fp32_family
    ours = run_ours(recipes("b", models)["passthrough"], tmp_path)
    m1 = load_tensors(models[0])
    for out_layer, in_layer in enumerate([0, 1, 1, 2]):
        for name, value in m1.items():
            if f".layers.{in_layer}." in name:
                assert torch.equal(ours[name.replace(f".layers.{in_layer}.", f".layers.{out_layer}.")], value)
    assert torch.equal(ours["model.embed_tokens.weight"], m1["model.embed_tokens.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_passthrough_scale(fp32_family, tmp_path):
    _, models = fp32_family
    recipe = {"merge_method": "passthrough", "models": [
        {"model": str(models[0]), "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 2.0}]}}]}
    ours = run_ours(recipe, tmp_path)
    m1 = load_tensors(models[0])
    for name, value in m1.items():
        assert torch.equal(ours[name], value * (0.0 if "o_proj" in name else 2.0)), name


def test_models_and_equivalent_slices_give_the_same_tensors(fp32_family, tmp_path):
    base, (m1, m2, _) = fp32_family
    params = {"lambda": 0.9, "density": [0.3, 0.7]}
    per = [{"weight": 1.0}, {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": [0.2, 1.0]}]}]
    as_models = {"merge_method": "ties", "base_model": str(base), "parameters": params,
                 "models": [{"model": str(m), "parameters": p} for m, p in zip((m1, m2), per)]}
    as_slices = {"merge_method": "ties", "base_model": str(base), "parameters": params,
                 "slices": [{"sources": [src(base, 0, 3), *(src(m, 0, 3, **p) for m, p in zip((m1, m2), per))]}]}
    a, b = run_ours(as_models, tmp_path, "models"), run_ours(as_slices, tmp_path, "slices")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fails(text: str, *fragments: str) -> None:
    with pytest.raises(MergeLabError) as e:
        make_plan(parse_recipe(text, "r.yaml"))
    msg = " ".join(str(e.value).split())
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"


def test_models_and_slices_together_is_an_error(fp32_family):
    _, (m1, _, _) = fp32_family
    fails(f"merge_method: linear\nmodels:\n  - model: {m1}\nslices:\n  - sources:\n      - model: {m1}\n"
          "        layer_range: [0, 3]\n", "r.yaml, line 4 (slices)", "line 2", "not both")


def test_unequal_source_lengths_name_the_slice(fp32_family):
    _, (m1, m2, _) = fp32_family
    fails(f"merge_method: linear\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 3]\n"
          f"  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\n      - model: {m2}\n        layer_range: [0, 1]\n",
          "line 6 (slices.1.sources)", "slice 1", "[2, 1]")


def test_range_past_the_models_layers(fp32_family, tmp_path):
    """`validate` sees it from config.json, before any tensor is read."""
    _, (m1, _, _) = fp32_family
    text = (f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 2]\n"
            f"  - sources:\n      - model: {m1}\n        layer_range: [2, 5]\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    msg = " ".join(result.output.split())
    assert "line 8 (slices.1.sources.0.layer_range)" in msg and "has 3 layer(s)" in msg, msg


@pytest.mark.parametrize("bad", ["[2, 2]", "[-1, 2]", "[0]"])
def test_malformed_ranges(bad, fp32_family):
    _, (m1, _, _) = fp32_family
    fails(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: {bad}\n",
          "line 5", "layer_range")


def test_slice_errors_point_into_the_slice(fp32_family):
    base, (m1, m2, _) = fp32_family
    # a base-using method whose base is not among a slice's sources
    fails(f"merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n      - model: {m1}\n"
          "        layer_range: [0, 3]\n", "line 4 (slices.0.sources)", "base_model")
    # an unknown per-source parameter names its own line
    fails(f"merge_method: linear\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 3]\n"
          f"        parameters:\n          wieght: 1\n      - model: {m2}\n        layer_range: [0, 3]\n",
          "line 7 (slices.0.sources.0.parameters.wieght)", "Did you mean 'weight'")
    # passthrough takes one source per slice
    fails(f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {m1}\n        layer_range: [0, 3]\n"
          f"      - model: {m2}\n        layer_range: [0, 3]\n", "slices.0.sources", "at most 1")


def test_passthrough_write_recipe_roundtrip(fp32_family, tmp_path):
    """The recipe written next to the output (merge_recipe.yaml) is a valid sliced recipe again."""
    _, models = fp32_family
    recipe = recipes("b", models)["passthrough"]
    run_ours(recipe, tmp_path)
    again = parse_recipe((tmp_path / "ours" / "merge_recipe.yaml").read_text())
    assert again.slices is not None and [s.length for s in again.slices] == [2, 2]
    assert make_plan(again).config["num_hidden_layers"] == 4


def test_per_layer_config_fields_follow_the_stacked_layers(tmp_path):
    """qwen2's `layer_types` (one entry per layer) is restacked with the layers; the output loads."""
    from transformers import AutoModelForCausalLM

    m = make_checkpoint(tmp_path / "m", "qwen2", seed=1, dtype=torch.float32, layers=3)
    cfg = json.loads((m / "config.json").read_text())
    types = ["full_attention", "sliding_attention", "full_attention"]
    (m / "config.json").write_text(json.dumps(cfg | {"layer_types": types}))
    recipe = {"merge_method": "passthrough", "slices": [{"sources": [src(m, 1, 3)]}, {"sources": [src(m, 0, 2)]}]}
    run_ours(recipe, tmp_path)
    out = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == [types[1], types[2], types[0], types[1]]
    assert len(AutoModelForCausalLM.from_pretrained(tmp_path / "ours").model.layers) == 4
