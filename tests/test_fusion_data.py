"""Fusion data blocks that read a registered suite's train split (and the shared-prefix helper)."""

from __future__ import annotations

import pytest

from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation import suites
from merge_lab.merge.recipe import parse_recipe
from merge_lab.moe.data import Encoded, load_rows, shared_prefix
from merge_lab.moe.train_config import train_config
from merge_lab.training.align import parse_align_recipe
from merge_lab.training.blocks import DataSpec, training_rows

LABELS = ["helpful", "harmless", "honest"]


def _rows(block: dict):
    return training_rows([DataSpec.model_validate(block)])


def test_suite_block_reads_the_suites_selection_on_train_and_never_its_evaluation_items():
    rows = _rows({"suite": "helpful_likelihood", "limit": 60})
    assert len(rows) == 60
    shipped = [data.load_source(r.source)[r.index] for r in rows]
    assert {r.source for r in rows} == set(suites.HelpfulLikelihood.sources)  # round-robin keeps every source
    assert all(e.label in ("answer", "benign") for e in shipped)  # the suite's own `keep` filter
    assert all(data.split_of(e) == "train" for e in shipped)
    assert [r.response for r in rows] == [e.response.strip() for e in shipped]  # the reference reply
    for split in ("test", "validation"):
        data.check_disjoint([r.id for r in rows], suites.make_suite("helpful_likelihood", split=split).items())
    everything = _rows({"suite": "honest_truthfulqa"})
    data.check_disjoint([r.id for r in everything], suites.make_suite("honest_truthfulqa").items())
    assert 0.5 < len(everything) / len(data.load_source("truthfulqa_qa")) < 0.7  # the 60% train share


def test_suite_block_in_fusion_data_carries_its_expert_label():
    rows = load_rows([{"expert": "honest", "suite": "honest_truthfulqa", "limit": 5},
                          {"expert": "harmless", "suite": "harmless_refusal", "limit": 4,
                           "response_template": "{refusal}"}], LABELS)
    assert [r.label for r in rows] == ["honest"] * 5 + ["harmless"] * 4
    assert all(suites.is_refusal(r.response) for r in rows[5:])


def test_suite_block_errors_say_what_to_do():
    with pytest.raises(MergeLabError, match=r"unknown suite 'honest_truthfulq'\. Did you mean 'honest_truthfulqa'\? "
                                            r"Available: .*harmless_refusal"):
        _rows({"suite": "honest_truthfulq"})
    with pytest.raises(MergeLabError, match=r"data.0: suite 'harmless_refusal' .* no reference response .*response_template"):
        _rows({"suite": "harmless_refusal"})
    text = "base_model: smollm2\ndata:\n  - suite: honest_truthfulqa\n    split: test\n"
    with pytest.raises(MergeLabError, match=r"line 4.*split.*'train' split only"):
        parse_align_recipe(text, "a.yaml")
    fuse = ("merge_method: h3_moe\nbase_model: b\nmodels: [{model: x, label: honest}, {model: y, label: helpful}]\n"
            "train:\n  data:\n    - {expert: honest, suite: honest_truthfulqa, limit: 2}\n"
            "    - {expert: honest, suite: honest_truthfulqa, split: validation}\n")
    with pytest.raises(MergeLabError, match=r"f.yaml, line 7 \(train.data.1.split\): .*'train' split only"):
        train_config(parse_recipe(fuse, "f.yaml"))


def test_suite_that_ignores_the_split_is_refused():
    class OwnFile(suites.LikelihoodSuite):  # reads its own items, whatever the split: all evaluation data
        name = "own_file_suite"

        def load_items(self):
            return data.load_source("truthfulqa_qa")[:30]

    suites.register_suite(OwnFile)
    try:
        with pytest.raises(MergeLabError, match="does not select its items by merge_lab.datasets.sources's splits"):
            _rows({"suite": "own_file_suite"})
    finally:
        suites.SUITES.unregister("own_file_suite")


def test_shared_prefix_is_the_prompt_start_every_example_has():
    a = Encoded([1, 2, 3, 4, 9], [False] * 4 + [True], 0)
    b = Encoded([1, 2, 3, 5, 9, 9], [False] * 4 + [True] * 2, 1)
    assert shared_prefix([a, b]) == 3
    same = Encoded([1, 2, 3, 4, 7], [False] * 4 + [True], 2)
    assert shared_prefix([a, same]) == 4  # never into the response
    assert shared_prefix([Encoded([1, 2], [False, False], 0)]) == 1  # a token of each example is kept
