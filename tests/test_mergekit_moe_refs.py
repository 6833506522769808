"""mergekit-moe configs with `model+adapter` references, and the output architectures mergekit-moe
writes from llama bases (Qwen MoE; DeepSeek MoE refused).

mergekit-moe 0.1.5 parses `base+lora` but cannot build it (its loaders assert the LoRA was merged
first, and its `hidden` gates load the bare model), so the reference for `+adapter` is mergekit's
own meaning of the reference: ModelReference.merged() (PEFT's merge_and_unload, saved in full).
mergekit-moe runs the config with each `model+adapter` replaced by that merged copy; `merge-lab moe`
runs the original config, applying the adapters while streaming and computing the gates on the
adapted base. Same gate weights, expert and other tensors.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.errors import MergeLabError
from merge_lab.moe.gates import ExpertPrompts, gate_rows
from merge_lab.moe.mergekit_run import run_moe
from merge_lab.testing.moe import ffn_expert, lora_expert, tiny_base

pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A llama base, two FFN fine-tunes, an adapter on the base (attention, FFN and the embedding:
    it moves every gate mode's rows) and an FFN adapter on one fine-tune."""
    root = tmp_path_factory.mktemp("moerefs")
    base = tiny_base(root / "base", "llama", seed=0)
    math = ffn_expert(base, root / "math", seed=1)
    return {"base": base, "math": math, "code": ffn_expert(base, root / "code", seed=2),
            "base_lora": lora_expert(base, root / "base_lora", seed=3,
                                     targets=("q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens")),
            "math_lora": lora_expert(math, root / "math_lora", seed=4)}


def config(models, gate_mode: str = "hidden", **changes) -> dict:
    m = {k: str(v) for k, v in models.items()}
    data = {"base_model": f"{m['base']}+{m['base_lora']}", "gate_mode": gate_mode, "dtype": "float32",
            "experts_per_token": 2,
            "experts": [{"source_model": f"{m['math']}+{m['math_lora']}", "positive_prompts": ["solve", "equation"],
                         "negative_prompts": ["poem"]},
                        {"source_model": m["code"], "positive_prompts": ["def f():", "class"]}]}
    return data | changes


def merged_as_mergekit(data: dict, cache: Path) -> dict:
    """`data` with every `model+adapter` replaced by mergekit's own merged copy of it (given the
    model's tokenizer files, which mergekit's copy lacks and mergekit-moe loads from the base)."""
    from mergekit.common import ModelReference

    def one(ref: str) -> str:
        if "+" not in ref:
            return ref
        merged = Path(ModelReference.model_validate(ref).merged(cache_dir=str(cache)).model.path)
        for f in Path(ref.split("+")[0]).glob("*token*"):
            shutil.copyfile(f, merged / f.name)
        return str(merged)

    out = yaml.safe_load(yaml.safe_dump(data))
    out["base_model"] = one(out["base_model"])
    for e in out["experts"] + (out.get("shared_experts") or []):
        e["source_model"] = one(e["source_model"])
    return out


def build_both(data: dict, tmp_path: Path) -> tuple[Checkpoint, Checkpoint]:
    """mergekit-moe's build() on the merged copies, `merge-lab moe` on `data` itself."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    merged = MoEMergeConfig.model_validate(merged_as_mergekit(data, tmp_path / "lora-cache"))
    options = MergeOptions(device="cpu", random_seed=0)
    options.apply_global_options()  # --random-seed 0, after the merged copies (their loading draws)
    build(merged, str(tmp_path / "mk"), options, device="cpu")
    run_moe(path, tmp_path / "ours", progress=False)
    return Checkpoint(tmp_path / "mk"), Checkpoint(tmp_path / "ours")


def per_expert(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """Every tensor under one naming: per-expert (mergekit writes Mixtral's experts fused), `mlp.`
    (ours: the hub's `block_sparse_moe.`)."""
    out = {}
    for name in ckpt.tensors:
        t = ckpt.get(name)
        name = name.replace(".block_sparse_moe.", ".mlp.")
        prefix = name.rsplit(".experts.", 1)[0]
        if name.endswith("experts.gate_up_proj"):
            for k in range(t.shape[0]):
                out[f"{prefix}.experts.{k}.w1.weight"], out[f"{prefix}.experts.{k}.w3.weight"] = t[k].chunk(2)
        elif name.endswith("experts.down_proj"):
            for k in range(t.shape[0]):
                out[f"{prefix}.experts.{k}.w2.weight"] = t[k]
        else:
            out[name] = t
    return out


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_adapter_references_match_mergekits_merged_copies(models, tmp_path, gate_mode):
    from transformers import AutoModelForCausalLM

    data = config(models, gate_mode)
    data["experts"][1]["noise_scale"] = 0.01  # the draws stay mergekit's with adapters about
    mk, ours = build_both(data, tmp_path)
    theirs, mine = per_expert(mk), per_expert(ours)
    assert set(theirs) == set(mine)
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, rtol=1e-5, atol=1e-6, msg=name)
    # the adapters changed what they target: the gates, the base's attention and embeddings, math's FFN
    bare = Checkpoint(models["base"])
    assert not torch.allclose(mine["model.embed_tokens.weight"], bare.get("model.embed_tokens.weight"))
    assert not torch.allclose(mine["model.layers.0.self_attn.q_proj.weight"],
                              bare.get("model.layers.0.self_attn.q_proj.weight"))
    math_up = Checkpoint(models["math"]).get("model.layers.1.mlp.up_proj.weight")
    assert not torch.allclose(mine["model.layers.1.mlp.experts.0.w3.weight"], math_up)
    prompts = [ExpertPrompts(e["positive_prompts"], e.get("negative_prompts") or []) for e in data["experts"]]
    bare_rows = gate_rows(models["base"], prompts, gate_mode, device="cpu").float()
    for layer in range(2):
        assert not torch.allclose(bare_rows[layer], mine[f"model.layers.{layer}.mlp.gate.weight"], atol=1e-3)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    assert model.config.model_type == "mixtral"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


def test_validate_checks_the_adapters_from_headers(models, tmp_path):
    """`merge-lab validate` plans a mergekit-moe config (no tensor read, no gate computed): an
    adapter made for another base is named with what does not fit, and the error has no traceback."""
    other = tiny_base(tmp_path / "other", "qwen3", seed=5)  # other attention shapes than the llama base
    stranger = lora_expert(other, tmp_path / "stranger", seed=6, targets=("q_proj", "up_proj"))
    good = tmp_path / "good.yml"
    good.write_text(yaml.safe_dump(config(models)))
    result = CliRunner().invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "ok" in result.output and f"LoRA adapter {models['base_lora']}" in result.output
    bad = config(models)
    bad["experts"][1]["source_model"] = f"{models['code']}+{stranger}"
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code != 0
    assert "does not fit the base" in result.output and str(stranger) in result.output
    assert "experts.1.source_model" in result.output and "Traceback" not in result.output


def test_reference_errors_name_the_key(models, tmp_path):
    data = config(models)
    data["experts"][0]["source_model"] = f"{models['math']}+{tmp_path / 'missing'}"
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(MergeLabError, match=r"experts\.0\.source_model.*adapter folder not found"):
        run_moe(path, tmp_path / "out", progress=False)
    data["experts"][0]["source_model"] = f"{models['math']}+{models['base_lora']}+{models['math_lora']}"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(MergeLabError, match="more than one '\\+'"):
        run_moe(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ---- output architectures from a llama base ----


def test_qwen_moe_from_a_llama_base_matches_mergekit(models, tmp_path):
    """mergekit-moe's Qwen MoE from llama experts: zero q/k/v biases (Qwen2-MoE's attention has them),
    the shared expert and its gate, Qwen2-MoE's config; every tensor bit for bit, and it generates.
    The base and the shared expert carry an adapter (mergekit needs the shared model to be the base
    or an expert)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = {k: str(v) for k, v in models.items()}
    adapted = f"{m['base']}+{m['base_lora']}"
    data = config(models, "hidden", architecture="qwen",
                  shared_experts=[{"source_model": adapted, "positive_prompts": ["anything"], "residual_scale": 0.5}])
    data["experts"][0]["source_model"] = m["math"]
    data["experts"][0]["noise_scale"] = 0.02
    mk, ours = build_both(data, tmp_path)
    assert set(mk.tensors) == set(ours.tensors)
    assert "model.layers.1.self_attn.k_proj.bias" in ours.tensors
    for name in mk.tensors:
        assert torch.equal(mk.get(name), ours.get(name)), name
    assert not ours.get("model.layers.0.self_attn.q_proj.bias").any()
    bare_up = Checkpoint(models["base"]).get("model.layers.0.mlp.up_proj.weight")
    assert not torch.equal(ours.get("model.layers.0.mlp.shared_expert.up_proj.weight"), bare_up)  # adapted
    theirs_cfg, ours_cfg = AutoConfig.from_pretrained(str(tmp_path / "mk")), AutoConfig.from_pretrained(str(tmp_path / "ours"))
    for key in ("model_type", "architectures", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "use_sliding_window",
                "qkv_bias", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "rms_norm_eps", "vocab_size", "tie_word_embeddings", "layer_types", "rope_parameters"):
        assert getattr(ours_cfg, key) == getattr(theirs_cfg, key), key
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ours"), dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    prompt = torch.tensor([[1, 5, 9]])
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)


def test_deepseek_output_is_refused_with_what_to_do(models, tmp_path):
    """mergekit-moe's DeepSeek MoE is model_type 'deepseek', remote code only: the installed
    transformers has no native class for it (its DeepSeek V2 / V3 use another attention)."""
    from transformers import CONFIG_MAPPING

    assert "deepseek" not in CONFIG_MAPPING  # if this fails, transformers now loads it natively: write it
    data = config(models, "random", base_model=str(models["base"]), architecture="deepseek")
    data["experts"][0]["source_model"] = str(models["math"])
    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(MergeLabError, match=r"moe.yml, line \d+ \(architecture\).*remote code.*architecture: mixtral"):
        run_moe(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_h3_architecture_key_takes_only_what_the_base_can_become(models, tmp_path):
    """h3_moe's `architecture:` (what `merge-lab moe` sets for Qwen MoE from llama): a llama base becomes
    mixtral or qwen2_moe, not qwen3_moe; the error names the key's line."""
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import parse_recipe

    recipe = {"merge_method": "h3_moe", "base_model": str(models["base"]),
              "models": [{"model": str(models["math"]), "label": "math"}, {"model": str(models["code"]), "label": "code"}],
              "parameters": {"architecture": "qwen2_moe"}}
    plan = make_plan(parse_recipe(yaml.safe_dump(recipe, sort_keys=False), source="r.yaml"))
    assert plan.config["model_type"] == "qwen2_moe" and plan.config["use_sliding_window"] is False
    assert {t.output for t in plan.tasks} >= {"model.layers.1.self_attn.v_proj.bias", "model.layers.1.mlp.gate.weight"}
    recipe["parameters"]["architecture"] = "qwen3_moe"
    with pytest.raises(MergeLabError, match=r"r.yaml, line \d+ \(parameters.architecture\): a 'llama' base cannot be made into qwen3_moe; "
                                            r"it becomes mixtral, qwen2_moe"):
        make_plan(parse_recipe(yaml.safe_dump(recipe, sort_keys=False), source="r.yaml"))
