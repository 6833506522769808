"""h3_moe assembly: the MoE reproduces its experts, loads in transformers, refuses bad input."""

from __future__ import annotations

import json

import pytest
import torch

from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.moe.routing import forced_routing
from merge_lab.testing import load_tensors, logits, make_checkpoint, write_recipe
from merge_lab.testing.moe import ffn_expert, labelled_jsonl, lora_expert, tiny_base

IDS = torch.tensor([[1, 5, 9, 17, 33, 40, 2, 7, 60]])


def _recipe(tmp, base, experts, name="r", **extra):
    models = [{"model": str(e), "label": lab} for lab, e in experts]
    return write_recipe(tmp / f"{name}.yaml", {"merge_method": "h3_moe", "base_model": str(base), "models": models, **extra})


def _moe(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,family", [("llama", "mixtral"), ("mistral", "mixtral"), ("qwen2", "qwen2_moe"),
                                         ("qwen3", "qwen3_moe")])
def test_forced_router_reproduces_each_expert(tmp_path, arch, family):
    base = tiny_base(tmp_path / "base", arch)
    experts = [(f"e{i}", ffn_expert(base, tmp_path / f"e{i}", seed=i)) for i in range(3)]
    out = merge(_recipe(tmp_path, base, experts), tmp_path / "moe", progress=False, hash_inputs=False).path
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family and cfg["merge_lab_expert_labels"] == ["e0", "e1", "e2"]
    moe = _moe(out)
    for i, (_, path) in enumerate(experts):
        with forced_routing(moe, i), torch.no_grad():
            got = moe(IDS).logits
        torch.testing.assert_close(got, logits(path, IDS[0].tolist()), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # experts differ, so the forced routing mattered
        assert not torch.allclose(logits(experts[0][1], IDS[0].tolist()), logits(experts[1][1], IDS[0].tolist()))


def test_identical_experts_reproduce_base_and_settings_survive(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, tie=True)
    cfg_path = base / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_theta": 5000.0, "rope_type": "linear", "factor": 2.0}
    cfg["rms_norm_eps"] = 1e-5
    cfg_path.write_text(json.dumps(cfg))
    out = merge(_recipe(tmp_path, base, [("a", base), ("b", base), ("c", base)], parameters={"top_k": 2}),
                tmp_path / "moe", progress=False, hash_inputs=False).path
    moe_cfg = json.loads((out / "config.json").read_text())
    assert moe_cfg["tie_word_embeddings"] is True and "lm_head.weight" not in load_tensors(out)
    assert moe_cfg["rope_parameters"] == cfg["rope_parameters"] and moe_cfg["rms_norm_eps"] == 1e-5
    assert moe_cfg["num_experts_per_tok"] == 2 and moe_cfg["num_local_experts"] == 3
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert "im_start" in (tok_cfg.get("chat_template") or (out / "chat_template.jinja").read_text())
    torch.testing.assert_close(logits(out, IDS[0].tolist()), logits(base, IDS[0].tolist()), rtol=1e-5, atol=1e-5)


def test_lora_expert_equals_its_merged_checkpoint(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    a = lora_expert(base, tmp_path / "a_lora", seed=1, r=4, alpha=16, merged=tmp_path / "a_full")
    b = lora_expert(base, tmp_path / "b_lora", seed=2, r=4, alpha=8, rslora=True, merged=tmp_path / "b_full")
    lo = merge(_recipe(tmp_path, base, [("a", a), ("b", b)], "lo"), tmp_path / "lo", progress=False, hash_inputs=False)
    full = merge(_recipe(tmp_path, base, [("a", tmp_path / "a_full"), ("b", tmp_path / "b_full")], "full"),
                 tmp_path / "full", progress=False, hash_inputs=False)
    t_lo, t_full = load_tensors(lo.path), load_tensors(full.path)
    assert set(t_lo) == set(t_full)
    for n in t_full:
        torch.testing.assert_close(t_lo[n], t_full[n], rtol=1e-5, atol=1e-6, msg=n)
    # without the alpha/r scale (what the paper's code does) the experts would differ
    e0 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    base_t = load_tensors(base)["model.layers.0.mlp.gate_proj.weight"]
    assert (t_lo[e0] - base_t).abs().max() > 1e-4


def test_non_ffn_changes_are_reported_and_averaged_on_request(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    a = ffn_expert(base, tmp_path / "a", seed=1, also="self_attn.q_proj")
    b = ffn_expert(base, tmp_path / "b", seed=2)
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe

    res = merge(_recipe(tmp_path, base, [("a", a), ("b", b)]), tmp_path / "m1", progress=False, hash_inputs=False)
    card = (res.path / "README.md").read_text()
    assert "'a' changed 2 tensor(s)" in card and "'b'" not in card.split("outside the FFN")[1].split("\n")[0]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_tensors(res.path)[q], load_tensors(base)[q])
    avg = _recipe(tmp_path, base, [("a", a), ("b", b)], "avg", parameters={"non_ffn": "average"})
    assert make_plan(load_recipe(avg)).notes  # validate shows the policy
    res2 = merge(avg, tmp_path / "m2", progress=False, hash_inputs=False)
    want = (load_tensors(a)[q] + load_tensors(b)[q]) / 2
    torch.testing.assert_close(load_tensors(res2.path)[q], want)


def test_centroid_router_init_separates_labels(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    experts = [(f"l{i}", ffn_expert(base, tmp_path / f"e{i}", seed=i)) for i in range(3)]
    data = labelled_jsonl(tmp_path / "d.jsonl", ["l0", "l1", "l2"], per_label=8)
    rec = _recipe(tmp_path, base, experts, parameters={"router_init": "centroid", "router_data": str(data)})
    out = merge(rec, tmp_path / "moe", progress=False, hash_inputs=False).path
    rows = load_tensors(out)["model.layers.0.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(rows.norm(dim=-1), torch.ones(3))
    from transformers import AutoTokenizer

    from merge_lab.moe.data import encode, load_rows
    from merge_lab.moe.routing import routing_accuracy

    labels = ["l0", "l1", "l2"]
    tok = AutoTokenizer.from_pretrained(str(out))
    enc = [encode(tok, ex, labels, 64) for ex in load_rows(data, labels)]
    assert routing_accuracy(_moe(out), enc, 0, "cpu") > 0.9  # before any training


def test_centroid_rows_are_a_step_between_planning_and_the_engine(tmp_path, monkeypatch):
    """Planning (validate, plan) runs no model; run_plan computes the rows once, before it opens
    the output, and the engine writes them as constants."""
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.moe import router_init

    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    experts = [(f"l{i}", ffn_expert(base, tmp_path / f"e{i}", seed=i)) for i in range(2)]
    data = labelled_jsonl(tmp_path / "d.jsonl", ["l0", "l1"], per_label=2)
    rec = _recipe(tmp_path, base, experts, parameters={"router_init": "centroid", "router_data": str(data)})
    calls = []

    def spy(*args, **kwargs):
        calls.append(list(tmp_path.glob(".moe*")))  # what exists of the output when it runs
        return torch.full((2, 2, 32), 0.5)  # [layers, experts, hidden]

    monkeypatch.setattr(router_init, "centroid_rows", spy)
    plan = make_plan(load_recipe(rec))
    assert calls == [] and len(plan.steps) == 1
    out = merge(rec, tmp_path / "moe", progress=False, hash_inputs=False).path
    assert calls == [[]]  # once, with nothing of the output on disk yet
    rows = load_tensors(out)
    for layer in (0, 1):
        assert torch.equal(rows[f"model.layers.{layer}.block_sparse_moe.gate.weight"], torch.full((2, 32), 0.5))


def test_centroid_rows_are_computed_once_per_process_for_the_same_base_and_prompts(tmp_path, monkeypatch):
    """The demo assembles one MoE three times (the fusion, its two ablations) in one process: the
    base's pass over the same prompts runs once. Other prompts, or a base file rewritten, run it again;
    callers get copies, so one cannot change another's rows."""
    import os

    from transformers import AutoModelForCausalLM

    from merge_lab.moe.data import load_rows
    from merge_lab.moe.router_init import centroid_rows

    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    labels = ["l0", "l1"]
    rows = load_rows(str(labelled_jsonl(tmp_path / "d.jsonl", labels, per_label=3)), labels)
    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(1) or load(*a, **k))
    first = centroid_rows(base, rows, labels)
    again = centroid_rows(base, rows, labels)
    assert torch.equal(first, again) and len(loads) == 1
    first.zero_()
    assert torch.equal(centroid_rows(base, rows, labels), again) and len(loads) == 1  # a copy was changed, not the memo
    fewer = centroid_rows(base, rows[:-1], labels)
    assert len(loads) == 2 and not torch.equal(fewer, again)
    config = base / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))  # rewritten, as far as stat knows
    assert torch.equal(centroid_rows(base, rows, labels), again) and len(loads) == 3


def _fails(tmp_path, recipe, match):
    out = tmp_path / "never"
    with pytest.raises(MergeLabError, match=match):
        merge(recipe, out, progress=False, hash_inputs=False)
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    good = ffn_expert(base, tmp_path / "good", seed=1)
    qwen = make_checkpoint(tmp_path / "qwen", "qwen2", seed=1)
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("b", qwen)], "arch"), "'qwen2' model but the base is 'llama'")
    wide = make_checkpoint(tmp_path / "wide", "llama", seed=1, vocab_size=100)
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("b", wide)], "shape"), r"shape \(100, 32\)")
    other = tmp_path / "other_base"
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(other))
    foreign = lora_expert(other, tmp_path / "foreign", seed=3)
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("b", foreign)], "lora"), "does not fit the base")
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good)], "few"), "at least 2 model")
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("a", good)], "dup"), "label 'a' is used by models 0 and 1")
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("b", good)], "topk", parameters={"top_k": 3}), "top_k = 3")
    gpt = tmp_path / "gpt_base"
    gpt.mkdir()
    for f in base.iterdir():
        (gpt / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt_neox"}))
    _fails(tmp_path, _recipe(tmp_path, gpt, [("a", gpt), ("b", gpt)], "gpt"), "Supported: llama -> mixtral")
    data = labelled_jsonl(tmp_path / "d.jsonl", ["a", "zzz"], per_label=2)
    _fails(tmp_path, _recipe(tmp_path, base, [("a", good), ("b", good)], "label",
                             parameters={"router_init": "centroid", "router_data": str(data)}), "label 'zzz' is not one")
