"""`merge-lab moe config.yaml -o out/`: a mergekit-moe config built by mergekit-moe and by us gives the
same tensors; the result loads and runs; a `train:` block trains the gates; bad configs exit 2 with the line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.errors import MergeLabError
from merge_lab.moe.mergekit_config import looks_like_mergekit_moe, refuse_as_recipe
from merge_lab.moe.mergekit_run import moe_recipe
from merge_lab.testing.moe import ffn_expert, labelled_jsonl, tiny_base


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moecmd")
    base = tiny_base(root / "base", "llama", seed=0)
    return {"base": base, "math": ffn_expert(base, root / "math", seed=1),
            "code": ffn_expert(base, root / "code", seed=2)}


def _config(models, **changes) -> dict:
    data = {
        "base_model": str(models["base"]),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(models["math"]), "positive_prompts": ["solve", "equation"], "negative_prompts": ["poem"]},
            {"source_model": str(models["code"]), "positive_prompts": ["def f():", "class"]},
        ],
    }
    data.update(changes)
    return data


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(*args: str):
    return CliRunner().invoke(app, ["moe", *args, "--no-progress"])


def _mergekit_build(config: dict, out: Path) -> None:
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(device="cpu"), device="cpu")


_ROLE = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_EXPERT = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_ROUTER = re.compile(r"(.*)\.(?:block_sparse_moe|mlp)\.gate\.weight$")


def _moe_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """An MoE checkpoint's tensors under layout-free names (PREFIX.router, PREFIX.E.gate/up/down).
    mergekit-moe saves through transformers 5, which fuses experts: mlp.experts.gate_up_proj
    [E, 2I, H] (gate rows, then up) and mlp.experts.down_proj [E, H, I]; we write the hub's
    per-expert tensors (Mixtral's block_sparse_moe.experts.E.w1/w3/w2, Qwen's mlp.experts.E.*_proj)."""
    out = {}
    for name in ckpt.tensors:
        t = ckpt.get(name)
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, half = name.removesuffix(".mlp.experts.gate_up_proj"), t.shape[1] // 2
            for k in range(t.shape[0]):
                out[f"{prefix}.{k}.gate"], out[f"{prefix}.{k}.up"] = t[k, :half], t[k, half:]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".mlp.experts.down_proj")
            for k in range(t.shape[0]):
                out[f"{prefix}.{k}.down"] = t[k]
        elif m := _EXPERT.match(name):
            out[f"{m[1]}.{m[2]}.{_ROLE[m[3]]}"] = t
        elif m := _ROUTER.match(name):
            out[f"{m[1]}.router"] = t
        else:
            out[name] = t
    return out


def _assert_same_moe(theirs_dir: Path, ours_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    theirs, ours = _moe_tensors(Checkpoint(theirs_dir)), _moe_tensors(Checkpoint(ours_dir))
    assert set(ours) == set(theirs) and "model.layers.1.1.down" in ours and "model.layers.1.router" in ours
    for name, a in theirs.items():
        b = ours[name]
        assert a.dtype == b.dtype == dtype, name
        assert torch.equal(a, b), name  # gates, experts, attention, norms, embeddings: bit for bit
    return ours


def _finite_logits(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.parametrize(("mode", "residual_scale"), [("hidden", None), ("cheap_embed", 0.5), ("random", None)])
def test_moe_matches_mergekit_moe(models, tmp_path, mode, residual_scale):
    config = _config(models, gate_mode=mode)
    config["experts"][1]["residual_scale"] = residual_scale
    path = _write(tmp_path / "moe.yml", config)
    torch.manual_seed(0)  # mergekit's random gates come from the global RNG; ours from seed 0
    _mergekit_build(config, tmp_path / "mk")
    res = _run(str(path), "-o", str(tmp_path / "ours"))
    assert res.exit_code == 0, res.output
    assert "moe complete" in res.output and "Mixtral" in res.output

    ours = _assert_same_moe(tmp_path / "mk", tmp_path / "ours")
    down = Checkpoint(models["code"]).get("model.layers.1.mlp.down_proj.weight")
    torch.testing.assert_close(ours["model.layers.1.1.down"], down * (residual_scale or 1.0), atol=0, rtol=0)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 2 and cfg["num_experts_per_tok"] == 2
    _finite_logits(tmp_path / "ours")


def test_qwen3_base_gives_qwen3_moe_like_mergekit(tmp_path):
    base = tiny_base(tmp_path / "base", "qwen3", seed=0)
    models = {"base": base, "math": ffn_expert(base, tmp_path / "math", seed=1),
              "code": ffn_expert(base, tmp_path / "code", seed=2)}
    config = _config(models, gate_mode="hidden", experts_per_token=1)
    _mergekit_build(config, tmp_path / "mk")
    res = _run(str(_write(tmp_path / "moe.yml", config)), "-o", str(tmp_path / "ours"))
    assert res.exit_code == 0, res.output
    assert "Qwen3 MoE" in res.output
    _assert_same_moe(tmp_path / "mk", tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["num_experts_per_tok"] == 1
    _finite_logits(tmp_path / "ours")


def test_gate_rows_take_the_output_dtype(models, tmp_path):
    path = _write(tmp_path / "moe.yml", _config(models, dtype="bfloat16"))
    res = _run(str(path), "-o", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output
    out = Checkpoint(tmp_path / "out")
    router = next(n for n in out.tensors if n.endswith("gate.weight") and "experts" not in n)
    assert out.info(router).dtype == torch.bfloat16


def test_train_block_trains_the_gates(models, tmp_path):
    data = labelled_jsonl(tmp_path / "data.jsonl", ["math", "code"], per_label=4)
    config = _config(models, train={"data": str(data), "steps": 2, "batch_size": 4, "lr": 0.05, "lambda": 1.0,
                                    "eval_rows": 8, "cpu": True})
    path = _write(tmp_path / "moe.yml", config)
    plain = _write(tmp_path / "plain.yml", _config(models))
    assert _run(str(plain), "-o", str(tmp_path / "gates")).exit_code == 0
    res = _run(str(path), "-o", str(tmp_path / "trained"))
    assert res.exit_code == 0, res.output
    assert "training steps" in res.output and re.search(r"routing accuracy[\s│|]+\d\.\d{3} -> \d\.\d{3}", res.output)
    before, after = Checkpoint(tmp_path / "gates"), Checkpoint(tmp_path / "trained")
    routers = [n for n in before.tensors if n.endswith("gate.weight") and "experts" not in n]
    assert routers and all(n in after for n in routers)
    assert any(not torch.equal(before.get(n), after.get(n).to(before.get(n).dtype)) for n in routers)
    assert not (tmp_path / ".trained.fuse-work").exists()


def _line(text: str, needle: str) -> int:
    return next(i for i, s in enumerate(text.splitlines(), 1) if needle in s)


@pytest.mark.parametrize(("change", "needle", "message"), [
    (lambda d: d["experts"][0].update(noise_scale="x"), "noise_scale", "valid number"),
    (lambda d: d.update(architecture="deepseek"), "architecture", "never runs remote code"),
    (lambda d: d.update(experts_per_token=3), "experts_per_token", "only 2"),
    (lambda d: d["experts"][0].update(positive_promts=["x"]), "positive_promts", "Did you mean"),
    (lambda d: d.update(train={"steps": 2}), "train", "data"),
])
def test_bad_configs_exit_2_with_the_line(models, tmp_path, change, needle, message):
    data = _config(models)
    change(data)
    path = _write(tmp_path / "moe.yml", data)
    text = path.read_text()
    res = _run(str(path), "-o", str(tmp_path / "out"))
    assert res.exit_code == 2, res.output
    assert f"line {_line(text, needle)}" in res.output and message in " ".join(res.output.split())
    assert not (tmp_path / "out").exists()


def test_qwen_moe_from_a_llama_base_asks_h3_for_qwen2_moe(models, tmp_path):
    """mergekit's "qwen from llama" (a Qwen2-MoE config made from a llama one): h3_moe's
    `architecture: qwen2_moe`, pointing at the config's line (tests/test_mergekit_moe_refs.py builds it)."""
    data = _config(models, architecture="qwen", shared_experts=[{"source_model": str(models["math"]),
                                                                  "positive_prompts": ["shared"]}])
    recipe, extras = moe_recipe(_write(tmp_path / "moe.yml", data))
    assert extras.architecture == "Qwen MoE" and recipe.parameters["architecture"] == "qwen2_moe"
    assert recipe.parameters["shared_expert"] == str(models["math"])
    assert f"line {_line((tmp_path / 'moe.yml').read_text(), 'architecture')}" in recipe.where(
        "parameters", "architecture")


def test_recipe_and_detection(models, tmp_path):
    data = _config(models)
    recipe, extras = moe_recipe(_write(tmp_path / "moe.yml", data))
    assert recipe.parameters["router_init"] == "gates" and recipe.parameters["router_gates"] == str(tmp_path / "moe.yml")
    assert [m.label for m in recipe.models] == ["math", "code"] and extras.architecture == "Mixtral"
    assert "line 4" in recipe.where("parameters", "top_k")  # recipe errors point into the config
    assert looks_like_mergekit_moe(data) and not looks_like_mergekit_moe({"merge_method": "ties", "models": []})
    with pytest.raises(MergeLabError, match="merge-lab moe moe.yml -o OUT/"):
        refuse_as_recipe(data, "moe.yml")


def test_merge_command_builds_a_mergekit_moe_file_and_validate_plans_it(models, tmp_path):
    path = _write(tmp_path / "moe.yml", _config(models, gate_mode="random"))
    res = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "out"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 2
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "ok: h3_moe over 3 checkpoint(s)" in res.output, res.output


def test_existing_output_needs_force(models, tmp_path):
    path = _write(tmp_path / "moe.yml", _config(models, gate_mode="random"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    res = _run(str(path), "-o", str(tmp_path / "out"))
    assert res.exit_code == 2 and "already exists" in res.output
    assert _run(str(path), "-o", str(tmp_path / "out"), "--force").exit_code == 0
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / "out" / "keep").exists()


def test_h3_recipe_with_gate_init(models, tmp_path):
    """router_init: gates in a plain h3_moe recipe: the rows come from the named mergekit-moe config."""
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.testing import write_recipe

    config = _write(tmp_path / "moe.yml", _config(models, gate_mode="cheap_embed"))
    h3 = {"merge_method": "h3_moe", "base_model": str(models["base"]),
          "models": [{"model": str(models["math"]), "label": "math"}, {"model": str(models["code"]), "label": "code"}],
          "parameters": {"router_init": "gates"}}
    with pytest.raises(MergeLabError, match=r"line \d+ \(parameters.router_init\).*router_gates"):
        make_plan(load_recipe(write_recipe(tmp_path / "a.yaml", h3)))
    three = _write(tmp_path / "three.yml", _config(models, experts=_config(models)["experts"] * 2 + [
        {"source_model": str(models["math"]), "positive_prompts": ["other"]}]))
    h3["parameters"]["router_gates"] = str(three)
    with pytest.raises(MergeLabError, match="lists 5 experts but the recipe has 2"):
        make_plan(load_recipe(write_recipe(tmp_path / "b.yaml", h3)))
    h3["parameters"]["router_gates"] = str(config)
    plan = make_plan(load_recipe(write_recipe(tmp_path / "c.yaml", h3)))
    assert [type(s).__name__ for s in plan.steps] == ["GateInit"]
    values = plan.prepared()
    from merge_lab.moe.mergekit_config import config_gate_rows, load_mergekit_moe

    rows, _ = config_gate_rows(*load_mergekit_moe(config))
    router = next(t for t in values.tasks if t.output == "model.layers.1.block_sparse_moe.gate.weight")
    assert torch.equal(router.op.execute([]), rows[1].float())


def test_same_expert_twice_needs_mergekits_flag(models, tmp_path):
    data = _config(models, gate_mode="random")
    data["experts"][1]["source_model"] = data["experts"][0]["source_model"]
    path = _write(tmp_path / "moe.yml", data)
    res = _run(str(path), "-o", str(tmp_path / "out"))
    assert res.exit_code == 2 and "every expert is the same model" in " ".join(res.output.split())
    res = _run(str(path), "-o", str(tmp_path / "out"), "--i-understand-this-is-not-useful-without-training")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_local_experts"] == 2
