"""mergekit-moe configs and gates: parity with mergekit-moe's own code on tiny models, config errors,
translation into an h3_moe recipe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.assemble import H3Params
from merge_lab.moe.gates import ExpertPrompts, degenerate_layers, gate_rows, mergekit_tokenizer
from merge_lab.moe.mergekit_config import (
    MergekitMoeConfig,
    MoeExpert,
    config_gate_rows,
    gate_prompts,
    load_mergekit_moe,
    mergekit_extras,
    parse_mergekit_moe,
    to_h3_recipe,
    translate,
)
from merge_lab.testing.moe import ffn_expert, tiny_base

PROMPTS = [
    ExpertPrompts(["abc def", "a longer prompt about abc"], ["poem"]),
    ExpertPrompts(["0123 45", "67"], []),
    ExpertPrompts(["HIJ KLM NOP", "quiet"], ["abc", "st"]),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mkmoe")
    base = tiny_base(root / "base", "llama", seed=0)
    return {"base": base, "math": ffn_expert(base, root / "math", seed=1),
            "code": ffn_expert(base, root / "code", seed=2)}


def _mergekit_gates(base: Path, prompts: list[ExpertPrompts], mode: str) -> torch.Tensor:
    """mergekit-moe's own gate computation, set up as its `build()` does."""
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params

    ref = ModelReference.parse(str(base))
    experts = [Expert(source_model=ref, positive_prompts=p.positive, negative_prompts=p.negative or None)
               for p in prompts]
    return get_gate_params(ref, mergekit_tokenizer(base), experts, mode=mode, device="cpu")


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed"])
def test_prompt_gates_match_mergekit(models, mode):
    ours = gate_rows(models["base"], PROMPTS, mode, device="cpu")
    theirs = _mergekit_gates(models["base"], PROMPTS, mode)
    assert ours.shape == theirs.shape == (2, 3, 32)  # [layers, experts, hidden]
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-6, rtol=0)
    norms = ours.float().norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-2, rtol=0)
    assert not torch.allclose(ours[:, 0].float(), ours[:, 1].float(), atol=1e-3)  # distinct experts
    if mode == "cheap_embed":  # the same row in every layer
        assert torch.equal(ours[0], ours[1])
    else:  # layer 0 reads the embeddings, layer 1 the first layer's output
        assert not torch.allclose(ours[0].float(), ours[1].float(), atol=1e-3)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_match_mergekit_draws(models, mode):
    ours = gate_rows(models["base"], PROMPTS, mode, seed=7)
    torch.manual_seed(7)  # mergekit draws from torch's global RNG
    theirs = _mergekit_gates(models["base"], PROMPTS, mode)
    assert ours.shape == theirs.shape == (2, 3, 32)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, gate_rows(models["base"], PROMPTS, mode, seed=7))
    assert not torch.equal(ours, gate_rows(models["base"], PROMPTS, mode, seed=8))


def test_random_gate_scales(models):
    many = [ExpertPrompts()] * 64  # prompts are not read in the random modes
    normal = gate_rows(models["base"], many, "random", seed=0)
    assert abs(float(normal.std()) - 1.0) < 0.05 and abs(float(normal.mean())) < 0.05
    uniform = gate_rows(models["base"], many, "uniform_random", seed=0)
    bound = 1 / math.sqrt(32)
    assert float(uniform.abs().max()) <= bound
    assert abs(float(uniform.std()) - bound / math.sqrt(3)) < 0.01  # U(-b, b) has std b / sqrt(3)


def test_gate_rows_errors(models, tmp_path):
    with pytest.raises(MergeLabError, match="expert 1 has no positive prompts"):
        gate_rows(models["base"], [ExpertPrompts(["a"]), ExpertPrompts()], "cheap_embed")
    with pytest.raises(MergeLabError, match="unknown gate_mode 'hiden'"):
        gate_rows(models["base"], PROMPTS, "hiden")
    with pytest.raises(MergeLabError, match="no config.json"):
        gate_rows(tmp_path, PROMPTS, "random")


def test_degenerate_layers_flags_alike_rows():
    rows = torch.zeros(2, 2, 4)
    rows[:, 0, 0] = 1
    rows[0, 1, 1] = 1
    rows[1, 1, 0] = 1  # layer 1: both rows identical
    assert degenerate_layers(rows) == [1]


# ---- config ----

SAMPLE = """\
base_model: {base}
gate_mode: hidden
dtype: bfloat16
experts_per_token: 2
experts:
  - source_model: {math}
    positive_prompts: ["solve", "equation"]
    negative_prompts: ["poem"]
    noise_scale: 0.01
  - source_model: {code}
    positive_prompts: ["def f():", "class"]
    residual_scale: 0.5
"""


def _sample(models, **changes) -> str:
    data = yaml.safe_load(SAMPLE.format(**{k: str(v) for k, v in models.items()}))
    data.update(changes)
    return yaml.safe_dump(data, sort_keys=False)


def test_schema_matches_mergekit():
    from mergekit.moe.config import Expert, MoEMergeConfig

    for ours, theirs in ((MergekitMoeConfig, MoEMergeConfig), (MoeExpert, Expert)):
        assert set(ours.model_fields) == set(theirs.model_fields)
        for name, f in theirs.model_fields.items():
            if not f.is_required():
                assert ours.model_fields[name].default == f.default, name


def test_sample_config_loads_like_mergekit(models, tmp_path):
    from mergekit.moe.config import MoEMergeConfig, is_bad_config

    path = tmp_path / "moe.yml"
    path.write_text(_sample(models))
    config, _ = load_mergekit_moe(path)
    theirs = MoEMergeConfig.model_validate(yaml.safe_load(path.read_text()))
    assert not is_bad_config(theirs)
    assert config.gate_mode == theirs.gate_mode and config.experts_per_token == theirs.experts_per_token
    assert [e.positive_prompts for e in config.experts] == [e.positive_prompts for e in theirs.experts]


def test_misspelt_key_names_line_and_suggestion(models):
    text = _sample(models).replace("negative_prompts", "negative_promts")
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "negative_promts" in s)
    with pytest.raises(MergeLabError, match=rf"moe.yml, line {line} \(experts.0.negative_promts\).*"
                                            r"Did you mean 'negative_prompts'"):
        parse_mergekit_moe(text, "moe.yml")
    with pytest.raises(MergeLabError, match=r"line 2 \(gate_mode\).*'cheap_embed'"):
        parse_mergekit_moe(_sample(models).replace("gate_mode: hidden", "gate_mode: hiden"), "moe.yml")


def test_prompt_modes_need_prompts(models):
    data = yaml.safe_load(_sample(models))
    del data["experts"][1]["positive_prompts"]
    text = yaml.safe_dump(data, sort_keys=False)
    for mode in ("hidden", "cheap_embed"):
        with pytest.raises(MergeLabError, match=r"line \d+ \(experts.1\).*no positive_prompts"):
            parse_mergekit_moe(text.replace("gate_mode: hidden", f"gate_mode: {mode}"), "moe.yml")
    for mode in ("random", "uniform_random"):
        parse_mergekit_moe(text.replace("gate_mode: hidden", f"gate_mode: {mode}"), "moe.yml")


def test_config_errors(models):
    with pytest.raises(MergeLabError, match=r"\(experts_per_token\): experts_per_token = 3 but there are only 2"):
        parse_mergekit_moe(_sample(models, experts_per_token=3), "moe.yml")
    with pytest.raises(MergeLabError, match=r"\(experts\): no experts"):
        parse_mergekit_moe(_sample(models, experts=[]), "moe.yml")
    with pytest.raises(MergeLabError, match="unknown architecture 'llama'"):
        parse_mergekit_moe(_sample(models, architecture="llama"), "moe.yml")
    with pytest.raises(MergeLabError, match=r"\(shared_experts\).*Mixtral: has no shared experts"):
        parse_mergekit_moe(_sample(models, architecture="mixtral",
                                   shared_experts=[{"source_model": "x", "positive_prompts": ["a"]}]), "moe.yml")
    same = yaml.safe_load(_sample(models))
    same["experts"][1]["positive_prompts"] = same["experts"][0]["positive_prompts"]
    same["experts"][1]["negative_prompts"] = same["experts"][0]["negative_prompts"]
    with pytest.raises(MergeLabError, match="same positive and negative prompts"):
        parse_mergekit_moe(yaml.safe_dump(same), "moe.yml")
    clones = yaml.safe_load(_sample(models))
    clones["experts"][1]["source_model"] = clones["experts"][0]["source_model"]
    with pytest.raises(MergeLabError, match="every expert is the same model"):
        parse_mergekit_moe(yaml.safe_dump(clones), "moe.yml")
    parse_mergekit_moe(yaml.safe_dump(clones), "moe.yml", allow_all_same=True)
    with pytest.raises(MergeLabError, match="dtype must be one of"):
        parse_mergekit_moe(_sample(models, dtype="fp8"), "moe.yml")


def test_to_h3_recipe_is_a_valid_recipe(models):
    config, where = parse_mergekit_moe(_sample(models), "moe.yml")
    recipe = to_h3_recipe(config, where)
    parsed = Recipe.model_validate(recipe)
    params = H3Params.model_validate(parsed.parameters)
    assert parsed.merge_method == "h3_moe" and parsed.base_model == str(models["base"])
    assert [(m.model, m.label) for m in parsed.models] == [(str(models["math"]), "math"), (str(models["code"]), "code")]
    assert params.top_k == 2 and params.non_ffn == "base" and parsed.dtype == "bfloat16"


def test_extras_carry_what_the_recipe_lacks(models):
    config, where = parse_mergekit_moe(_sample(models), "moe.yml")
    recipe, extras = translate(config, where)
    assert extras.architecture == "Mixtral" and extras.gate_mode == "hidden" and extras.routed_experts == 2
    assert extras.gate_prompts[0] == ExpertPrompts(["solve", "equation"], ["poem"])
    assert [(e.noise_scale, e.residual_scale) for e in extras.experts] == [(0.01, None), (None, 0.5)]
    assert not any("noise_scale" in u for u in extras.unsupported)  # h3_moe's per-expert parameter now
    assert len(recipe["models"]) == 2


def test_lora_and_revision_references(models, tmp_path):
    config, where = parse_mergekit_moe(_sample(models), "moe.yml")
    config.experts[0].source_model = f"{models['math']}+{tmp_path / 'adapter'}"  # applied while streaming
    recipe = to_h3_recipe(config, where)
    assert recipe["models"][0] == {"model": f"{models['math']}+{tmp_path / 'adapter'}", "label": "math+adapter"}
    config.experts[0].source_model = "org/model@v2"
    with pytest.raises(MergeLabError, match="hub revision"):
        to_h3_recipe(config, where)


def test_qwen_shared_expert_is_reported(models):
    config, where = parse_mergekit_moe(
        _sample(models, architecture="qwen",
                shared_experts=[{"source_model": str(models["math"]), "positive_prompts": ["shared"]}]), "moe.yml")
    extras = mergekit_extras(config, where)
    assert extras.architecture == "Qwen MoE"
    assert len(extras.gate_prompts) == 3 and extras.routed_experts == 2  # the shared gate is the last row
    assert not any("shared expert" in u for u in extras.unsupported)  # Qwen MoE's: h3_moe's shared_expert
    assert to_h3_recipe(config, where)["parameters"]["shared_expert"] == str(models["math"])
    assert len(gate_prompts(config)) == 3
    routed, shared = config_gate_rows(config, where, device="cpu")
    assert routed.shape == (2, 2, 32) and shared.shape == (2, 1, 32)
    whole = gate_rows(models["base"], extras.gate_prompts, "hidden", device="cpu")
    assert torch.equal(routed, whole[:, :2]) and torch.equal(shared, whole[:, 2:])


def test_mapping_references_and_missing_file(models, tmp_path):
    data = yaml.safe_load(_sample(models))
    data["experts"][0]["source_model"] = {"model": {"path": str(models["math"])}}
    config, where = parse_mergekit_moe(yaml.safe_dump(data), "moe.yml")
    assert to_h3_recipe(config, where)["models"][0]["model"] == str(models["math"])
    with pytest.raises(MergeLabError, match="mergekit-moe config not found"):
        load_mergekit_moe(tmp_path / "nope.yml")


def test_mergekit_moe_build_writes_our_gate_rows(models, tmp_path):
    """End to end through mergekit-moe's `build()` (what its CLI runs): its written routers are ours."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    from merge_lab.core.checkpoint import Checkpoint

    text = _sample(models, dtype="float32")
    config, where = parse_mergekit_moe(text, "moe.yml")
    out = tmp_path / "mk-out"
    build(MoEMergeConfig.model_validate(yaml.safe_load(text)), str(out), MergeOptions(device="cpu"), device="cpu")
    written = Checkpoint(out)
    extras = mergekit_extras(config, where)
    ours = gate_rows(models["base"], extras.gate_prompts, config.gate_mode, device="cpu").float()
    for layer in range(ours.shape[0]):
        torch.testing.assert_close(written.get(f"model.layers.{layer}.mlp.gate.weight"), ours[layer], atol=1e-6, rtol=0)


# ---- noise_scale ----


def _build_both(models, tmp_path, config: dict, seed: int) -> tuple[Path, Path]:
    """mergekit-moe's build() after seeding the global RNG as its --random-seed does, and `merge-lab moe`
    (recipe seed 0) on the same config file."""
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    from merge_lab.moe.mergekit_run import run_moe

    path = tmp_path / "moe.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    options = MergeOptions(device="cpu", random_seed=seed)
    options.apply_global_options()  # transformers' set_seed: torch's global RNG as mergekit-moe seeds it
    build(MoEMergeConfig.model_validate(config), str(tmp_path / "mk"), options, device="cpu")
    run_moe(path, tmp_path / "ours", progress=False)
    return tmp_path / "mk", tmp_path / "ours"


def _expert_tensors(folder: Path) -> dict[tuple[int, int, str], torch.Tensor]:
    """(layer, expert, gate|up|down) -> weight, from mergekit's fused or our per-expert layout."""
    from merge_lab.core.checkpoint import Checkpoint

    role = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
    ckpt, out = Checkpoint(folder), {}
    for name in ckpt.tensors:
        parts = name.split(".")
        if name.endswith("experts.gate_up_proj"):
            t = ckpt.get(name)
            for k in range(t.shape[0]):
                out[(int(parts[2]), k, "gate")], out[(int(parts[2]), k, "up")] = t[k].chunk(2)
        elif name.endswith("experts.down_proj"):
            t = ckpt.get(name)
            for k in range(t.shape[0]):
                out[(int(parts[2]), k, "down")] = t[k]
        elif ".experts." in name:
            out[(int(parts[2]), int(parts[5]), role[parts[6]])] = ckpt.get(name)
    return out


@pytest.mark.parametrize(("mode", "dtype"), [("random", "float32"), ("cheap_embed", "bfloat16"), ("hidden", "float32")])
def test_noise_scale_matches_mergekit_seeded(models, tmp_path, mode, dtype):
    """noise_scale: the same draws as mergekit-moe with --random-seed 0, bit for bit, after the random
    gates (same RNG) and before residual_scale; an expert without noise_scale is copied unchanged."""
    data = yaml.safe_load(_sample(models, gate_mode=mode, dtype=dtype))
    data["experts"][0]["noise_scale"] = 0.01
    data["experts"][1].update(noise_scale=0.02, residual_scale=0.5)
    mk, ours = _build_both(models, tmp_path, data, seed=0)
    theirs, mine = _expert_tensors(mk), _expert_tensors(ours)
    assert set(theirs) == set(mine) and len(mine) == 2 * 2 * 3  # layers x experts x projections
    for key, t in theirs.items():
        assert t.dtype == mine[key].dtype == getattr(torch, dtype), key
        assert torch.equal(t, mine[key]), key
    from merge_lab.core.checkpoint import Checkpoint

    clean = Checkpoint(models["math"]).get("model.layers.1.mlp.up_proj.weight").to(getattr(torch, dtype))
    moved = (mine[(1, 0, "up")].float() - clean.float()).std().item()
    assert 0.005 < moved < 0.02  # noise of std 0.01 on the first expert
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(ours))  # loads as the Mixtral it claims to be


def test_noise_draws_follow_the_seed_and_the_order(models, tmp_path):
    """Another seed gives other noise; mergekit's draws move when it is seeded otherwise, so the match
    above is the stream's, not a coincidence of zero noise."""
    data = yaml.safe_load(_sample(models, gate_mode="cheap_embed", dtype="float32"))
    data["experts"][0]["noise_scale"] = 0.01
    del data["experts"][1]["residual_scale"]
    mk, ours = _build_both(models, tmp_path, data, seed=1)
    theirs, mine = _expert_tensors(mk), _expert_tensors(ours)
    assert not torch.equal(theirs[(0, 0, "gate")], mine[(0, 0, "gate")])  # mergekit seeded 1, ours 0
    assert torch.equal(theirs[(0, 1, "gate")], mine[(0, 1, "gate")])  # no noise on the second expert


# ---- shared_experts (Qwen MoE from a qwen2 base) ----


@pytest.mark.parametrize(("mode", "noise"), [("hidden", None), ("random", 0.01)])
def test_qwen_moe_shared_expert_matches_mergekit(tmp_path, mode, noise):
    """mergekit-moe's Qwen MoE: the shared model's FFN as `mlp.shared_expert.*` (its residual_scale and
    noise applied), gated by its own row `mlp.shared_expert_gate` (its prompts, computed with the routed
    experts' rows); every tensor bit for bit, and the result loads and runs as Qwen2-MoE."""
    from transformers import AutoModelForCausalLM

    from merge_lab.core.checkpoint import Checkpoint

    base = tiny_base(tmp_path / "base", "qwen2", seed=0)
    models = {"base": base, "math": ffn_expert(base, tmp_path / "math", seed=1),
              "code": ffn_expert(base, tmp_path / "code", seed=2)}
    data = yaml.safe_load(_sample(models, gate_mode=mode, dtype="float32"))
    # the base as the shared expert: mergekit-moe 0.1.5 opens only the base's and the experts' folders
    # (initialize_io), so its Qwen MoE fails on a shared model that is neither; ours takes any fine-tune
    data["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["anything", "at all"],
                               "residual_scale": 0.25}]
    if noise is not None:
        data["experts"][0]["noise_scale"] = noise
        data["shared_experts"][0]["noise_scale"] = 2 * noise
    else:
        del data["experts"][0]["noise_scale"]
    work = tmp_path / "run"
    work.mkdir()
    mk, ours = _build_both(models, work, data, seed=0)
    theirs, mine = Checkpoint(mk), Checkpoint(ours)
    assert set(mine.tensors) == set(theirs.tensors)
    assert "model.layers.1.mlp.shared_expert.down_proj.weight" in mine.tensors
    for name in theirs.tensors:
        assert torch.equal(theirs.get(name), mine.get(name)), name
    shared_down = Checkpoint(base).get("model.layers.0.mlp.down_proj.weight")
    if noise is None:
        assert torch.equal(mine.get("model.layers.0.mlp.shared_expert.down_proj.weight"), shared_down * 0.25)
    gate = mine.get("model.layers.0.mlp.shared_expert_gate.weight")
    assert gate.shape == (1, 32) and gate.abs().sum() > 0
    model = AutoModelForCausalLM.from_pretrained(str(ours), dtype=torch.float32).eval()
    assert model.config.model_type == "qwen2_moe"
    assert model.config.shared_expert_intermediate_size == model.config.moe_intermediate_size
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9]])).logits).all()


def test_shared_expert_needs_a_qwen2_base(models, tmp_path):
    """h3_moe's shared_expert is Qwen2-MoE's; a llama base (Mixtral output) is told so at its key."""
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import parse_recipe

    recipe = {"merge_method": "h3_moe", "base_model": str(models["base"]),
              "models": [{"model": str(models["math"]), "label": "math"}, {"model": str(models["code"]), "label": "code"}],
              "parameters": {"shared_expert": str(models["math"])}}
    text = yaml.safe_dump(recipe, sort_keys=False)
    with pytest.raises(MergeLabError, match=r"shared_expert.*needs a Qwen2-MoE output.*mixtral"):
        make_plan(parse_recipe(text, source="r.yaml"))


def test_qwen3_moe_noise_follows_mergekits_draw_order(tmp_path):
    """Qwen3 MoE draws each expert's noise gate, up, down (Mixtral: gate, down, up): bit for bit."""
    base = tiny_base(tmp_path / "base", "qwen3", seed=0)
    models = {"base": base, "math": ffn_expert(base, tmp_path / "math", seed=1),
              "code": ffn_expert(base, tmp_path / "code", seed=2)}
    data = yaml.safe_load(_sample(models, gate_mode="random", dtype="float32"))
    data["experts"][1]["noise_scale"] = 0.03
    work = tmp_path / "run"
    work.mkdir()
    mk, ours = _build_both(models, work, data, seed=0)
    theirs, mine = _expert_tensors(mk), _expert_tensors(ours)
    assert set(theirs) == set(mine) and len(mine) == 12
    for key, t in theirs.items():
        assert torch.equal(t, mine[key]), key
