"""The whole demo pipeline on a tiny random model and tiny slices of the shipped data."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.datasets import sources as data
from merge_lab.demo.pipeline import DEMO_RECIPES, PROFILES, STEPS, effective_recipe, run_demo
from merge_lab.evaluation.headline import rivals
from merge_lab.evaluation.spec import load_spec, references
from merge_lab.testing import make_checkpoint

TINY = {
    "align": {"train": {"steps": 2, "batch_size": 2, "max_tokens": 48}, "data_limit": 3},
    "fuse": {"train": {"steps": 2, "batch_size": 2, "max_length": 48, "eval_rows": 4}, "data_limit": 3},
    "compare": {"settings": {"limit": 2, "max_new_tokens": 3, "bootstrap": 50},
                "suites": ["harmless_refusal", "honest_truefalse"]},
}


def test_every_demo_recipe_is_a_step_and_says_how_to_run_it_alone():
    assert sorted(p.name for p in DEMO_RECIPES.glob("*.yaml")) == [s.recipe for s in STEPS]
    command = {"align": "align", "merge": "merge", "fuse": "fuse", "assemble": "merge", "compare": "compare"}
    for step in STEPS:
        text = (DEMO_RECIPES / step.recipe).read_text()
        run = re.search(r"Run alone[^:]*:\s+merge-lab (\w+) (\S+)(?: -o (\S+))?", text)
        assert run, f"{step.recipe}: no 'Run alone' line"
        assert run.group(1) == command[step.kind] and run.group(2) == f"merge_lab/demo/recipes/{step.recipe}"
        if step.kind != "compare":
            assert run.group(3) == f"runs/demo/{step.out}", step.recipe
        else:
            assert yaml.safe_load(text)["output"] == f"runs/demo/{step.out}"


def test_profiles_relocate_paths_and_cap_data(tmp_path):
    step = STEPS[7]  # fuse
    doc = effective_recipe(step, DEMO_RECIPES / step.recipe, tmp_path / "d", PROFILES["quick"], None)
    assert doc["base_model"] == str((tmp_path / "d" / "base").resolve())
    assert all(m["model"].startswith(str((tmp_path / "d").resolve())) for m in doc["models"])
    assert doc["train"]["steps"] == PROFILES["quick"]["fuse"]["train"]["steps"]
    assert all(b["limit"] <= PROFILES["quick"]["fuse"]["data_limit"] for b in doc["train"]["data"])
    assert doc["train"]["lambda"] > 0 and all(v > 0 for v in doc["train"]["gamma"].values())


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_gives_valid_recipes(profile, tmp_path):
    """Overrides are checked by the same schemas the steps use, before hours are spent on a profile."""
    from merge_lab.evaluation.compare import CompareSpec
    from merge_lab.merge.recipe import Recipe
    from merge_lab.moe.train_config import TrainConfig
    from merge_lab.training.align import AlignRecipe

    for step in STEPS:
        doc = effective_recipe(step, DEMO_RECIPES / step.recipe, tmp_path, PROFILES[profile], None)
        if step.kind == "align":
            train = AlignRecipe.model_validate(doc).train
            assert (train.steps, train.epochs) == ((None, 2) if profile == "thorough" else (train.steps, None))
        elif step.kind == "compare":
            CompareSpec.model_validate(doc)
        else:
            Recipe.model_validate({k: v for k, v in doc.items() if k != "train"})
            if step.kind == "fuse":
                TrainConfig.model_validate(doc["train"])


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_compares_each_objective_out_of_distribution(profile, tmp_path):
    """The headline and verdict are computed on the OOD suites: a profile without one per objective
    would have no headline basis (which suites are OOD is each suite's own `ood` flag)."""
    from merge_lab.evaluation.suites import H3_OBJECTIVES, make_suite

    step = next(s for s in STEPS if s.kind == "compare")
    doc = effective_recipe(step, DEMO_RECIPES / step.recipe, tmp_path, PROFILES[profile], None)
    suites = [make_suite(e, split=doc["settings"]["split"], limit=doc["settings"]["limit"]) for e in doc["suites"]]
    ood = [s for s in suites if s.ood]
    assert {s.objective for s in ood} == set(H3_OBJECTIVES)
    assert all(s.items() for s in ood)
    assert {s.objective for s in suites if not s.ood} >= set(H3_OBJECTIVES)  # in distribution beside them


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    base = make_checkpoint(root / "tiny-base", "llama", seed=0, shards=False)
    out = root / "runs"
    result = run_demo(out, profile="quick", base=str(base), overrides=TINY, progress=False)
    return out, result


def test_demo_runs_every_step_end_to_end(demo_run):
    out, result = demo_run
    assert result.ran == [s.recipe.removesuffix(".yaml") for s in STEPS]
    for label in ("helpful", "harmless", "honest"):
        assert (out / "experts" / label / "adapter" / "adapter_config.json").is_file()
        assert (out / "experts" / label / "merged" / "config.json").is_file()
    for m in ("linear", "ties"):
        assert (out / "merges" / m / "config.json").is_file()
    moe = json.loads((out / "fused" / "h3_moe" / "config.json").read_text())
    assert moe.get("num_local_experts") == 3
    results = json.loads((out / "report" / "results.json").read_text())
    assert {"base", "helpful", "harmless", "honest", "linear", "ties",
            "token_ensemble", "best_of_3", "h3_moe"} <= set(results["candidates"])
    assert (out / "report" / "report.html").is_file()
    # the recipes as run point into this demo folder
    ran = yaml.safe_load((out / "recipes" / "06_merge_ties.yaml").read_text())
    assert ran["base_model"] == str(out.resolve() / "base")


def test_manifest_lists_disjoint_training_and_evaluation_items(demo_run):
    out, result = demo_run
    manifest = json.loads((out / "report" / "manifest.json").read_text())
    assert manifest == json.loads(result.manifest.read_text()) and manifest["disjoint_checked"]
    assert set(manifest["experts"]) == {"helpful", "harmless", "honest"}
    trained = {f"{s}:{i}" for e in manifest["experts"].values() for s, idx in e["by_source"].items() for i in idx}
    assert manifest["fusion_rows"]["count"] > 0
    trained |= {f"{s}:{i}" for s, idx in manifest["fusion_rows"]["by_source"].items() for i in idx}
    evaluated = {f"{s}:{i}" for x in manifest["suites"].values() for s, idx in x["by_source"].items() for i in idx}
    assert trained and evaluated and not trained & evaluated
    assert all(data.split_of(i) == "train" for i in trained)
    # the fused model's top-k was chosen on validation items, apart from both
    chosen_on = {f"{s}:{i}" for x in manifest["selection_items"].values() for s, idx in x["by_source"].items() for i in idx}
    assert chosen_on and not chosen_on & (trained | evaluated)
    assert all(data.split_of(i) == "validation" for i in chosen_on)
    results = json.loads((out / "report" / "results.json").read_text())
    assert [t["values"]["num_experts_per_tok"] for t in results["selection"]["h3_moe"]["tried"]] == [1, 2, 3]
    data.check_disjoint(trained, evaluated)


def test_second_run_reuses_every_step(demo_run):
    out, _ = demo_run
    base = out.parent / "tiny-base"
    again = run_demo(out, profile="quick", base=str(base), overrides=TINY, progress=False)
    assert again.ran == [] and len(again.reused) == len(STEPS)


def test_ablations_and_same_training_baselines_are_built_and_grouped(demo_run):
    """The fusion's ablations (routers at init only, routers alone) and the two same-training baselines
    are candidates of the demo's comparison, listed by group, with budgets from the recipes as run."""
    out, _ = demo_run
    results = json.loads((out / "report" / "results.json").read_text())
    cands = results["candidates"]
    groups = {n: c.get("group") for n, c in cands.items()}
    assert {n for n, g in groups.items() if g == "ablation"} == {"h3_moe_init_only", "h3_moe_router_only"}
    assert {n for n, g in groups.items() if g == "same_training"} == {"multitask", "merge_then_train"}
    as_run = {p.stem: yaml.safe_load(p.read_text()) for p in (out / "recipes").glob("*.yaml")}
    fuse = as_run["08_fuse_h3_moe"]["train"]
    assert as_run["08_fuse_h3_moe_router_only"]["train"] == {**fuse, "trainable": "router"}
    assert as_run["08_fuse_h3_moe_init_only"]["train"] == fuse  # its data gives the same centroid routers
    assert "Fusion training" not in (out / "fused" / "h3_moe_init_only" / "README.md").read_text()
    # what trained: routers alone leave the experts as assembled; routers + expert LoRA change them too
    init, alone, both = (Checkpoint(out / "fused" / n) for n in ("h3_moe_init_only", "h3_moe_router_only", "h3_moe"))
    experts = [n for n in init.tensors if ".experts." in n]
    router = next(n for n in init.tensors if n.endswith(".gate.weight"))
    assert experts and all(torch.equal(init.get(n), alone.get(n)) for n in experts)
    assert not all(torch.equal(init.get(n), both.get(n)) for n in experts)
    assert not torch.equal(init.get(router), alone.get(router))
    mt = cands["multitask"]["training"]
    assert mt["steps"] == sum(as_run[f"0{i}_align_{x}"]["train"]["steps"]
                              for i, x in ((1, "helpful"), (2, "harmless"), (3, "honest"))) + fuse["steps"]
    mtt = cands["merge_then_train"]
    assert mtt["merge"] == results["selection"]["merge_then_train"]["chosen"]["merge"]
    assert (mtt["training"]["steps"], mtt["training"]["lr"]) == (fuse["steps"], fuse["lr"])
    spec, _ = load_spec(out / "recipes" / "09_compare.yaml")  # what the verdict compares the fused model with
    compared = rivals(spec, references(spec))
    assert compared["best ablation"] == ["h3_moe_init_only", "h3_moe_router_only"]
    assert compared["best same_training"] == ["multitask", "merge_then_train"]
    assert {f"listed ({n})" for n in ("multitask", "merge_then_train", "h3_moe_router_only", "h3_moe_init_only")} <= set(compared)
    report = (out / "report" / "report.md").read_text()
    table = report.split("## Candidates by group", 1)[1].split("## ", 1)[0]
    assert "| ablation | h3_moe_router_only |" in table and "| same_training | multitask |" in table
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["baselines"]) == {"multitask", "merge_then_train"} and manifest["disjoint_checked"]
