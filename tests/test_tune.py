"""The demo's tuning script (merge_lab.demo.tune): variants trained and scored on validation items
only, held-out validation items apart from the report's test items, the choice and its table."""

from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from merge_lab.datasets import sources as data
from merge_lab.demo.pipeline import DEMO_RECIPES, STEPS
from merge_lab.demo.tune import TUNING_FILE, load_tuning, tune
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.spec import load_spec
from merge_lab.evaluation.suites import available, make_suite
from merge_lab.testing import make_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_BUDGET = {
    "align": {"train": {"steps": 2, "batch_size": 2, "max_tokens": 48}, "data_limit": 3},
    "fuse": {"train": {"steps": 2, "batch_size": 2, "max_length": 48, "eval_rows": 4}, "data_limit": 3},
}
HARMLESS_MIX = [{"source": "advbench", "split": "train", "limit": 3, "response_template": "{refusal}"},
                {"source": "refusal_pairs", "split": "train", "label": "answer"}]


def test_every_ood_suite_has_validation_items_apart_from_its_test_items():
    """The tuning reads held-out sources' validation items; the report's OOD suites read their test items."""
    ood = [cls for cls in available().values() if cls.ood]
    assert ood
    for cls in ood:
        val, test = cls(split="validation").items(), cls(split="test").items()
        assert len(val) >= 16 and len(test) > len(val), cls.name
        assert {data.split_of(e) for e in val} == {"validation"} and {data.split_of(e) for e in test} == {"test"}
        data.check_disjoint(val, test)


def test_the_shipped_tuning_file_loads_and_chooses_out_of_distribution():
    spec = load_tuning(TUNING_FILE)
    assert len(spec.variants) >= 5
    assert any(make_suite(e).ood for e in spec.evaluation.suites)
    touched = {k for v in spec.variants for k in v.fuse.get("train", {})} | {
        k for v in spec.variants for k in v.fuse.get("parameters", {})}
    assert {"top_k", "trainable", "lambda", "gamma", "data"} <= touched
    assert any(v.experts for v in spec.variants)  # a data mix of the experts too


@pytest.mark.parametrize("bad, message", [
    ({"experts": {"09_compare.yaml": {}}}, "not one of the demo's expert recipes"),
    ({"suite": {"name": "harmless_ood", "split": "test"}}, "neither `split` nor `path`"),
])
def test_tuning_file_errors_name_the_key(tmp_path, bad, message):
    variant = {"name": "a", "why": "x", **({"experts": bad["experts"]} if "experts" in bad else {})}
    suites = ["harmless_ood", *([bad["suite"]] if "suite" in bad else [])]
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"evaluation": {"suites": suites}, "variants": [variant]}))
    with pytest.raises(MergeLabError, match=message) as e:
        load_tuning(path)
    assert "t.yaml" in str(e.value) and "line" in str(e.value)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    base = make_checkpoint(root / "tiny-base", "llama", seed=0, shards=False)
    spec = {
        "budget": TINY_BUDGET,
        "evaluation": {"limit": 2, "max_new_tokens": 3, "bootstrap": 50,
                       "suites": ["harmless_refusal", "helpful_likelihood", {"name": "harmless_ood", "limit": 4},
                                  "helpful_likelihood_ood"]},
        "variants": [{"name": "anchor", "why": "as shipped", "fuse": {"parameters": {"top_k": 2}}},
                     {"name": "top1", "why": "one expert a token", "fuse": {"parameters": {"top_k": 1}}},
                     {"name": "mix", "why": "harmless data mix", "experts": {"02_align_harmless.yaml": {"data": HARMLESS_MIX}},
                      "fuse": {"train": {"trainable": "router"}}}],
    }
    (root / "tuning.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = root / "work"
    quiet = Console(file=open(root / "log.txt", "w"))
    result = tune(root / "tuning.yaml", out, base=str(base), table=root / "TUNING.md", progress=False, console=quiet)
    return root, out, result, quiet


def test_tuning_trains_each_variant_and_chooses_on_validation_items_only(tuned):
    root, out, result, _ = tuned
    # variants with the same experts share them; a data mix gets its own, trained on its own rows
    assert sorted(p.name for p in (out / "experts").iterdir()) == ["anchor", "mix"]
    mixed = yaml.safe_load((out / "experts" / "mix" / "recipes" / "02_align_harmless.yaml").read_text())
    assert [b["source"] for b in mixed["data"]] == ["advbench", "refusal_pairs"]
    top1 = yaml.safe_load((out / "fusions" / "top1.yaml").read_text())
    assert top1["parameters"]["top_k"] == 1 and top1["train"]["steps"] == TINY_BUDGET["fuse"]["train"]["steps"]
    mix = yaml.safe_load((out / "fusions" / "mix.yaml").read_text())
    assert mix["train"]["trainable"] == "router" and all("/experts/mix/" in m["model"] for m in mix["models"])
    # every item scored is a validation item; none is an item the demo's report tests
    results = json.loads((out / "report" / "results.json").read_text())
    ids = {r["id"] for per in results["per_example"].values() for recs in per.values() for r in recs}
    assert ids and {data.split_of(i) for i in ids} == {"validation"}
    compare, _ = load_spec(DEMO_RECIPES / next(s.recipe for s in STEPS if s.kind == "compare"))
    tested = [e for entry in compare.suites for e in make_suite(entry).items()]
    data.check_disjoint(ids, tested)
    # the choice is the best out-of-distribution score among the variants (not the reference experts)
    scored = json.loads((out / "tuning.json").read_text())
    assert scored == result.scores
    ood = scored["ood"]["scores"]
    assert result.chosen == max(["anchor", "top1", "mix"], key=lambda n: ood[n])
    assert set(scored["ood_suites"]) == {"harmless_ood", "helpful_likelihood_ood"}
    assert set(scored["ood"]["suites"]) <= set(scored["ood_suites"])
    table = (root / "TUNING.md").read_text()
    assert table == result.table.read_text()
    assert "validation" in table and f"**{result.chosen}** (chosen)" in table
    for name in ("anchor", "top1", "mix", "harmless_ood 4 (OOD)"):
        assert name in table


def test_a_second_tuning_run_trains_nothing_again(tuned):
    root, out, result, quiet = tuned
    before = {p: p.stat().st_mtime_ns for p in (out / "fusions").glob("*/config.json")}
    again = tune(root / "tuning.yaml", out, base=str(root / "tiny-base"), progress=False, console=quiet)
    assert again.chosen == result.chosen
    assert {p: p.stat().st_mtime_ns for p in (out / "fusions").glob("*/config.json")} == before
