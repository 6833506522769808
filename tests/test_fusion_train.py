"""Fusion training: what trains, what stays frozen, the gating and drift terms, resume, export."""

from __future__ import annotations

import pytest
import torch

from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.moe.export import export_moe
from merge_lab.moe.pipeline import fuse
from merge_lab.moe.train import train
from merge_lab.moe.train_config import TrainConfig
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe
from merge_lab.testing.moe import ffn_expert, labelled_jsonl

LABELS = ["helpful", "harmless", "honest"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(workdir, recipe dict, assembled MoE folder, data file) on a tiny llama with 3 FFN experts."""
    root = tmp_path_factory.mktemp("fusion")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    models = [{"model": str(ffn_expert(base, root / lab, seed=i + 1, noise=0.1)), "label": lab}
              for i, lab in enumerate(LABELS)]
    data = labelled_jsonl(root / "data.jsonl", LABELS, per_label=16)
    recipe = {"merge_method": "h3_moe", "base_model": str(base), "models": models}
    out = merge(write_recipe(root / "assemble.yaml", recipe), root / "moe", progress=False, hash_inputs=False).path
    return root, recipe, out, data


def _run(moe, tmp_path, **kw):
    _, _, folder, data = moe
    cfg = TrainConfig(data=str(data), **{"steps": 2, "batch_size": 8, "lr": 1e-2, **kw})
    return train(folder, cfg, tmp_path / "state", progress=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("trainable", ["router", "router+lora", "router+experts"])
def test_routers_train_and_frozen_parts_do_not_change(moe, tmp_path, trainable, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen: list[dict[int, float]] = []  # per optimizer step: |grad| summed, by parameter identity
    step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        seen.append({id(p): float(p.grad.abs().sum()) for g in self.param_groups for p in g["params"]
                     if p.grad is not None})
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    before = _state(AutoModelForCausalLM.from_pretrained(str(moe[2]), dtype=torch.float32))
    result = _run(moe, tmp_path, trainable=trainable, **{"lambda": 0.1})
    gates = [p for n, p in result.model.named_parameters() if n.endswith(".mlp.gate.weight")]
    assert gates and len(seen) == 2
    assert all(grads.get(id(p), 0.0) > 0 for grads in seen for p in gates), f"a router got no gradient ({trainable})"
    after = _state(result.model)
    assert set(after) == set(before)
    for name, t in before.items():
        changed = not torch.equal(after[name], t)
        if ".mlp.gate.weight" in name:
            assert changed, f"router {name} got no gradient in mode {trainable}"
        elif ".mlp.experts." in name:
            assert changed == (trainable != "router"), f"{name} in mode {trainable}"
        else:
            assert not changed, f"frozen {name} changed in mode {trainable}"


def test_attention_trains_only_when_asked(moe, tmp_path):
    after = _state(_run(moe, tmp_path, train_attention=True).model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(after[q], load_tensors(moe[2])[q])


def test_gating_loss_makes_routing_learn_the_labels(moe, tmp_path):
    with_gate = _run(moe, tmp_path / "a", steps=25, lr=0.05, **{"lambda": 1.0})
    without = _run(moe, tmp_path / "b", steps=25, lr=0.05, **{"lambda": 0.0})
    assert with_gate.accuracy_before < 0.6  # near chance (1/3) at random init
    assert with_gate.accuracy_after > 0.9
    assert without.accuracy_after < 0.6


def test_routing_accuracy_is_measured_after_a_long_shared_system_prompt(moe, tmp_path):
    """Every example starts with the same 135-token system block: causal, so its hidden states and
    routing are the same in every example. Averaged over all tokens, that block hides what the
    router learned (the real SmolLM2 run read 0.58 -> 0.48 where content tokens gave 0.79 -> 0.98);
    the reported accuracy skips it. Both gating_tokens modes learn the labels."""
    import shutil

    from transformers import AutoTokenizer

    from merge_lab.moe.data import encode, load_rows
    from merge_lab.moe.routing import routing_accuracy

    folder = shutil.copytree(moe[2], tmp_path / "moe")
    tok = AutoTokenizer.from_pretrained(str(folder))
    system = ("You are a helpful assistant. " * 5)[:120]
    tok.chat_template = "<|im_start|>system\n" + system + "<|im_end|>\n" + tok.chat_template
    tok.save_pretrained(str(folder))
    encoded = [encode(tok, ex, LABELS, 256) for ex in load_rows(str(moe[3]), LABELS)]
    for mode in ("all", "content"):
        cfg = TrainConfig(data=str(moe[3]), steps=25, batch_size=8, lr=0.05, gating_tokens=mode, **{"lambda": 1.0})
        result = train(folder, cfg, tmp_path / mode, progress=False)
        assert result.accuracy_before < 0.6 and result.accuracy_after > 0.9, (mode, result.accuracy_after)
        whole = routing_accuracy(result.model, encoded, tok.pad_token_id, "cpu")  # the prefix averaged in
        assert whole < 0.8, (mode, whole)


def _expert_drift(model, folder) -> float:
    from merge_lab.moe.export import hub_tensors

    init = load_tensors(folder)
    now = dict(hub_tensors(model.state_dict(), list(init), model.config.to_dict()))
    return sum(((now[n] - init[n]) ** 2).sum().item() for n in init if ".experts." in n)


def test_drift_regulariser_holds_experts_back(moe, tmp_path):
    free = _run(moe, tmp_path / "a", trainable="router+experts", steps=6, gamma=0.0)
    held = _run(moe, tmp_path / "b", trainable="router+experts", steps=6, gamma={"helpful": 50.0, "harmless": 50.0,
                                                                                  "honest": 50.0})
    d_free, d_held = _expert_drift(free.model, moe[2]), _expert_drift(held.model, moe[2])
    assert d_free > 0 and d_held < 0.5 * d_free, (d_free, d_held)


def test_export_round_trip_gives_the_same_logits(moe, tmp_path):
    from transformers import AutoModelForCausalLM

    result = _run(moe, tmp_path, trainable="router+lora", steps=3)
    out = export_moe(result.model, moe[2], tmp_path / "out")
    assert set(load_tensors(out)) == set(load_tensors(moe[2]))  # hub layout, not the fused one
    ids = torch.tensor([[1, 5, 9, 17, 33, 40, 2, 7]])
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits, rtol=1e-5, atol=1e-5)


def test_interrupt_and_resume_equals_an_uninterrupted_run(moe, tmp_path):
    root, recipe, _, data = moe
    train_block = {"data": str(data), "steps": 6, "batch_size": 4, "lr": 1e-2, "trainable": "router+lora",
                   "lambda": 0.5, "gamma": 0.1, "load_balance": 0.01, "seed": 3}
    path = write_recipe(tmp_path / "fuse.yaml", {**recipe, "train": train_block})
    whole = fuse(path, tmp_path / "whole", progress=False)
    stopped = fuse(path, tmp_path / "resumed", progress=False, stop_after=3)
    assert stopped.path is None and not (tmp_path / "resumed").exists()
    resumed = fuse(path, tmp_path / "resumed", progress=False, resume=True)
    assert resumed.steps_done == 6 and not list(tmp_path.glob(".*fuse-work"))
    a, b = load_tensors(whole.path), load_tensors(resumed.path)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert "Fusion training" in (whole.path / "README.md").read_text()


def test_bad_train_block_and_data_are_refused(moe, tmp_path):
    root, recipe, _, data = moe
    bad = write_recipe(tmp_path / "bad.yaml", {**recipe, "train": {"data": str(data), "stepz": 3}})
    with pytest.raises(MergeLabError, match=r"line \d+ \(train.stepz\)"):
        fuse(bad, tmp_path / "o1", progress=False)
    gamma = write_recipe(tmp_path / "g.yaml", {**recipe, "train": {"data": str(data), "gamma": {"nosuch": 1.0}}})
    with pytest.raises(MergeLabError, match="not expert labels"):
        fuse(gamma, tmp_path / "o2", progress=False)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b", "label": "helpful"}\n{"prompt": "a", "response": "b", "label": "evil"}\n')
    wrong = write_recipe(tmp_path / "w.yaml", {**recipe, "train": {"data": str(rows), "steps": 1}})
    with pytest.raises(MergeLabError, match="rows.jsonl, line 2: label 'evil'"):
        fuse(wrong, tmp_path / "o3", progress=False)
    evaluated = write_recipe(tmp_path / "s.yaml", {**recipe, "train": {"data": [
        {"expert": "honest", "suite": "honest_truthfulqa", "split": "test"}]}})
    with pytest.raises(MergeLabError, match=r"s.yaml, line \d+ \(train.data.0.split\): .*'train' split only"):
        fuse(evaluated, tmp_path / "o4", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3, 4))
    assert not list(tmp_path.glob(".o*"))  # no work folder either


def test_data_blocks_from_shipped_sources_carry_their_expert_label():
    from merge_lab.moe.data import load_rows

    rows = load_rows([{"expert": "helpful", "source": "refusal_pairs", "split": "train", "label": "answer",
                           "limit": 3}], LABELS)
    assert len(rows) == 3 and {r.label for r in rows} == {"helpful"} and all(r.prompt and r.response for r in rows)
    with pytest.raises(MergeLabError, match=r"train.data.0.expert: expert 'evil' is not one"):
        load_rows([{"expert": "evil", "source": "refusal_pairs"}], LABELS)


def test_fuse_validates_the_train_block_and_reads_its_rows_once(moe, tmp_path, monkeypatch):
    """Strategy check, pipeline, centroid router init and training all use the same validated
    block and the same rows: the JSONL is read once, the block validated once."""
    from merge_lab.datasets import sources
    from merge_lab.merge.recipe import Recipe
    from merge_lab.moe.train_config import TrainConfig

    root, recipe, _, data = moe
    reads, validations = [], []
    read, validate_block = sources.load_jsonl, Recipe.validate_block

    def counting_read(path, *a, **k):
        reads.append(str(path))
        return read(path, *a, **k)

    def counting_validate(self, model, *a, **k):
        if model is TrainConfig:
            validations.append(model)
        return validate_block(self, model, *a, **k)

    monkeypatch.setattr(sources, "load_jsonl", counting_read)
    monkeypatch.setattr(Recipe, "validate_block", counting_validate)
    path = write_recipe(tmp_path / "fuse.yaml", {**recipe, "parameters": {"router_init": "centroid"},
                                                 "train": {"data": str(data), "steps": 1, "batch_size": 4}})
    result = fuse(path, tmp_path / "out", progress=False)
    assert result.path is not None and result.steps_done == 1
    assert reads == [str(data)] and len(validations) == 1


def test_lora_drift_is_each_experts_squared_lora_update(moe):
    """lora_drift reads A and B (whole, so FSDP2 can gather them in autograd): each expert's value is
    ||peft's own delta weight||^2 of that expert, summed over the layers' expert LoRA."""
    from peft.tuners.lora.layer import ParamWrapper

    from merge_lab.moe.train import fresh_trainable, lora_drift

    model = fresh_trainable(moe[2], TrainConfig(data=[], trainable="router+lora"))
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    torch.manual_seed(0)
    for m in wrappers:  # B starts at zero: give the updates a size
        torch.nn.init.normal_(m.lora_B["default"].weight)
    got = lora_drift(list(model.modules()), len(LABELS))
    deltas = [m.get_delta_weight("default") for m in wrappers]
    want = torch.stack([sum((d[i].float() ** 2).sum() for d in deltas) for i in range(len(LABELS))])
    assert wrappers and bool((want > 0).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
