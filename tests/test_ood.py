"""Out-of-distribution suites: held-out sources stay held out, their suites read only their test
split, and a comparison that has them puts its headline on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from merge_lab.datasets import heldout
from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.suites import SUITES, make_suite

ROOT = Path(__file__).parents[1]
OOD_SUITES = ["harmless_refusal_ood", "harmless_overrefusal_ordinary", "harmless_ood", "helpful_likelihood_ood",
              "honest_factual_ood"]


def test_every_held_out_source_loads_with_stable_ids_and_is_evaluation_only():
    assert set(heldout.HELD_OUT) <= data.EVALUATION_ONLY
    for name in heldout.HELD_OUT:
        items = data.load_source(name)
        assert len(items) >= 100, name
        assert [e.id for e in items[:3]] == [f"{name}:0", f"{name}:1", f"{name}:2"]
        assert [e.id for e in data.load_source(name)] == [e.id for e in items]
        assert all(e.prompt for e in items), name
        assert data.select(name, "train") == []
    assert all(e.response and e.meta["answers"] for e in data.load_source("ordinary_questions"))
    assert all("<<" not in e.response and "####" in e.response for e in data.load_source("math_problems"))
    assert {e.label for e in data.load_source("harmful_rephrased")} == {"harmful"}


def test_held_out_sources_share_no_item_with_any_trainable_source():
    trainable = [e for n in data.sources() if n not in data.EVALUATION_ONLY for e in data.load_source(n)]
    for name in data.EVALUATION_ONLY:
        data.check_disjoint(trainable, data.load_source(name))


def test_every_ood_suite_reads_only_evaluation_only_sources():
    ood = [n for n, c in SUITES.available().items() if c.ood]
    assert set(OOD_SUITES) <= set(ood)
    for n in ood:
        cls = SUITES.get(n)
        assert cls.sources and set(cls.sources) <= data.EVALUATION_ONLY, n
        assert cls.info()["ood"] is True
    assert SUITES.get("harmless_refusal").info()["ood"] is False


@pytest.mark.parametrize("name", OOD_SUITES)
def test_ood_suites_select_only_their_test_split(name):
    suite = make_suite(name, limit=30)
    items = suite.items()
    assert len(items) == 30
    assert {data.split_of(e) for e in items} == {"test"}
    assert {e.source for e in items} <= set(SUITES.get(name).sources)
    val = make_suite(name, split="validation", limit=10).items()
    assert {data.split_of(e) for e in val} == {"validation"}
    with pytest.raises(MergeLabError, match="not an evaluation split"):
        make_suite(name, split="train")


def test_harmless_ood_alternates_harmful_and_ordinary_requests():
    items = make_suite("harmless_ood", limit=12).items()
    assert [e.label for e in items] == ["harmful", "benign"] * 6
    assert {e.source for e in items[1::2]} == {"ordinary_questions", "health_questions"}


def test_training_on_a_held_out_source_is_refused_and_no_demo_recipe_reads_one(tmp_path):
    from merge_lab.training.align import load_align_recipe

    for name in heldout.HELD_OUT:
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(f"base_model: x\ndata:\n  - source: {name}\n    split: train\n")
        with pytest.raises(MergeLabError, match=f"'{name}' is evaluation-only"):
            load_align_recipe(recipe).rows()
    from merge_lab.moe.data import load_rows
    from merge_lab.training.blocks import DataSpec, training_rows

    with pytest.raises(MergeLabError, match=r"train.data.0: source 'ordinary_questions' is evaluation-only"):
        load_rows([{"expert": "helpful", "source": "ordinary_questions", "split": "train"}], ["helpful"])
    for name in OOD_SUITES:
        with pytest.raises(MergeLabError, match=f"suite '{name}' is out of distribution"):
            training_rows([DataSpec.model_validate({"suite": name, "response_template": "{refusal}"})])
    read = []
    for f in sorted((ROOT / "merge_lab" / "demo" / "recipes").glob("0*.yaml")):
        doc = yaml.safe_load(f.read_text())
        blocks = doc.get("data") or (doc.get("train") or {}).get("data") or []
        read += [(f.name, b.get("source")) for b in blocks]
    assert read and not [r for r in read if r[1] in data.EVALUATION_ONLY]


def test_ood_flag_on_a_suite_entry(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
    mine = make_suite({"name": "mine", "path": str(path), "kind": "likelihood", "ood": True})
    assert mine.info()["ood"] is True and mine.name == "mine"
    assert make_suite({"name": "harmless_ood", "ood": True}).ood
    with pytest.raises(MergeLabError, match="advbench.*not out of distribution"):
        make_suite({"name": "harmless_refusal", "ood": True})


def test_demo_compare_evaluates_every_objective_out_of_distribution():
    from merge_lab.demo.pipeline import PROFILES
    from merge_lab.evaluation.spec import load_spec

    spec, _ = load_spec(ROOT / "merge_lab" / "demo" / "recipes" / "09_compare.yaml")
    for entries in (spec.suites, PROFILES["thorough"]["compare"]["suites"]):
        suites = [make_suite(e, limit=2) for e in entries]
        ood = {s.objective for s in suites if s.ood}
        assert ood == {"harmless", "helpful", "honest"}
        assert {s.objective for s in suites if not s.ood} >= ood  # in distribution beside them
    names = [s if isinstance(s, str) else s["name"] for s in spec.suites]
    assert "honest_factual" in names and "honest_truefalse" not in names


def test_readme_lists_the_ood_suites_and_sources():
    text = (ROOT / "README.md").read_text()
    for name in [*OOD_SUITES, *heldout.HELD_OUT]:
        assert f"`{name}`" in text, name


@pytest.fixture(scope="module")
def toy_compare(tmp_path_factory):
    from merge_lab.evaluation.compare import run_compare
    from merge_lab.testing.toy import make_bigram_checkpoint

    root = tmp_path_factory.mktemp("ood")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    (root / "like.jsonl").write_text("".join(json.dumps({"prompt": f"Task {i}", "response": "Sure"}) + "\n"
                                             for i in range(6)))
    spec = {
        "output": str(root / "report"), "settings": {"limit": 6, "max_new_tokens": 10, "bootstrap": 200},
        "suites": ["harmless_refusal", "helpful_likelihood", "harmless_refusal_ood",
                   {"name": "like", "path": "like.jsonl", "kind": "likelihood", "objective": "helpful", "ood": True}],
        "headline": "ens",
        "candidates": [{"name": "refuse", "checkpoint": "refuse", "source": True},
                       {"name": "comply", "checkpoint": "comply", "source": True},
                       {"name": "ens", "ensemble": ["refuse", "comply"], "weights": [0.8, 0.2]}],
    }
    (root / "compare.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return root, run_compare(root / "compare.yaml", progress=False).results
    finally:
        torch.set_num_threads(before)


def test_a_compare_with_ood_suites_puts_its_headline_on_them(toy_compare):
    root, res = toy_compare
    hs = res["headline_scores"]
    assert hs["distribution"] == "out-of-distribution"
    assert hs["suites"] == ["harmless_refusal_ood", "like"] and hs["objectives"] == ["helpful", "harmless"]
    assert hs["in_distribution_shown"] == ["harmless_refusal", "helpful_likelihood"]
    assert set(hs["per_suite"]) <= {"harmless_refusal_ood", "like"}
    assert {c["suite"] for c in res["headline"]["per_suite"]} <= {"harmless_refusal_ood", "like"}
    assert res["suites"]["like"]["ood"] and not res["suites"]["harmless_refusal"]["ood"]
    report = (root / "report" / "report.md").read_text()
    assert "The headline uses the out-of-distribution suites only" in report
    assert "harmless_refusal_ood (out of distribution)" in report
    assert "harmless_refusal (in distribution)" in report


def test_without_ood_suites_the_headline_uses_every_suite():
    from merge_lab.evaluation.headline import fill_verdict
    from merge_lab.evaluation.spec import References

    def suite(ood: bool) -> dict:
        return {"objective": "helpful", "higher_is_better": True, "ood": ood}

    per = {"a": [0.0, 0.0, 1.0, 0.0], "b": [1.0, 1.0, 1.0, 0.0], "c": [1.0, 0.0, 1.0, 1.0]}
    recs = {n: [{"id": str(i), "score": v} for i, v in enumerate(xs)] for n, xs in per.items()}
    refs = References("a", ("b",), "source", 0.05, ())
    for flags, used in (((False, False), ["s1", "s2"]), ((False, True), ["s2"])):
        results = {"suites": {"s1": suite(flags[0]), "s2": suite(flags[1])},
                   "per_example": {"s1": recs, "s2": recs}}
        fill_verdict(results, refs, n_boot=50, n_perm=50)
        assert results["headline_scores"]["suites"] == used
