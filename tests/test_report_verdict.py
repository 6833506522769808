"""The report's verdict: reference-anchored headline scores (unmoved by an unrelated candidate),
tested comparisons ("better" for a large known gap, "no significant difference" inside the
noise, Holm applied), suites that do not separate the candidates, the `verdict:` keys' errors,
and report.md opening with the verdict block."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.compare import run_compare
from merge_lab.evaluation.headline import fill_verdict
from merge_lab.evaluation.spec import References, load_spec, references
from merge_lab.report.summary import verdict
from merge_lab.testing.toy import make_bigram_checkpoint


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One comparison of toy models, then the same file with an unrelated candidate added."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("verdict")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    (root / "like.jsonl").write_text("".join(json.dumps({"prompt": f"Help with {i}", "response": "Sure"}) + "\n"
                                             for i in range(6)))
    spec = {"output": str(root / "report"), "settings": {"limit": 6, "max_new_tokens": 8, "bootstrap": 200},
            "suites": ["harmless_refusal", {"name": "like", "path": "like.jsonl", "kind": "likelihood",
                                             "objective": "helpful"}],
            "headline": "ens", "verdict": {"base": "refuse", "sources": ["comply"]},
            "candidates": [{"name": "refuse", "checkpoint": "refuse", "source": True},
                           {"name": "comply", "checkpoint": "comply", "source": True},
                           {"name": "ens", "ensemble": ["refuse", "comply"], "weights": [0.6, 0.4]},
                           {"name": "ens_b", "ensemble": ["refuse", "comply"], "weights": [0.3, 0.7],
                            "group": "ensemble"}]}
    (root / "compare.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    first = run_compare(root / "compare.yaml", progress=False)
    spec["candidates"].append({"name": "unrelated", "ensemble": ["refuse", "comply"], "weights": [0.9, 0.1]})
    (root / "compare2.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    second = run_compare(root / "compare2.yaml", root / "report2", progress=False)
    torch.set_num_threads(before)
    return first, second


def test_headline_score_ignores_an_unrelated_candidate(runs):
    first, second = runs
    a, b = first.results["headline_scores"], second.results["headline_scores"]
    assert set(a["overall"]) == {"refuse", "comply", "ens", "ens_b"} and "unrelated" in b["overall"]
    assert a["excluded"] == b["excluded"]
    for name, score in a["overall"].items():
        assert b["overall"][name] == pytest.approx(score, abs=1e-12), name
    assert a["per_suite"]["like"]["comply"] == pytest.approx(1.0) and a["per_suite"]["like"]["refuse"] == 0.0
    # the old relative objective moves with the candidate set; it is kept, labelled relative
    assert "quality_relative" in first.results["candidates"]["ens"]
    h = first.results["headline"]
    assert [c["what"] for c in h["comparisons"]] == ["best source model", "best ensemble"]
    for c in h["comparisons"]:
        assert c["p_holm"] >= c["p"] and c["verdict"] in ("better", "worse", "no significant difference")
        assert set(c["n"].values()) <= {6}
    assert h["sample_size"]["flagged"]  # 6 items a suite can separate only huge gaps


def test_report_md_opens_with_the_verdict(runs):
    first, _ = runs
    md = (first.output / "report.md").read_text()
    sections = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert sections[0] == "## Verdict"
    block = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "ens: headline score" in block and "| best source model | " in block
    assert "sample too small" in block.lower() and "n = 6/6" in block
    assert "beats" not in md
    assert md.index("## What the headline score is") < md.index("Headline score against cost") < md.index(
        "<details><summary>Results per suite</summary>")
    html = (first.output / "report.html").read_text()
    assert html.index("<section id='verdict'>") < html.index("<figure>") and "<details>" in html


def _results(per_suite: dict[str, dict[str, list[float]]]) -> dict:
    """A results dict as aggregate writes it, from known per-example scores."""
    objective = {"a": "helpful", "b": "harmless", "flat": "honest"}
    return {"suites": {s: {"objective": objective[s], "higher_is_better": True, "metric": "accuracy",
                           "n": len(next(iter(p.values())))} for s, p in per_suite.items()},
            "per_example": {s: {c: [{"id": f"{s}{i}", "score": v} for i, v in enumerate(x)] for c, x in p.items()}
                            for s, p in per_suite.items()}}


def _known(n: int = 300, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(seed)
    out = {}
    for s in ("a", "b"):
        u = rng.random(n)
        head = (u < 0.85).astype(float)
        close = head.copy()
        flip = rng.choice(n, 3, replace=False)
        close[flip] = 1 - close[flip]  # a noise-sized change
        out[s] = {"base": (u < 0.2).astype(float), "src": (u < 0.5).astype(float), "head": head, "close": close}
    out["flat"] = {c: [1.0, 0.0] * (n // 2) for c in out["a"]}  # every candidate identical: cannot separate
    return out


def test_verdict_words_follow_the_test_with_holm():
    results = _results(_known())
    refs = References("base", ("src",), "source", 0.05, ())
    fill_verdict(results, refs, "head", {"best source model": ["src"], "best merge": ["close"]}, n_boot=400, n_perm=800)
    by = {c["against"]: c for c in results["headline"]["comparisons"]}
    assert by["src"]["verdict"] == "better" and by["src"]["ci"][0] > 0  # +1.0 vs 0 on the source scale: huge
    assert by["close"]["verdict"] == "no significant difference" and by["close"]["ci"][0] <= 0 <= by["close"]["ci"][1]
    assert all(c["p_holm"] >= c["p"] for c in by.values())
    assert by["src"]["p_holm"] == pytest.approx(min(1.0, 2 * by["src"]["p"]))  # Holm: smallest p times 2
    assert by["close"]["p_holm"] == pytest.approx(max(by["close"]["p"], by["src"]["p_holm"]))
    assert results["headline_scores"]["overall"]["src"] == pytest.approx(1.0)
    assert results["headline_scores"]["overall"]["base"] == 0.0
    v = verdict(results)
    assert "head is better than src" in " ".join(v.points) and "no significant difference from close" in " ".join(v.points)
    assert [r[6] for r in v.table[1]] == ["better", "no significant difference"]
    assert all("[" in r[3] and r[7] == f"{300}/{300}" for r in v.table[1])  # interval and n on every row


def test_a_suite_where_every_candidate_ties_is_flagged_and_left_out():
    results = _results(_known())
    fill_verdict(results, References("base", ("src",), "source", 0.05, ()), "head", {"best source model": ["src"]},
          n_boot=200, n_perm=400)
    assert "does not separate these candidates" in results["non_separating"]["flat"]
    excluded = results["headline_scores"]["excluded"]
    assert "flat" in excluded and "left out of the headline" in excluded["flat"]
    assert "flat" not in results["headline_scores"]["per_suite"]
    assert "honest" not in results["headline"]["objectives"]
    assert any(p.startswith("Left out of the headline: flat: does not separate") for p in verdict(results).points)
    assert set(results["headline"]["comparisons"][0]["n"]) == {"a", "b"}


def test_a_small_sample_says_so_plainly():
    results = _results({s: {c: x[:5] for c, x in p.items()} for s, p in _known(n=20, seed=1).items() if s != "flat"})
    fill_verdict(results, References("base", ("src",), "source", 0.05, ()), "head", {"best source model": ["src"]},
          n_boot=200, n_perm=400)
    assert results["headline"]["sample_size"]["flagged"]
    assert any("cannot" in p.lower() or "too small" in p.lower() for p in verdict(results).points)


def test_verdict_keys_are_checked_with_their_line(tmp_path):
    def spec(verdict_block: dict, **extra) -> tuple:
        doc = {"suites": ["harmless_refusal"], "headline": "c",
               "candidates": [{"name": "a", "checkpoint": "a", "source": True},
                              {"name": "b", "checkpoint": "b", "source": True},
                              {"name": "c", "checkpoint": "c"}], "verdict": verdict_block, **extra}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        return load_spec(tmp_path / "c.yaml")

    s, where = spec({})
    assert references(s, where) == References("a", ("b",), "source", 0.05, ())  # first source is the base
    with pytest.raises(MergeLabError, match=r"c.yaml, line \d+ \(verdict.base\): 'nobody' is not a candidate"):
        references(*spec({"base": "nobody"}))
    with pytest.raises(MergeLabError, match=r"line \d+ \(verdict.against.1\): 'zz' is not a candidate"):
        references(*spec({"against": ["a", "zz"]}))
    with pytest.raises(MergeLabError, match=r"verdict.against.0.*headline candidate itself"):
        references(*spec({"against": ["c"]}))
    with pytest.raises(MergeLabError, match=r"source models besides the base"):
        references(*spec({"base": "a", "sources": ["a"]}))
    with pytest.raises(MergeLabError, match=r"line \d+.*verdict.scale"):
        spec({"scale": "minmax"})
    with pytest.raises(MergeLabError, match=r"verdict.alpha"):
        spec({"alpha": 1.5})


def test_without_references_the_report_says_why_there_is_no_verdict():
    v = verdict({"headline_scores": {"error": "no headline scale: name a candidate `base`"}})
    assert v.lead == "No verdict: no headline scale: name a candidate `base`." and not v.table[1]
