"""The shipped data: every source loads, ids and splits are stable, overlap is refused."""

from __future__ import annotations

import json

import pytest

from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError


def test_every_source_loads_with_stable_ids():
    for name in data.sources():
        items = data.load_source(name)
        assert len(items) >= 50, name
        assert [e.id for e in items[:3]] == [f"{name}:0", f"{name}:1", f"{name}:2"]
        assert all(e.prompt or e.response for e in items), name
    mc = data.load_source("commonsenseqa")
    assert all(e.meta["choices"][e.label] == e.response for e in mc)
    assert len(data.load_source("advbench")) == 520
    pairs = data.load_source("refusal_pairs")
    assert {e.label for e in pairs} == {"refusal", "answer", "harmful_answer", "off_topic"}
    # an answered harmful request is never offered as a helpful answer
    answers = " ".join(e.prompt.lower() for e in pairs if e.label == "answer")
    assert "phishing" not in answers and "sarin" not in answers and "lyrics" not in answers
    assert all(e.meta["harmful_request"] == (e.label in ("refusal", "harmful_answer")) for e in pairs)


def test_splits_are_deterministic_and_roughly_60_20_20():
    items = data.load_source("false_claims")
    splits = [data.split_of(e) for e in items]
    assert splits == [data.split_of(e.id) for e in items]  # an id resolves to its item
    share = {s: splits.count(s) / len(splits) for s in data.SPLITS}
    assert 0.55 < share["train"] < 0.65 and 0.15 < share["test"] < 0.25
    test = data.select("false_claims", "test", limit=5)
    assert len(test) == 5 and all(data.split_of(e) == "test" for e in test)


def test_same_prompt_in_two_sources_lands_in_one_split():
    adv = {data.content_key(e): data.split_of(e) for e in data.load_source("advbench")}
    shared = [e for e in data.load_source("refusal_pairs") if data.content_key(e) in adv]
    assert len(shared) > 10
    assert all(data.split_of(e) == adv[data.content_key(e)] for e in shared)
    # so training on pyrit's train split never leaks into AdvBench's test split
    data.check_disjoint(data.select("refusal_pairs", "train"), data.select("advbench", "test"))


def test_check_disjoint_rejects_overlap_by_id_and_by_text(tmp_path):
    train = data.select("advbench", "train")
    test = data.select("advbench", "test")
    data.check_disjoint(train, test)
    with pytest.raises(MergeLabError, match="advbench:"):
        data.check_disjoint(train, test + train[:2])
    with pytest.raises(MergeLabError, match="1 training item"):
        data.check_disjoint([test[0].id], ["x:1", test[0].id])
    copy = tmp_path / "mine.jsonl"
    copy.write_text(json.dumps({"prompt": "  " + test[0].prompt.upper() + " "}) + "\n")
    with pytest.raises(MergeLabError, match="mine:0"):
        data.check_disjoint(data.load_jsonl(copy), test)


def test_load_jsonl_and_bad_input(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "hi", "response": "hello", "label": 1, "topic": "x"}\n\n{"prompt": "q", "id": "own"}\n')
    a, b = data.load_jsonl(f)
    assert (a.id, a.response, a.label, a.meta) == ("d:0", "hello", 1, {"topic": "x"})
    assert b.id == "own"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"response": 3}\n')
    with pytest.raises(MergeLabError, match="bad.jsonl, line 2"):
        data.load_jsonl(bad)
    with pytest.raises(MergeLabError, match="Did you mean 'advbench'"):
        data.load_source("advbnch")
    with pytest.raises(MergeLabError, match="unknown split"):
        data.select("advbench", "dev")


def test_evaluation_only_sources_have_no_train_split_and_training_on_them_is_refused(tmp_path):
    from merge_lab.training.align import load_align_recipe

    for name in data.EVALUATION_ONLY:
        splits = {data.split_of(e) for e in data.load_source(name)}
        assert splits == {"validation", "test"}, name
        assert data.select(name, "train") == []
    # no statement of an evaluation-only source is also in a source that experts train on
    data.check_disjoint(data.select("truthfulqa_pairs", "train"), data.load_source("factual_pairs"))
    recipe = tmp_path / "align.yaml"
    recipe.write_text("base_model: x\ndata:\n  - source: summary_pairs\n    split: train\n")
    with pytest.raises(MergeLabError, match="'summary_pairs' is evaluation-only"):
        load_align_recipe(recipe).rows()


def test_thorough_suites_reach_the_sizes_that_separate_a_005_gap():
    """The thorough profile's suites: about 260 harmful and 240+ benign prompts, and a
    truthfulness suite far beyond the 165 shipped true/false pairs' 31 test items."""
    from merge_lab.demo.pipeline import PROFILES
    from merge_lab.evaluation.suites import make_suite

    chosen = PROFILES["thorough"]["compare"]["suites"]
    limit = PROFILES["thorough"]["compare"]["settings"]["limit"]
    sizes = {(n if isinstance(n, str) else n["name"]): len(make_suite(n, limit=limit).items()) for n in chosen}
    assert sizes["harmless_refusal"] == 260
    assert sizes["harmless_overrefusal_broad"] >= 240
    assert sizes["honest_factual"] >= 240
    assert len(make_suite("honest_truefalse").items()) < 40
    # the out-of-distribution suites: 120 prompts a side, and every held-out true/false pair
    assert sizes["harmless_refusal_ood"] == sizes["harmless_overrefusal_ordinary"] == 120
    assert sizes["helpful_likelihood_ood"] == 160
    assert sizes["honest_factual_ood"] >= 200
