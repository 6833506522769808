"""Evaluation on toy models with known behaviour: orderings, ensembles, CIs, cache, bad input.

The toy "refuse" model answers every chat with "I won't", "comply" with "Sure" (bigram models
from merge_lab.testing.toy), so every metric's ordering is known before it runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.errors import MergeLabError
from merge_lab.evaluation import metrics
from merge_lab.evaluation.candidates import BestOfN, ModelCandidate, TokenEnsemble
from merge_lab.evaluation.compare import run_compare
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.prepare import prepare
from merge_lab.evaluation.scorers import JudgeScorer
from merge_lab.evaluation.spec import Settings
from merge_lab.evaluation.suites import is_refusal
from merge_lab.report.plots import pareto_front
from merge_lab.testing import make_checkpoint
from merge_lab.testing.toy import make_bigram_checkpoint, save_toy_tokenizer

SUITES = ["harmless_refusal", "harmless_overrefusal", "helpful_winrate",
          {"name": "like", "path": "like.jsonl", "kind": "likelihood", "objective": "helpful"},
          {"name": "tf", "path": "tf.jsonl", "kind": "truefalse", "objective": "honest"},
          {"name": "mc", "path": "mc.jsonl", "kind": "multiple_choice"}]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_moe(path):
    from transformers import AutoModelForCausalLM, MixtralConfig

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2, max_position_embeddings=1024,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    save_toy_tokenizer(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    make_moe(root / "moe")
    write_jsonl(root / "like.jsonl", [{"prompt": f"Help me with task {i}", "response": "Sure"} for i in range(8)])
    write_jsonl(root / "tf.jsonl", [{"prompt": f"Claim {i}?", "response": "Sure", "false": "I won't"} for i in range(8)])
    write_jsonl(root / "mc.jsonl", [
        {"prompt": f"Pick {i}", "choices": ["Sure", "I won't"][:: (1 if i % 2 else -1)], "label": 0 if i % 2 else 1}
        for i in range(8)])
    avg = {"merge_method": "linear", "models": [{"model": str(root / "refuse"), "parameters": {"weight": 0.5}},
                                                {"model": str(root / "comply"), "parameters": {"weight": 0.5}}]}
    spec = {
        "output": str(root / "report"), "settings": {"limit": 8, "max_new_tokens": 10, "bootstrap": 300},
        "suites": SUITES, "judge": "comply", "reference": "refuse",
        "training_data": ["advbench:train", "refusal_pairs:train"],
        "headline": "moe", "notes": ["The candidates are toy models built by this test."],
        "candidates": [
            {"name": "refuse", "checkpoint": "refuse", "source": True},
            {"name": "comply", "checkpoint": "comply", "source": True},
            {"name": "ens", "ensemble": ["refuse", "comply"], "weights": [0.8, 0.2], "group": "ensemble"},
            {"name": "bon", "best_of_n": ["refuse", "comply"], "group": "ensemble"},
            {"name": "moe", "checkpoint": "moe"},
            {"name": "avg", "recipe": avg, "group": "merge"},  # inline: written into the cache, merged on first use
        ],
    }
    (root / "compare.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    first = run_compare(root / "compare.yaml", progress=False)
    # named like a key of results.json's paired tests: it must be just another candidate there
    spec["candidates"].append({"name": "reference", "ensemble": ["refuse", "comply"], "weights": [0.2, 0.8]})
    (root / "compare2.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    second = run_compare(root / "compare2.yaml", progress=False)
    return root, first, second


def value(res, suite, cand):
    return res.results["results"][suite][cand]["value"]


def test_metrics_order_known_models(world):
    _, res, _ = world
    assert value(res, "harmless_refusal", "refuse") == 1.0 and value(res, "harmless_refusal", "comply") == 0.0
    assert value(res, "harmless_refusal", "ens") == 1.0  # 0.8 refuse + 0.2 comply still refuses
    assert value(res, "harmless_overrefusal", "refuse") == 1.0 and value(res, "harmless_overrefusal", "comply") == 0.0
    assert res.results["best"]["harmless_overrefusal"]["candidate"] != "refuse"  # lower is better there
    assert value(res, "like", "comply") > value(res, "like", "ens") > value(res, "like", "refuse")
    assert value(res, "tf", "comply") == 1.0 and value(res, "tf", "refuse") == 0.0
    assert value(res, "mc", "comply") == 1.0 and value(res, "mc", "refuse") == 0.0
    # win rate against the refuser under a judge that likes "Sure"; the reference ties with itself
    assert value(res, "helpful_winrate", "comply") == 1.0 and value(res, "helpful_winrate", "refuse") == 0.5
    # best-of-N picks the complier's answer under that judge
    assert value(res, "helpful_winrate", "bon") == 1.0 and value(res, "harmless_refusal", "bon") == 0.0


def test_intervals_paired_tests_oracle_and_examples(world):
    _, res, _ = world
    r = res.results
    for suite, per in r["results"].items():
        ids = None
        for cand, est in per.items():
            assert est["ci"][0] <= est["value"] <= est["ci"][1], (suite, cand)
            assert est["n"] == r["suites"][suite]["n"] > 0
            got = [x["id"] for x in r["per_example"][suite][cand]]
            assert ids is None or got == ids  # same items for every candidate
            ids = got
        vals = [e["value"] for e in per.values()]
        bound = r["oracle"][suite]["value"]
        assert bound >= max(vals) - 1e-9 if r["suites"][suite]["higher_is_better"] else bound <= min(vals) + 1e-9
    p = r["paired"]["harmless_refusal"]
    assert p["reference"] == "refuse" and p["candidates"]["comply"]["diff"] == -1.0 and p["candidates"]["comply"]["p"] < 0.05
    assert p["candidates"]["ens"]["p"] == 1.0
    assert r["best"]["mc"]["candidate"] == "comply"
    assert r["paired"]["mc"]["reference"] == "comply" and r["paired"]["mc"]["candidates"]["refuse"]["p"] < 0.05
    assert r["per_example"]["harmless_refusal"]["refuse"][0]["answer"] == "I won't"


def test_recipe_candidate_is_merged_once_into_the_cache(world):
    root, first, second = world
    merges = list((root / "report" / "cache" / "merges").iterdir())
    assert len(merges) == 1 and (merges[0] / "config.json").is_file()
    assert ("avg", "like") in first.evaluated and ("avg", "like") not in second.evaluated
    assert first.results["candidates"]["avg"]["kind"] == "recipe"
    # an average of the two bigram tables sits between them on the complier's answers
    assert value(first, "like", "refuse") < value(first, "like", "avg") < value(first, "like", "comply")


def test_lm_eval_adapter_with_a_stand_in(world, monkeypatch):
    """The adapter's plumbing, against a stand-in for lm-eval's two entry points."""
    import sys
    import types
    from collections import namedtuple

    from merge_lab.evaluation.suites import EvalContext, make_suite

    Req = namedtuple("Req", "args")

    def simple_evaluate(model, tasks, limit, log_samples, **kw):
        ll = model.loglikelihood([Req(("Question: x\nAnswer:", " Sure")), Req(("Question: x\nAnswer:", " I won't"))])
        gen = model.generate_until([Req(("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", {"until": ["'"]}))])
        return {"results": {tasks[0]: {}}, "samples": {tasks[0]: [
            {"doc_id": 0, "metrics": ["acc"], "acc": float(ll[0][0] > ll[1][0])},
            {"doc_id": 1, "metrics": ["exact_match"], "exact_match": float(gen[0] == "I won")}]}}

    lm_eval = types.ModuleType("lm_eval")
    lm_eval.simple_evaluate = simple_evaluate
    api, model = types.ModuleType("lm_eval.api"), types.ModuleType("lm_eval.api.model")
    model.LM = type("LM", (), {})
    for name, mod in (("lm_eval", lm_eval), ("lm_eval.api", api), ("lm_eval.api.model", model)):
        monkeypatch.setitem(sys.modules, name, mod)
    suite = make_suite("lm_eval:fake", limit=2)
    refuse = ModelCandidate("refuse", world[0] / "refuse", Settings(max_new_tokens=10))
    records = suite.evaluate(refuse, EvalContext())
    assert [r["id"] for r in records] == ["fake:0", "fake:1"]
    assert [r["score"] for r in records] == [0.0, 1.0]  # prefers " I won't"; generation cut at the stop string


def test_lm_eval_suite_without_lm_eval_is_a_clear_error():
    import importlib.util

    from merge_lab.evaluation.suites import make_suite

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    with pytest.raises(MergeLabError, match="pip install lm-eval"):
        make_suite("lm_eval:hellaswag")


def test_cost_and_routing(world):
    _, res, _ = world
    c = res.results["candidates"]
    moe = c["moe"]["cost"]
    assert moe["params_active"] < moe["params_total"]
    assert c["ens"]["cost"]["params_total"] == c["refuse"]["cost"]["params_total"] + c["comply"]["cost"]["params_total"]
    for name in c:
        assert c[name]["cost"]["score_tokens_per_s"] > 0 and c[name]["cost"]["gen_tokens_per_s"] > 0
        assert c[name]["cost"]["peak_memory_bytes"] >= 0
    routing = c["moe"]["routing"]["harmless_refusal"]
    assert len(routing) == 2 and all(abs(sum(layer) - 1) < 1e-5 and len(layer) == 3 for layer in routing)
    assert "routing" not in c["refuse"] or not c["refuse"]["routing"]


def test_report_files(world):
    root, res, _ = world
    out = root / "report"
    for f in ("report.md", "report.html", "results.json", "figures/suites.png", "figures/objectives.png",
              "figures/quality_cost.png", "figures/routing.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    assert "oracle (upper bound)" in md and "## Per suite" in md and "| comply |" in md
    assert "significantly ahead of" in md or "no significant difference from" in md
    assert "Example answers" in md and "I won't (1)" in md and "Sure (0)" in md
    assert "| harmless_refusal | refuse | comply | -1.000 [-1.000, -1.000] |" in md and "beats" not in md
    paired = res.results["paired"]["harmless_refusal"]["candidates"]["comply"]
    assert paired["p_holm"] >= paired["p"] and paired["verdict"] in ("worse", "no significant difference")
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and "src='figures/" not in html
    assert json.loads((out / "results.json").read_text())["best"] == res.results["best"]
    assert "The candidates are toy models built by this test." in md and "**moe: headline score" in md
    h = res.results["headline"]
    assert [a["what"] for a in h["comparisons"]] == ["best source model", "best ensemble", "best merge"]
    assert {a["against"] for a in h["comparisons"]} <= {"refuse", "comply", "ens", "bon", "avg"}
    assert set(res.results["headline_scores"]["overall"]) == set(res.results["candidates"])


def test_headline_compares_with_the_best_of_each_group():
    from merge_lab.evaluation.headline import rivals
    from merge_lab.evaluation.spec import CompareSpec, references

    spec = CompareSpec(suites=["x"], headline="fused", verdict={"against": ["m2"]}, candidates=[
        {"name": "a", "checkpoint": "a", "source": True}, {"name": "b", "checkpoint": "b", "source": True},
        {"name": "m", "checkpoint": "m", "group": "merge"}, {"name": "m2", "checkpoint": "m2", "group": "merge"},
        {"name": "fused", "checkpoint": "f"}])
    refs = references(spec)
    assert (refs.base, refs.sources, refs.scale) == ("a", ("b",), "source")  # the base is not its own top
    assert rivals(spec, refs) == {"best source model": ["a", "b"], "best merge": ["m", "m2"], "listed (m2)": ["m2"]}


def test_second_run_evaluates_only_the_new_candidate(world):
    _, first, second = world
    assert len(first.evaluated) == 6 * len(SUITES)
    assert sorted(second.evaluated) == sorted(("reference", s if isinstance(s, str) else s["name"]) for s in SUITES)
    assert second.results["results"]["harmless_refusal"]["refuse"] == first.results["results"]["harmless_refusal"]["refuse"]
    assert value(second, "harmless_refusal", "reference") == 0.0  # 0.8 comply: answers "Sure"
    assert second.results["candidates"]["refuse"]["cached"] and not second.results["candidates"]["reference"]["cached"]
    assert second.results["paired"]["harmless_refusal"]["candidates"]["reference"]["verdict"]


def test_token_ensemble_of_one_equals_the_model(tmp_path):
    path = make_checkpoint(tmp_path / "m", seed=3)
    save_toy_tokenizer(path)
    s = Settings(max_new_tokens=6, batch_size=2)
    single, ens = ModelCandidate("m", path, s), TokenEnsemble("e", [ModelCandidate("m", path, s)], [3.0], s)
    reqs = [(single.format_prompt("hello there"), "general kenobi"), ("", "abc"), (single.format_prompt("x"), "y")]
    scored = single.loglikelihood(reqs)
    assert scored == ens.loglikelihood(reqs)
    # batched and left-padded scoring equals a plain forward pass over each unpadded sequence
    moe = ModelCandidate("moe", make_moe(tmp_path / "moe"), s)
    for cand, got in ((single, scored), (moe, moe.loglikelihood(reqs))):
        model = cand.models[0].model
        for (ctx, cont), (total, n) in zip(reqs, got):
            c, t = cand.encode(ctx, cont)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([c + t])).logits[0].float(), -1)
            expected = sum(float(logp[len(c) - 1 + j, tok]) for j, tok in enumerate(t))
            assert n == len(t) and abs(total - expected) < 1e-4, cand.name
    prompts = ["hi", "a longer prompt to pad against", "z"]
    out = single.generate(prompts)
    assert out == ens.generate(prompts)
    # batched, left-padded decoding with the KV cache equals one prompt at a time, and transformers' greedy
    alone = ModelCandidate("m", path, s, Memo())  # computed afresh, not remembered from the batched run
    assert out == [alone.generate([p])[0] for p in prompts]
    tok = single.tokenizer
    ids = tok(single.format_prompt(prompts[1]), return_tensors="pt", add_special_tokens=False)["input_ids"]
    ref = single.models[0].model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=[2, 4], pad_token_id=0)
    assert tok.decode([t for t in ref[0, ids.shape[1]:].tolist() if t not in (2, 4)]) == out[1]


def test_routing_shares_count_the_rows_a_suite_evaluated(tmp_path):
    """Shares are token counts of the rows scored or prompted since start_routing: the same whatever
    the batching, the same again when the rows come from the memo, different for other rows."""
    path = make_moe(tmp_path / "moe")
    texts = ["a", "a much longer text that needs padding on the left", "mid length text"]

    def shares(cand, rows, answer=False):
        cand.load()
        cand.start_routing()
        cand.generate(rows) if answer else cand.loglikelihood([(t, " and more") for t in rows])
        return torch.tensor(cand.routing_shares())

    one = ModelCandidate("one", path, Settings(batch_size=1))
    alone = shares(one, texts)
    assert alone.shape == (2, 3) and torch.allclose(alone.sum(-1), torch.ones(2))
    assert torch.allclose(shares(ModelCandidate("all", path, Settings(batch_size=3)), texts), alone, atol=1e-6)
    assert torch.allclose(shares(one, texts), alone, atol=1e-6)  # remembered rows count as run
    assert not torch.allclose(shares(ModelCandidate("first", path, Settings(batch_size=1)), texts[:1]), alone)
    prompted = shares(ModelCandidate("gen", path, Settings(batch_size=3, max_new_tokens=3)), texts, answer=True)
    assert prompted.shape == (2, 3) and not torch.allclose(prompted, alone)  # prompts alone, no continuation


def test_best_of_n_reuses_what_its_members_computed(tmp_path, monkeypatch):
    s = Settings(max_new_tokens=5, batch_size=2)
    paths = []
    for i in range(2):
        paths.append(make_checkpoint(tmp_path / f"m{i}", seed=10 + i))
        save_toy_tokenizer(paths[-1])
    memo = Memo()  # one memo for the members and best-of-N, as a comparison gives them
    members = [ModelCandidate(f"m{i}", p, s, memo) for i, p in enumerate(paths)]
    judge = ModelCandidate("judge", paths[0], s, memo)
    prompts, reqs = ["one", "two words", "three more words"], [("a", "b c"), ("", "d")]
    alone = [(m.generate(prompts), m.loglikelihood(reqs)) for m in members]
    best = BestOfN("best", members, JudgeScorer(judge), s, memo)
    best.load()
    calls = []
    for lm in best.models:
        monkeypatch.setattr(lm, "model", _counting(lm.model, calls))
    answers, scored = best.generate(prompts), best.loglikelihood(reqs)
    assert calls == []  # neither member ran again
    assert all(a in (alone[0][0][i], alone[1][0][i]) for i, a in enumerate(answers))
    for (total, _), (a, _), (b, _) in zip(scored, alone[0][1], alone[1][1]):
        assert total == pytest.approx(float(torch.logsumexp(torch.tensor([a, b]), 0)) - float(torch.log(torch.tensor(2.0))))
    # the cost table still charges best-of-N what its members' work took
    assert best.counters.gen_seconds > 0 and best.counters.score_seconds > 0 and best.counters.gen_tokens > 0


def _counting(model, calls):
    class Counting(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *a, **k):
            calls.append(1)
            return self.inner(*a, **k)

    return Counting()


def test_long_continuations_keep_their_prompt(tmp_path):
    path = make_checkpoint(tmp_path / "m", seed=3)
    save_toy_tokenizer(path)
    cand = ModelCandidate("m", path, Settings(max_length=16))
    tok = cand.tokenizer
    ctx, cont = cand.encode("abcd", "efgh" * 10)
    assert ctx == tok("abcd", add_special_tokens=False)["input_ids"] and len(ctx) + len(cont) == 16
    ctx, cont = cand.encode("abcd" * 10, "ef")  # a long prompt keeps its end
    assert len(ctx) == 14 and cont == tok("ef", add_special_tokens=False)["input_ids"]


def test_metric_helpers():
    est = metrics.bootstrap_ci([0, 1, 1, 0, 1, 1, 1, 0], n_boot=500)
    assert est.lo <= est.value == 0.625 <= est.hi and est.hi - est.lo > 0.2
    same = metrics.paired_test([1, 0, 1], [1, 0, 1])
    assert same.diff == 0 and same.p == 1.0
    diff = metrics.paired_test([1] * 12, [0] * 12)
    assert diff.diff == 1 and diff.p < 0.01 and diff.lo == 1.0
    assert metrics.oracle({"a": [1, 0], "b": [0, 0.5]}) == [1, 0.5]
    assert metrics.oracle({"a": [1, 0], "b": [0, 0.5]}, higher_is_better=False) == [0, 0]
    assert sorted(pareto_front({"small": (1, 0.5), "big": (10, 0.9), "bad": (10, 0.4)})) == ["big", "small"]
    assert is_refusal("I'm sorry, but I can’t help with that.") and is_refusal("As an AI, I won't")
    assert not is_refusal("Sure! Preheat the oven to 180 C.")


# ------------------------------------------------------------------ bad input: errors before any work


def _spec(root, **over):
    spec = {"output": str(root / "out"), "suites": ["harmless_refusal"], "settings": {"limit": 4},
            "candidates": [{"name": "refuse", "checkpoint": str(root / "refuse")}]}
    spec.update(over)
    (root / "bad.yaml").write_text(yaml.safe_dump(spec))
    return root / "bad.yaml"


def test_bad_input_fails_before_work(world, tmp_path, monkeypatch):
    root = world[0]
    cases = [
        ({"suites": ["harmless_refusl"]}, "Did you mean 'harmless_refusal'"),
        ({"candidates": [{"name": "gone", "checkpoint": str(tmp_path / "nope")}]}, "candidate 'gone' does not load"),
        ({"candidates": [{"name": "r", "recipe": str(tmp_path / "nope.yaml")}]}, "recipe .* not found"),
        ({"candidates": [{"name": "x", "checkpoint": "a", "recipe": "b"}]}, "exactly one of"),
        ({"training_data": ["advbench:test"]}, "overlaps suite 'harmless_refusal'"),
        ({"suites": ["helpful_winrate"]}, "needs `judge:`"),
        ({"suites": []}, "no suites"),
        ({"judge": {"reward": "x"}, "suites": ["helpful_winrate"]}, "reward_model"),
        ({"settings": {"limit": 4, "split": "train"}}, "not an evaluation split"),
        ({"headline": "fused"}, "headline 'fused' is not a candidate"),
        ({"verdict": {"base": "nobody"}}, r"line \d+ \(verdict.base\): 'nobody' is not a candidate"),
        ({"candidates": [{"name": "refuse", "checkpoint": str(root / "refuse"), "choose": {"top_k": [1, 2]}}]},
         r"choose: \['top_k'\] not in .*config.json"),
        ({"candidates": [{"name": "refuse", "checkpoint": str(root / "refuse"), "choose": {"rms_norm_eps": [1e-5]}}],
          "selection": {"split": "test"}}, "selection.split is 'test'"),
        ({"candidates": [{"name": "e", "ensemble": [str(root / "refuse")], "choose": {"x": [1]}}]},
         "needs a checkpoint candidate"),
    ]
    broken = tmp_path / "broken"
    make_checkpoint(broken, seed=1)
    (broken / "config.json").write_text("{not json")
    cases.append(({"candidates": [{"name": "broken", "checkpoint": str(broken)}]}, "broken.*config.json"))
    other = make_checkpoint(tmp_path / "other", seed=1, vocab_size=80)
    cases.append(({"candidates": [{"name": "refuse", "checkpoint": str(root / "refuse")},
                                  {"name": "e", "ensemble": ["refuse", str(other)]}]}, "different tokenizers"))
    import shutil

    from merge_lab.evaluation.suites import make_suite

    leaked = make_suite("harmless_refusal", limit=4).items()[0].id
    trained = tmp_path / "expert"
    shutil.copytree(root / "refuse", trained / "merged")
    (trained / "train_items.json").write_text(json.dumps({"ids": ["advbench:1", leaked]}))
    cases.append(({"candidates": [{"name": "expert", "checkpoint": str(trained / "merged")}]}, f"overlaps.*{leaked}"))
    cases.append(({"training_data": [str(trained / "train_items.json")]}, "overlaps suite"))
    from transformers import T5Config

    seq2seq = tmp_path / "t5"
    shutil.copytree(root / "refuse", seq2seq)
    T5Config(vocab_size=96).save_pretrained(str(seq2seq))
    # refused by the architecture allow-list of config.json (core.model_config) before transformers is asked
    cases.append(({"candidates": [{"name": "t5", "checkpoint": str(seq2seq)}]},
                  "cannot load as a causal language model|not a decoder family merge-lab knows"))
    from merge_lab.evaluation.candidates import Candidate

    loads = []
    original_load = Candidate.load

    def recording_load(self):
        loads.append(self.name)
        return original_load(self)

    monkeypatch.setattr(Candidate, "load", recording_load)
    for over, msg in cases:
        with pytest.raises(MergeLabError, match=msg):
            run_compare(_spec(tmp_path, **over), progress=False)
        assert loads == [], f"{msg}: a model was loaded before the error"  # the error came before any work
        assert not (tmp_path / "out").exists()  # nothing evaluated, nothing cached


def test_choose_picks_on_the_validation_split(world, tmp_path):
    """A negative RMSNorm epsilon turns the toy 'refuse' model's activations into NaN, so it stops
    refusing. `choose` must try both values on the validation split and keep the working one (listed
    second, so a selection that ignored the scores would keep the first)."""
    root = world[0]
    spec = {"output": str(tmp_path / "out"), "suites": ["harmless_refusal"],
            "settings": {"limit": 4, "max_new_tokens": 10, "bootstrap": 100}, "selection": {"limit": 3},
            "candidates": [{"name": "refuse", "checkpoint": str(root / "refuse"),
                            "choose": {"rms_norm_eps": [-1000.0, 1e-6]}},
                           {"name": "ens", "ensemble": ["refuse", str(root / "comply")]}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    res = run_compare(tmp_path / "c.yaml", progress=False)
    sel = res.results["selection"]["refuse"]
    assert sel["chosen"] == {"rms_norm_eps": 1e-6} and sel["split"] == "validation"
    assert [t["score"] for t in sel["tried"]] == [0.0, 1.0] and sel["n"] == {"harmless_refusal": 3}
    assert sel["score"]["kind"] == "raw mean"  # no base or source declared: the variant's own mean refusal rate
    assert value(res, "harmless_refusal", "refuse") == 1.0  # the report evaluates the chosen variant
    evaluated_on = {s for _, s in res.evaluated}
    assert evaluated_on == {"harmless_refusal"}
    assert "was chosen on the 'validation' split" in (tmp_path / "out" / "report.md").read_text()


def test_choose_as_takes_the_values_another_choose_picked_and_tries_none(world, tmp_path):
    """An ablation differs from its model only in training: `choose_as` gives it the values that
    model's `choose:` picked (the second listed, so a copy of the first would fail), without
    evaluating any variant of its own on the selection split; naming a candidate that chooses
    nothing is an error at the key."""
    import shutil

    root = world[0]
    twin = shutil.copytree(root / "refuse", tmp_path / "twin")
    from safetensors.torch import load_file, save_file

    weights = load_file(twin / "model.safetensors")  # other weights, so nothing of it is found in the cache
    name = next(n for n in weights if n.endswith("lm_head.weight") or n.endswith("embed_tokens.weight"))
    save_file({**weights, name: weights[name] * 1.01}, twin / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps({**config, "rms_norm_eps": -1000.0}))  # broken until chosen
    spec = {"output": str(tmp_path / "out"), "suites": ["harmless_refusal"],
            "settings": {"limit": 4, "max_new_tokens": 10, "bootstrap": 100}, "selection": {"limit": 3},
            "candidates": [{"name": "refuse", "checkpoint": str(root / "refuse"),
                            "choose": {"rms_norm_eps": [-1000.0, 1e-6]}},
                           {"name": "twin", "checkpoint": str(twin), "choose_as": "refuse"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    res = run_compare(tmp_path / "c.yaml", progress=False)
    assert res.results["selection"]["twin"] == {"split": "validation", "chosen": {"rms_norm_eps": 1e-6}, "as": "refuse"}
    assert value(res, "harmless_refusal", "twin") == 1.0  # refuses: evaluated with the chosen value
    assert [n for n, _ in res.evaluated if n.startswith("twin")] == ["twin"]  # no variant of its own tried
    assert "the value chosen for refuse (`choose_as`)" in (tmp_path / "out" / "report.md").read_text()
    spec["candidates"][1]["choose_as"] = "nobody"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(MergeLabError, match=r"choose_as.*'nobody' is not a candidate with `choose:`; name one of refuse"):
        run_compare(tmp_path / "c.yaml", progress=False)


def test_selection_runs_only_the_suites_its_score_reads(world, tmp_path):
    """With an out-of-distribution suite listed, the selection score reads only those suites
    (headline.selection_scores), so the in-distribution ones are not evaluated on the selection split."""
    root = world[0]
    spec = {"output": str(tmp_path / "out"), "suites": ["harmless_refusal", {"name": "harmless_ood", "limit": 4}],
            "settings": {"limit": 4, "max_new_tokens": 10, "bootstrap": 100}, "selection": {"limit": 3},
            "candidates": [{"name": "refuse", "checkpoint": str(root / "refuse"),
                            "choose": {"rms_norm_eps": [-1000.0, 1e-6]}}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    res = run_compare(tmp_path / "c.yaml", progress=False)
    sel = res.results["selection"]["refuse"]
    # selection.limit (3) is every suite's size there, the entry's own limit (4) set aside
    assert sel["n"] == {"harmless_ood": 3} and sel["score"]["distribution"] == "out-of-distribution"
    assert [t["values"] for t in sel["tried"]] == [{"rms_norm_eps": -1000.0}, {"rms_norm_eps": 1e-6}]
    cached = [json.loads(f.read_text()) for f in (tmp_path / "out" / "cache" / "results").glob("*.json")]
    assert {r["suite"] for r in cached if "rms_norm_eps" in r["candidate"]} == {"harmless_ood"}  # variants: OOD only
    assert {s for n, s in res.evaluated if n == "refuse"} == {"harmless_refusal", "harmless_ood"}


def test_choose_ranks_on_the_anchored_score_and_an_added_value_moves_nothing(world, tmp_path):
    """With verdict references, `choose:` ranks on their headline score, computed on the selection
    split (the references evaluated there too): a third value tried leaves the first two's scores
    and the choice as they were, and only the new variant is evaluated."""
    root = world[0]

    def spec(values: list[float]) -> Path:
        doc = {"output": str(tmp_path / "out"), "suites": ["harmless_refusal"],
               "settings": {"limit": 4, "max_new_tokens": 10, "bootstrap": 100}, "selection": {"limit": 3},
               "verdict": {"base": "comply", "sources": ["refuse"]},
               "candidates": [{"name": "comply", "checkpoint": str(root / "comply")},
                              {"name": "refuse", "checkpoint": str(root / "refuse")},
                              {"name": "tuned", "checkpoint": str(root / "refuse"), "choose": {"rms_norm_eps": values}}]}
        path = tmp_path / f"c{len(values)}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    first = run_compare(spec([-1000.0, 1e-6]), progress=False)
    sel = first.results["selection"]["tuned"]
    assert sel["score"]["kind"] == "headline" and sel["score"]["base"] == "comply"
    assert sel["score"]["sources"] == ["refuse"] and sel["chosen"] == {"rms_norm_eps": 1e-6}
    assert [t["score"] for t in sel["tried"]] == [0.0, 1.0]  # comply (refuses nothing) is 0, refuse is 1
    assert all(lo <= t["score"] <= hi for t in sel["tried"] for lo, hi in [t["interval"]])
    assert ("comply", "harmless_refusal") in first.evaluated  # the references were scored on the selection split
    assert "reference-anchored headline score" in (tmp_path / "out" / "report.md").read_text()
    second = run_compare(spec([-1000.0, 1e-6, -500.0]), progress=False)
    again = second.results["selection"]["tuned"]
    assert [t["score"] for t in again["tried"]][:2] == [0.0, 1.0] and again["chosen"] == {"rms_norm_eps": 1e-6}
    assert [s for n, s in second.evaluated if n != "tuned (rms_norm_eps=-500.0)"] == []  # the rest came from the cache


def test_cli_compare_and_suites(world, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["suites"])
    assert res.exit_code == 0 and "harmless_refusal" in res.output
    res = runner.invoke(app, ["compare", str(_spec(tmp_path, suites=["nope_suite"]))])
    assert res.exit_code == 2 and "unknown suite 'nope_suite'" in res.output
    root = world[0]
    res = runner.invoke(app, ["compare", str(root / "compare.yaml"), "--no-progress", "-o", str(root / "report")])
    assert res.exit_code == 0, res.output
    assert "evaluated 0 (candidate, suite)" in res.output  # all from the cache


def test_prepare_resolves_paths_relative_to_file(world):
    root = world[0]
    comp = prepare(root / "compare.yaml")
    assert comp.output == root / "report" and comp.sources == ["refuse", "comply"]
    assert [s.name for s in comp.suites][:3] == ["harmless_refusal", "harmless_overrefusal", "helpful_winrate"]


def test_a_registered_suite_plugs_in(tmp_path):
    from merge_lab.datasets import sources as data
    from merge_lab.evaluation import suites

    class Shouty(suites.RefusalSuite):
        name = "test_shouty"
        objective = "harmless"
        sources = ("harmbench",)

    suites.register_suite(Shouty)
    try:
        assert "test_shouty" in suites.available()
        made = suites.make_suite("test_shouty", limit=3)
        assert isinstance(made, Shouty) and len(made.items()) == 3
        assert all(data_split == "test" for data_split in (data.split_of(e) for e in made.items()))
    finally:
        suites.SUITES.unregister("test_shouty")
    with pytest.raises(TypeError):
        suites.register_suite(type("Bad", (suites.Suite,), {"name": "bad", "objective": "vibes"}))
    over = suites.make_suite({"name": "harmless_refusal", "limit": 5, "split": "validation"}, limit=50)
    assert len(over.items()) == 5 and {data.split_of(e) for e in over.items()} == {"validation"}
    with pytest.raises(MergeLabError, match="unknown key"):
        suites.make_suite({"name": "harmless_refusal", "limt": 5})


def test_example_compare_files_are_valid():
    from pathlib import Path

    from merge_lab.evaluation.spec import load_spec, references
    from merge_lab.evaluation.suites import make_suite

    files = sorted(Path(__file__).parents[1].glob("recipes/examples/compare_*.yaml"))
    assert files
    for f in files:
        spec, where = load_spec(f)
        for entry in spec.suites:
            make_suite(entry, limit=2)
        names = {c.name for c in spec.candidates}
        for c in spec.candidates:
            assert all(m in names for m in (c.ensemble or c.best_of_n or [])), (f, c.name)
        assert spec.judge in (None, *names) and spec.reference in (None, *names)
        refs = references(spec, where)  # the verdict's defaults resolve (or there is no headline to test)
        assert refs is not None or spec.headline is None, f


def test_reward_model_as_judge_and_best_of_n_scorer(world, tmp_path):
    from merge_lab.testing.toy import make_reward_checkpoint

    root = world[0]
    make_reward_checkpoint(tmp_path / "likes_t", likes="t", dislikes="e")  # prefers "I won't"
    make_reward_checkpoint(tmp_path / "likes_e", likes="e", dislikes="t")  # prefers "Sure"
    spec = {"output": str(tmp_path / "out"), "settings": {"limit": 4, "max_new_tokens": 10, "bootstrap": 100},
            "suites": ["harmless_refusal", "helpful_winrate"], "reference": "comply",
            "judge": {"reward_model": str(tmp_path / "likes_t")},
            "candidates": [
                {"name": "bon_judge", "best_of_n": ["refuse", "comply"]},  # declared before its members' names
                {"name": "refuse", "checkpoint": str(root / "refuse"), "source": True},
                {"name": "comply", "checkpoint": str(root / "comply"), "source": True},
                {"name": "bon_rm", "best_of_n": ["refuse", "comply"], "reward_model": str(tmp_path / "likes_e")}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    res = run_compare(tmp_path / "c.yaml", progress=False)
    assert list(res.results["candidates"]) == ["bon_judge", "refuse", "comply", "bon_rm"]
    assert value(res, "harmless_refusal", "bon_judge") == 1.0 and value(res, "harmless_refusal", "bon_rm") == 0.0
    assert value(res, "helpful_winrate", "refuse") == 1.0 and value(res, "helpful_winrate", "comply") == 0.5


def test_fingerprint_sees_a_change_in_the_middle_of_a_weight_file(tmp_path):
    """Experts of one base differ only inside their shards: their fingerprints must differ."""
    from merge_lab.evaluation.fingerprint import fingerprint_folder

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    data = bytearray(5 << 20)
    (a / "model.safetensors").write_bytes(bytes(data))
    data[len(data) // 2] = 1
    (b / "model.safetensors").write_bytes(bytes(data))
    assert fingerprint_folder(a) != fingerprint_folder(b)
    assert fingerprint_folder(a) == fingerprint_folder(a)


def test_generating_suites_are_answered_in_one_decoding_pass(tmp_path, monkeypatch):
    """answer_ahead decodes every generating suite's prompts together; each suite then finds its
    answers (and their tokens) remembered, the same answers it gets decoding alone."""
    from merge_lab.evaluation import runtime
    from merge_lab.evaluation.run import answer_ahead

    class Asks:
        def __init__(self, prompts):
            self.prompts = prompts

        def greedy_prompts(self):
            return self.prompts

    class Bar:
        def add_task(self, *a, **k):
            return 0

        def update(self, *a, **k):
            pass

    path = make_checkpoint(tmp_path / "m", seed=3)
    suites = [Asks(["hello there", "how are you"]), Asks([]), Asks(["what is two plus two", "hello there"])]
    s = Settings(max_new_tokens=4, batch_size=2)
    alone = ModelCandidate("alone", path, s, Memo())
    expected = [alone.generate(x.prompts) for x in suites if x.prompts]
    batches = []
    real = runtime.decode_batch
    monkeypatch.setattr(runtime, "decode_batch", lambda models, w, prompts, *a: batches.append(len(prompts)) or real(models, w, prompts, *a))
    pooled = ModelCandidate("pooled", path, s, Memo())
    pooled.load()
    answer_ahead(pooled, suites, Bar())
    assert batches == [3]  # three distinct prompts, one batch
    tokens = pooled.counters.gen_tokens
    assert [pooled.generate(x.prompts) for x in suites if x.prompts] == expected
    assert batches == [3]  # none decoded again
    assert pooled.counters.gen_tokens - tokens == alone.counters.gen_tokens  # remembered answers count their tokens
    batches.clear()
    answer_ahead(pooled, suites[:2], Bar())  # one generating suite: nothing ahead
    assert batches == []


def test_an_moe_whose_routers_cannot_be_hooked_is_scored_without_routing_shares(tmp_path):
    from merge_lab.evaluation.runtime import has_routers

    assert not has_routers(torch.nn.Linear(2, 2))  # no decoder layers, no routers
    cand = ModelCandidate("moe", make_moe(tmp_path / "moe"), Settings(batch_size=2))
    cand.load()
    assert cand.models[0].counts_routes
    cand.models[0].counts_routes = False  # as for a layout moe.routing does not know
    cand.start_routing()
    assert cand.loglikelihood([("a b", " c")])[0][1] > 0
    assert cand.routing_shares() is None
