"""The same-training baselines (issue 13, part 3): `multitask` and `merge_then_train` candidates, trained by
the comparison itself on a tiny model, with the budget worked out from the recipes and their rows checked
disjoint from the suites."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors import safe_open

from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.compare import run_compare
from merge_lab.testing import make_checkpoint

SUITES = ["harmless_refusal", "helpful_likelihood"]
SETTINGS = {"limit": 2, "max_new_tokens": 3, "max_length": 96, "bootstrap": 50}


pytestmark = pytest.mark.usefixtures("one_thread")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 3-layer base, two align recipes (LoRA on the last layer), a fuse recipe (routers + expert LoRA)."""
    root = tmp_path_factory.mktemp("baselines")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False, layers=3)
    for i in (1, 2):
        make_checkpoint(root / f"merge{i}", "llama", seed=0, shards=False, layers=3, base=base, noise=0.01 * i)
    shared = {"prompt": "Say hi", "response": "hi"}  # in both experts' rows and the fusion's: counted once
    write_jsonl(root / "helpful.jsonl", [shared, {"prompt": "Count to 3", "response": "1 2 3"},
                                         {"prompt": "Spell cat", "response": "c a t"}])
    write_jsonl(root / "honest.jsonl", [shared, {"prompt": "Is ice cold?", "response": "Yes."}])
    write_jsonl(root / "fusion.jsonl", [{**shared, "label": "helpful"}, {"prompt": "Is fire hot?", "response": "Yes.",
                                                                          "label": "honest"}])
    recipes = {}
    for label, steps, batch in (("helpful", 3, 2), ("honest", 2, 3)):
        recipes[label] = root / f"align_{label}.yaml"
        recipes[label].write_text(yaml.safe_dump({
            "base_model": str(base), "label": label, "data": [{"jsonl": str(root / f"{label}.jsonl")}],
            "lora": {"r": 2, "alpha": 4, "layers": 1},
            "train": {"steps": steps, "batch_size": batch, "lr": 0.01, "max_tokens": 32, "warmup_steps": 1}}))
    fuse = root / "fuse.yaml"
    fuse.write_text(yaml.safe_dump({
        "merge_method": "h3_moe", "base_model": str(base),
        "models": [{"model": str(root / "merge1"), "label": "helpful"}, {"model": str(root / "merge2"), "label": "honest"}],
        "parameters": {"top_k": 1},
        "train": {"data": str(root / "fusion.jsonl"), "trainable": "router+lora", "steps": 2, "batch_size": 2,
                  "lr": 0.02, "lora_r": 3, "lora_alpha": 6, "max_length": 40, "seed": 1}}))
    return root, base, recipes, fuse


def compare_file(root, name, candidates, **over):
    spec = {"output": str(root / f"out_{name}"), "settings": SETTINGS, "suites": SUITES,
            "selection": {"limit": 2}, "candidates": [{"name": "base", "checkpoint": str(root / "base")}, *candidates],
            **over}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def adapter_params(folder):
    with safe_open(str(folder / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def test_multitask_gets_the_experts_and_the_fusions_budget_together(world):
    root, base, recipes, fuse = world
    cfg = json.loads((base / "config.json").read_text())
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    path = compare_file(root, "mt", [{"name": "multitask", "group": "same_training",
                                      "multitask": {"align": [str(recipes["helpful"]), str(recipes["honest"])],
                                                    "fuse": str(fuse)}}])
    res = run_compare(path, progress=False)
    t = res.results["candidates"]["multitask"]["training"]
    assert t["steps"] == 3 + 2 + 2  # the experts' steps and the fusion's
    assert t["batch_size"] == math.ceil((3 * 2 + 2 * 3 + 2 * 2) / 7)  # as many rows seen in all
    assert t["rows"] == 3 + 2 + 2 - 2  # the union: "Say hi" is in all three
    ffn = 3 * (hidden + inter)  # gate, up (hidden -> inter), down (inter -> hidden): in + out per rank
    experts = 2 * 2 * 1 * ffn  # two experts, r 2, their last layer
    fusion = 2 * hidden * layers + 3 * 2 * layers * ((hidden + 2 * inter) + (inter + hidden))  # routers + expert LoRA
    assert [s["trainable_params"] for s in t["sources"]] == [experts // 2, experts // 2, fusion]
    assert t["budget_params"] == experts + fusion
    assert t["layers"] == layers  # the fusion trains in every layer
    assert t["lora_r"] == math.ceil((experts + fusion) / (layers * ffn)) and t["lora_alpha"] == 2 * t["lora_r"]
    assert t["lr"] == 0.01 and t["max_tokens"] == 40  # the experts' lr; the longest sequence of any source
    trained = next((root / "out_mt" / "cache" / "trained").glob("multitask-*"))
    assert adapter_params(trained) == t["trainable_params"] >= t["budget_params"]
    assert json.loads((trained / "align_log.json").read_text())["steps"] == t["steps"]
    report = (root / "out_mt" / "report.md").read_text()
    assert "Training of the same-training baselines" in report and f"{t['steps']} x {t['batch_size']}" in report
    again = run_compare(path, progress=False)  # trained once, cached by fingerprint
    assert again.evaluated == [] and again.results["candidates"]["multitask"]["fingerprint"] == \
        res.results["candidates"]["multitask"]["fingerprint"]


def test_merge_then_train_starts_from_the_merge_best_on_validation(world):
    root, base, recipes, fuse = world
    path = compare_file(root, "mtt", [
        {"name": "m1", "checkpoint": str(root / "merge1"), "group": "merge"},
        {"name": "m2", "checkpoint": str(root / "merge2"), "group": "merge"},
        {"name": "tuned", "group": "same_training", "merge_then_train": {"merges": ["m1", "m2"], "fuse": str(fuse)}}])
    res = run_compare(path, progress=False)
    sel = res.results["selection"]["tuned"]
    assert sel["split"] == "validation" and [t["values"]["merge"] for t in sel["tried"]] == ["m1", "m2"]
    means = {t["values"]["merge"]: t["score"] for t in sel["tried"]}
    assert sel["chosen"]["merge"] == max(means, key=means.get)
    desc = res.results["candidates"]["tuned"]
    assert desc["merge"] == sel["chosen"]["merge"]
    t = desc["training"]
    assert (t["steps"], t["batch_size"], t["lr"], t["lora_r"], t["lora_alpha"], t["max_tokens"], t["seed"]) == \
        (2, 2, 0.02, 3, 6, 40, 1)  # the fusion's
    assert t["rows"] == 2 and t["base"] == str(root / ("merge1" if desc["merge"] == "m1" else "merge2"))
    trained = next((root / "out_mtt" / "cache" / "trained").glob("tuned-*"))
    assert adapter_params(trained) == t["trainable_params"]
    assert "tuned: merge=" in (root / "out_mtt" / "report.md").read_text()


def test_their_rows_are_checked_disjoint_from_the_suites(world, tmp_path):
    """A suite's test item among an expert's rows: the multitask candidate trains on it, so compare refuses."""
    root, base, recipes, fuse = world
    item = data.select("advbench", "test")[0]
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"prompt": item.prompt, "response": "No."}])
    recipe = tmp_path / "align_leaky.yaml"
    recipe.write_text(recipes["honest"].read_text().replace(str(root / "honest.jsonl"), str(leaky)))
    path = compare_file(tmp_path, "leak", [{"name": "multitask", "multitask": {"align": [str(recipe)]}}],
                        settings={**SETTINGS, "limit": 400}, suites=["harmless_refusal"])
    (tmp_path / "base").symlink_to(base)
    with pytest.raises(MergeLabError, match=r"candidates.1.*rows candidate 'multitask' trains on.*overlaps suite "
                                            r"'harmless_refusal'"):
        run_compare(path, progress=False)
    assert not (tmp_path / "out_leak" / "cache" / "trained").exists()  # refused before any training


def test_recipes_that_cannot_share_one_run_are_refused(world, tmp_path):
    root, base, recipes, fuse = world
    other = tmp_path / "other_lr.yaml"
    other.write_text(recipes["honest"].read_text().replace("lr: 0.01", "lr: 0.5"))
    (tmp_path / "base").symlink_to(base)
    path = compare_file(tmp_path, "lr", [{"name": "mt", "multitask": {"align": [str(recipes["helpful"]), str(other)]}}])
    with pytest.raises(MergeLabError, match=r"candidate 'mt'.*differ in train.lr"):
        run_compare(path, progress=False)
    path = compare_file(tmp_path, "two", [{"name": "mt", "checkpoint": str(base),
                                           "multitask": {"align": [str(recipes["helpful"])]}}])
    with pytest.raises(MergeLabError, match="exactly one of"):
        run_compare(path, progress=False)


def test_readme_compare_file_with_the_baselines_is_valid():
    from pathlib import Path

    from merge_lab.core.config import parse_yaml
    from merge_lab.evaluation.spec import CompareSpec

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("# compare.yaml\n", 1)[1].split("```", 1)[0]
    spec, _ = parse_yaml(block, "README.md", CompareSpec, "compare file")
    kinds = {c.name: c for c in spec.candidates}
    assert kinds["mixture"].multitask.fuse.endswith("08_fuse_h3_moe.yaml")
    assert kinds["ties_tuned"].merge_then_train.merges == ["ties"] and not kinds["ties_tuned"].selects



def test_two_compare_processes_train_the_baseline_together(world, tmp_path):
    """Under `accelerate launch` every comparison process trains its share of the multitask baseline
    (align is data-parallel) and the main one saves it once: the adapter one process trains, within
    float rounding, the same budget, and one output folder."""
    import subprocess

    from merge_lab.testing.launch import accelerate_command, cpu_env

    root, base, recipes, fuse = world
    spec = {"settings": SETTINGS, "suites": SUITES,
            "candidates": [{"name": "base", "checkpoint": str(root / "base")},
                           {"name": "multitask", "multitask": {"align": [str(recipes["helpful"])], "fuse": str(fuse)}}]}
    path = tmp_path / "mt2.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # 5 steps of 2 rows: each process 1 row a step
    one = run_compare(path, tmp_path / "one", progress=False)
    work = tmp_path / "launch"
    work.mkdir()
    cmd = accelerate_command(2, "-m", "merge_lab", "compare", str(path), "-o", str(work / "two"), "--no-progress")
    res = subprocess.run(cmd, cwd=work, env=cpu_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert [p.name for p in work.iterdir()] == ["two"]
    two = json.loads((work / "two" / "results.json").read_text())
    assert two["processes"] == 2
    assert two["candidates"]["multitask"]["training"] == one.results["candidates"]["multitask"]["training"]
    folders = [next((out / "cache" / "trained").glob("multitask-*")) for out in (tmp_path / "one", work / "two")]
    logs = [json.loads((f / "align_log.json").read_text()) for f in folders]
    assert logs[1]["processes"] == 2 and logs[0]["processes"] == 1
    assert not list((work / "two" / "cache" / "trained").glob(".*rows.jsonl"))  # the shared rows file is gone
    tensors = []
    for f in folders:
        with safe_open(str(next((f / "adapter").glob("*.safetensors"))), "pt") as s:
            tensors.append({k: s.get_tensor(k) for k in s.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    for k in tensors[0]:
        torch.testing.assert_close(tensors[1][k], tensors[0][k], rtol=0, atol=1e-5)
