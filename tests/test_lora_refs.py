"""`model: base+adapter` and `@revision` references, as mergekit 0.1.5 reads them.

mergekit merges the PEFT adapter into a full copy (merge_and_unload) before merging; we apply it
while streaming. Same recipe, same tiny checkpoints, real PEFT adapters: same tensors within
float32 tolerance, whole and in small row blocks. Then the errors, each naming what to fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from parity_support import assert_same_tensors, run_mergekit, run_ours
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.core.adapters import ADAPTER_WEIGHTS
from merge_lab.core.hashing import file_sha256
from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import load_recipe
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe

pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")
runner = CliRunner()
PREFIX = "base_model.model."


def peft_adapter(base: Path, path: Path, seed: int, **lora) -> Path:
    """A real PEFT LoRA adapter on `base`, its lora_B (and any saved module) perturbed from zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_B", "lora_embedding_B", "modules_to_save", "lora_magnitude")):
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(str(path), safe_serialization=True)
    assert (path / ADAPTER_WEIGHTS).is_file()
    return path


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    """A float32 llama base, a full fine-tune of it, a plain LoRA adapter (attention and MLP) and
    one with rsLoRA, rank and alpha patterns, an adapted embedding and lm_head saved whole."""
    root = tmp_path_factory.mktemp("lora")
    base = make_checkpoint(root / "base", seed=0, layers=2)
    tuned = make_checkpoint(root / "tuned", seed=1, base=base, layers=2)
    plain = peft_adapter(base, root / "plain", 2, r=4, lora_alpha=8,
                         target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    fancy = peft_adapter(base, root / "fancy", 3, r=4, lora_alpha=16, use_rslora=True,
                         target_modules=["q_proj", "k_proj", "gate_proj", "embed_tokens"],
                         rank_pattern={"model.layers.0.self_attn.q_proj": 2},
                         alpha_pattern={"gate_proj": 3.0}, modules_to_save=["lm_head"])
    return base, tuned, plain, fancy


def both(recipe: dict, tmp_path: Path, chunk: int = 64) -> None:
    """mergekit's tensors == ours, whole and streamed in blocks of `chunk` elements (B @ A of a
    block of rows is a smaller matmul, whose sums BLAS may order differently: equal within float
    tolerance, not bit for bit)."""
    theirs = run_mergekit(recipe, tmp_path / "mergekit", lora_merge_cache=str(tmp_path / "lora-cache"))
    assert_same_tensors(run_ours(recipe, tmp_path), theirs, recipe["merge_method"])
    assert_same_tensors(run_ours(recipe, tmp_path, "blocked", chunk_elements=chunk), theirs, "blocked")


def test_linear_with_an_adapter_matches_mergekit(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    both({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{base}+{plain}", "parameters": {"weight": 0.6}},
        {"model": str(tuned), "parameters": {"weight": 0.4}}]}, tmp_path)


def test_ties_with_adapters_on_the_base_matches_mergekit(lora_family, tmp_path):
    base, tuned, plain, fancy = lora_family
    both({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
          "parameters": {"density": 0.5, "lambda": 0.9},
          "models": [{"model": f"{base}+{plain}", "parameters": {"weight": 1.0}},
                     {"model": f"{base}+{fancy}", "parameters": {"weight": 0.7}},
                     {"model": str(tuned), "parameters": {"weight": 0.5}}]}, tmp_path)


def test_task_arithmetic_on_a_base_with_an_adapter_matches_mergekit(lora_family, tmp_path):
    """`base_model: base+adapter`: the deltas are taken from the adapted base, as in mergekit."""
    base, tuned, plain, fancy = lora_family
    both({"merge_method": "task_arithmetic", "base_model": f"{base}+{plain}", "dtype": "float32",
          "models": [{"model": str(tuned), "parameters": {"weight": 0.8}},
                     {"model": f"{base}+{fancy}", "parameters": {"weight": 0.5}}]}, tmp_path)


def test_rslora_patterns_embedding_and_saved_lm_head_match_peft(lora_family, tmp_path):
    """One model: the output is the adapter merged into the base, as PEFT's merge_and_unload."""
    base, _, _, fancy = lora_family
    cfg = json.loads((fancy / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["rank_pattern"] and cfg["alpha_pattern"] and cfg["modules_to_save"]
    saved = load_file(str(fancy / ADAPTER_WEIGHTS))
    assert f"{PREFIX}lm_head.weight" in saved and f"{PREFIX}model.embed_tokens.lora_embedding_A" in saved
    recipe = {"merge_method": "linear", "dtype": "float32", "models": [{"model": f"{base}+{fancy}", "parameters": {"weight": 1.0}}]}
    both(recipe, tmp_path, chunk=48)
    ours, base_tensors = run_ours(recipe, tmp_path, "again"), load_tensors(base)
    # the patterns changed what they name: rank 2 at q_proj of layer 0, alpha 3 at gate_proj
    q0 = "model.layers.0.self_attn.q_proj.weight"
    a, b = saved[f"{PREFIX}{q0[:-7]}.lora_A.weight"], saved[f"{PREFIX}{q0[:-7]}.lora_B.weight"]
    assert a.shape[0] == 2
    torch.testing.assert_close(ours[q0], base_tensors[q0] + 16 / 2**0.5 * b @ a)
    torch.testing.assert_close(ours["lm_head.weight"], saved[f"{PREFIX}lm_head.weight"])


def test_slices_with_an_adapter_match_mergekit(lora_family, tmp_path):
    """A frankenmerge stacking layers of base+adapter and of the fine-tune (passthrough slices)."""
    base, tuned, plain, _ = lora_family
    both({"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": f"{base}+{plain}", "layer_range": [0, 2]}]},
        {"sources": [{"model": str(tuned), "layer_range": [1, 2]}]}]}, tmp_path)


def test_dora_matches_mergekit(lora_family, tmp_path):
    base, tuned, _, _ = lora_family
    dora = peft_adapter(base, tmp_path / "dora", 4, r=4, lora_alpha=8, use_dora=True,
                        target_modules=["q_proj", "v_proj", "down_proj"])
    assert any("lora_magnitude_vector" in k for k in load_file(str(dora / ADAPTER_WEIGHTS)))
    both({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": f"{base}+{dora}", "parameters": {"weight": 0.7}},
        {"model": str(tuned), "parameters": {"weight": 0.3}}]}, tmp_path)


def test_bfloat16_base_rounds_once_like_peft(tmp_path):
    """A bfloat16 base: W + delta in float32, rounded to bfloat16 once, as PEFT merges a float32
    adapter into a bfloat16 model (mergekit loads the base in its own dtype)."""
    base = make_checkpoint(tmp_path / "bf16", seed=5, dtype=torch.bfloat16, layers=1)
    adapter = peft_adapter(base, tmp_path / "bf16-lora", 6, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"])
    recipe = {"merge_method": "linear", "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}
    theirs = run_mergekit(recipe, tmp_path / "mergekit", lora_merge_cache=str(tmp_path / "lora-cache"))
    ours = run_ours(recipe, tmp_path)
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert_same_tensors(ours, theirs, "bfloat16", rtol=0, atol=0)


def test_lora_bias_on_a_qwen2_base_matches_mergekit(tmp_path):
    """PEFT's `lora_bias`: the base's q/v biases change by scale * lora_B.bias."""
    base = make_checkpoint(tmp_path / "qwen2", arch="qwen2", seed=7, layers=1)
    adapter = peft_adapter(base, tmp_path / "biased", 8, r=2, lora_alpha=4, lora_bias=True,
                           target_modules=["q_proj", "v_proj"])
    assert f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.bias" in load_file(str(adapter / ADAPTER_WEIGHTS))
    both({"merge_method": "linear", "dtype": "float32",
          "models": [{"model": f"{base}+{adapter}", "parameters": {"weight": 1.0}}]}, tmp_path, chunk=16)
    ours, plain = run_ours({"merge_method": "linear", "models": [f"{base}+{adapter}"]}, tmp_path, "bias"), load_tensors(base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], plain["model.layers.0.self_attn.q_proj.bias"])


def test_validate_and_card_list_the_adapter(lora_family, tmp_path, monkeypatch):
    from merge_lab.core.checkpoint import Checkpoint

    base, tuned, plain, _ = lora_family
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [f"{base}+{plain}", str(tuned)]})
    with monkeypatch.context() as m:  # validate reads headers and configs only, no tensor
        for method in ("read", "get"):
            m.setattr(Checkpoint, method, lambda *a, **k: pytest.fail("validate read a tensor"))
        result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"LoRA adapter {plain} applied to {base}" in text and "scale 2" in text, text
    assert "over 3 checkpoint(s)" in text  # base, adapter, fine-tune
    planned = runner.invoke(app, ["plan", str(recipe)])
    assert planned.exit_code == 0 and f"LoRA adapter {plain} applied" in " ".join(planned.output.split())
    out = merge(recipe, tmp_path / "out", progress=False).path
    card = (out / "README.md").read_text()
    assert f"- `{plain}`" in card and file_sha256(plain / ADAPTER_WEIGHTS) in card
    assert f"- `{base}`" in card and card.count(f"- `{base}`") == 1


def test_a_folder_named_with_plus_or_at_is_a_folder(lora_family, tmp_path):
    base, tuned, _, _ = lora_family
    odd = tmp_path / "v1+extra@main"
    shutil.copytree(tuned, odd)
    plan = make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", {"merge_method": "linear",
                                                                     "models": [str(base), str(odd)]})))
    assert [c.path for c in plan.inputs] == [base, odd] and not any("LoRA" in n for n in plan.notes)


def test_several_plus_split_where_the_model_folder_exists(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    odd = tmp_path / "base+v2"
    shutil.copytree(base, odd)
    plan = make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", {"merge_method": "linear",
                                                                     "models": [f"{odd}+{plain}", str(tuned)]})))
    assert [c.path for c in plan.inputs] == [odd, plain, tuned]
    assert any(f"LoRA adapter {plain} applied to {odd}" in n for n in plan.notes)
    text = plan_error(tmp_path, [f"{tmp_path / 'x'}+{tmp_path / 'y'}+{plain}", str(tuned)])
    assert "has 2 '+' and no part before one of them is an existing folder" in text, text


def test_view_reads_alike_whole_in_rows_and_into_a_buffer(lora_family, tmp_path):
    """The view's read paths (the engine's float32 buffer, a fresh tensor, get) give one tensor."""
    from merge_lab.core.references import ModelOpener

    base, _, _, fancy = lora_family
    view = ModelOpener().open(f"{base}+{fancy}", "test")
    merged = run_ours({"merge_method": "linear", "dtype": "float32",
                       "models": [{"model": f"{base}+{fancy}", "parameters": {"weight": 1.0}}]}, tmp_path)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate_proj.weight"):
        assert view.read(name).dtype == torch.float32 and view.get(name).shape == merged[name].shape
        torch.testing.assert_close(view.read(name), merged[name])
        torch.testing.assert_close(view.get(name), merged[name])
        buf = torch.empty(merged[name].numel())
        torch.testing.assert_close(view.read(name, (3, 9), torch.float32, out=buf), merged[name][3:9])
        assert view.read(name, (3, 9), torch.bfloat16).dtype == torch.bfloat16
    assert not torch.equal(merged["lm_head.weight"], load_tensors(base)["lm_head.weight"])
    view.close()


# ---------------------------------------------------------------- errors


def test_one_model_adapter_pair_listed_twice_in_two_spellings(lora_family, tmp_path, monkeypatch):
    base, tuned, plain, _ = lora_family
    monkeypatch.chdir(base.parent)
    text = plan_error(tmp_path, [f"{base.name}+{plain.name}", str(tuned), f"./{base.name}/+{plain}"])
    assert "(models.2)" in text and "is the model already listed as models.0" in text, text


def plan_error(tmp_path: Path, models: list[str], base: str | None = None) -> str:
    recipe = {"merge_method": "linear", "models": models} | ({"base_model": base} if base else {})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    with pytest.raises(MergeLabError) as e:
        make_plan(load_recipe(path))
    return " ".join(str(e.value).split())


def broken_copy(adapter: Path, tmp_path: Path, name: str = "broken") -> Path:
    out = tmp_path / name
    shutil.copytree(adapter, out)
    return out


@pytest.mark.parametrize("ref", ["org/model@v1", "BASE+org/lora@main"])
def test_revision_says_how_to_download_it(lora_family, tmp_path, ref):
    base, tuned, _, _ = lora_family
    text = plan_error(tmp_path, [str(tuned), ref.replace("BASE", str(base))])
    repo, rev = ref.replace("BASE+", "").split("@")
    assert "recipe.yaml, line " in text and "(models.1.model)" in text, text
    assert f"huggingface-cli download {repo} --revision {rev} --local-dir DIR" in text and "does not reach" in text


def test_missing_adapter_folder_names_the_key(lora_family, tmp_path):
    base, tuned, _, _ = lora_family
    text = plan_error(tmp_path, [str(tuned), f"{base}+{tmp_path / 'nope'}"])
    assert "(models.1.model)" in text and "adapter folder not found" in text and "nope" in text


def test_adapter_shape_mismatch(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    bad = broken_copy(plain, tmp_path)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    key = f"{PREFIX}model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    text = plan_error(tmp_path, [f"{base}+{bad}", str(tuned)])
    assert "(models.0.model)" in text and "does not fit the base" in text
    assert "'model.layers.1.mlp.up_proj.weight' is (64, 32) in the base but the adapter's B @ A is (67, 32)" in text


def test_bin_only_adapter_is_refused_unread(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    bad = broken_copy(plain, tmp_path)
    (bad / ADAPTER_WEIGHTS).unlink()
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04 not unpickled, ever")
    text = plan_error(tmp_path, [f"{base}+{bad}", str(tuned)])
    assert "adapter_model.safetensors: missing" in text and ".bin adapters are not read" in text


@pytest.mark.parametrize("kind", ["lora pair", "saved whole"])
def test_adapter_tensor_without_base_tensor(lora_family, tmp_path, kind):
    base, tuned, plain, _ = lora_family
    bad = broken_copy(plain, tmp_path)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    if kind == "lora pair":
        tensors[f"{PREFIX}model.layers.7.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
        tensors[f"{PREFIX}model.layers.7.mlp.up_proj.lora_B.weight"] = torch.zeros(64, 4)
        want = "it adapts 'model.layers.7.mlp.up_proj.weight', which the base has no tensor for"
    else:
        tensors[f"{PREFIX}score.weight"] = torch.zeros(2, 32)
        want = "its tensor 'base_model.model.score.weight' (saved whole) replaces 'score.weight', which the base has no"
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    assert want in plan_error(tmp_path, [f"{base}+{bad}", str(tuned)])


def test_adapter_weights_linked_outside_the_folder(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    bad = broken_copy(plain, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(bad / ADAPTER_WEIGHTS, outside)
    (bad / ADAPTER_WEIGHTS).symlink_to(outside)
    assert "lies outside the model folder" in plan_error(tmp_path, [f"{base}+{bad}", str(tuned)])


def test_non_finite_adapter_is_refused_at_merge(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    bad = broken_copy(plain, tmp_path)
    tensors = load_file(str(bad / ADAPTER_WEIGHTS))
    key = f"{PREFIX}model.layers.0.self_attn.v_proj.lora_A.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / ADAPTER_WEIGHTS))
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [f"{base}+{bad}", str(tuned)]})
    with pytest.raises(MergeLabError, match=f"tensor '{key}' holds 1 NaN / Inf"):
        merge(recipe, tmp_path / "out", progress=False, allow_non_finite=True)
    assert not (tmp_path / "out").exists()


def test_dora_flag_without_magnitudes_and_misplaced_adapters_are_refused(lora_family, tmp_path):
    base, tuned, plain, _ = lora_family
    dora = broken_copy(plain, tmp_path, "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    text = plan_error(tmp_path, [f"{base}+{dora}", str(tuned)])
    assert "has no lora_magnitude_vector but adapter_config.json sets use_dora True" in text, text
    assert "is an adapter folder" in plan_error(tmp_path, [f"{plain}+{plain}", str(tuned)])
    assert "has no adapter_config.json, so it is no PEFT adapter" in plan_error(tmp_path, [f"{base}+{tuned}", str(base)])
