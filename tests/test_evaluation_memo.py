"""What models computed lives in a Memo owned by the comparison: two comparisons share nothing
unless they are given the same one."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from merge_lab.evaluation import runtime
from merge_lab.evaluation.candidates import ModelCandidate, TokenEnsemble
from merge_lab.evaluation.compare import run_compare
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.prepare import prepare
from merge_lab.evaluation.spec import Settings
from merge_lab.testing.toy import make_bigram_checkpoint


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    (root / "like.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": "Sure"}) + "\n" for i in range(3)))
    spec = {"settings": {"limit": 3, "max_new_tokens": 4, "bootstrap": 20},
            "suites": [{"name": "like", "path": str(root / "like.jsonl"), "kind": "likelihood"}],
            "candidates": [{"name": "refuse", "checkpoint": str(root / "refuse")},
                           {"name": "ens", "ensemble": ["refuse", str(root / "comply")]}]}
    (root / "c.yaml").write_text(yaml.safe_dump(spec))
    return root


@pytest.fixture
def forwards(monkeypatch):
    """Counts the model forward passes that score continuations."""
    calls = []
    real = runtime.LoadedModel.rows

    def counting(self, batch, pad_id):
        calls.append(len(batch))
        return real(self, batch, pad_id)

    monkeypatch.setattr(runtime.LoadedModel, "rows", counting)
    return calls


def test_two_comparisons_with_separate_memos_share_no_scores(toy, tmp_path, forwards):
    torch.set_num_threads(1)
    first, second = Memo(), Memo()
    a = run_compare(toy / "c.yaml", tmp_path / "a", progress=False, memo=first)
    ran_first = len(forwards)
    assert ran_first > 0 and first.scores and not second.scores
    b = run_compare(toy / "c.yaml", tmp_path / "b", progress=False, memo=second)  # another cache: evaluated again
    assert len(forwards) == 2 * ran_first  # nothing reused from the first comparison's memo
    assert set(second.scores) == set(first.scores) and second.scores is not first.scores
    assert a.results["results"] == b.results["results"]
    # first run: the single model's one batch (3 items); the ensemble's member `comply`, new, once;
    # then both members again on the rows, since the toy bigram models' next-token rows are full of
    # exact ties, where the mixture's greedy flag needs the rows (mixture.py; a trained model's are not)
    assert ran_first == 1 + 1 + 2
    # the same memo handed to a third comparison: only the ensemble's tied items run again
    forwards.clear()
    run_compare(toy / "c.yaml", tmp_path / "c", progress=False, memo=first)
    assert len(forwards) == 2


def test_prepare_gives_every_candidate_the_comparisons_memo(toy):
    memo = Memo()
    comp = prepare(toy / "c.yaml", memo=memo)
    assert comp.memo is memo
    assert all(c.memo is memo for c in comp.candidates.values())
    assert all(m.memo is memo for m in comp.candidates["ens"].members)
    other = prepare(toy / "c.yaml")
    assert other.memo is not memo and all(c.memo is other.memo for c in other.candidates.values())


def test_a_variant_replaces_its_candidate_everywhere(toy, tmp_path):
    comp = prepare(toy / "c.yaml")
    comp.ctx.reference = comp.candidates["refuse"]
    old = comp.candidates["refuse"]
    new = old.variant({"rms_norm_eps": 1e-5}, tmp_path)
    assert json.loads((new.path / "config.json").read_text())["rms_norm_eps"] == 1e-5
    assert (new.path / "model.safetensors").resolve() == (old.path / "model.safetensors").resolve()
    assert new.fingerprint() != old.fingerprint() and new.memo is old.memo
    ens = comp.candidates["ens"]
    comp.replace(old, new)
    assert comp.candidates["refuse"] is new and comp.ctx.reference is new
    assert comp.candidates["ens"] is not ens and comp.candidates["ens"].members[0] is new
    assert comp.candidates["ens"].members[1] is ens.members[1] and comp.candidates["ens"].weights == ens.weights
    assert ens.members[0] is old  # the original ensemble is left as it was


def test_a_candidate_without_a_memo_has_its_own(toy):
    s = Settings(max_new_tokens=3)
    a, b = ModelCandidate("a", toy / "refuse", s), ModelCandidate("b", toy / "refuse", s)
    assert a.memo is not b.memo
    a.loglikelihood([("x", "Sure")])
    assert a.memo.scores and not b.memo.scores
    assert TokenEnsemble("e", [a, b], None, s).memo is a.memo  # a composite uses its first member's
