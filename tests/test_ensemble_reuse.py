"""A token ensemble scores from what its members' own scoring left in the memo (mixture.py): no
member runs again, and the scores and greedy flags equal those computed from the full rows."""

from __future__ import annotations

import pytest
import torch

from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.mixture import mixed_from_summaries, summarize
from merge_lab.evaluation.runtime import LoadedModel, greedy_decode, mix, mixed_scores, scored
from merge_lab.testing import make_checkpoint
from merge_lab.testing.toy import save_toy_tokenizer
from merge_lab.training import chat

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summaries_agree_with_the_rows_or_say_they_cannot_tell():
    """Random peaked distributions over a small vocabulary: wherever the bounds decide, score and
    greedy flag equal runtime.scored(runtime.mix(rows)); exact ties are left to the rows."""
    gen = torch.Generator().manual_seed(0)
    decided = flags = 0
    for trial in range(300):
        members, n, vocab = 1 + trial % 3, 1 + trial % 4, 30
        rows = [torch.log_softmax(3 * torch.randn(n, vocab, generator=gen), -1) for _ in range(members)]
        lw = torch.log(torch.softmax(torch.randn(members, generator=gen), 0))
        mixed = mix(rows, lw)
        # half the continuations are the mixture's greedy tokens, half random ones
        cont = (mixed.argmax(-1) if trial % 2 else torch.randint(vocab, (n,), generator=gen)).tolist()
        got = mixed_from_summaries([summarize(r, cont) for r in rows], lw, cont)
        want = scored(mixed, cont)
        if got is not None:
            decided += 1
            flags += got[2]
            assert got[1:] == want[1:] and got[0] == pytest.approx(want[0], abs=1e-5)
    assert decided > 270 and flags > 100  # nearly always decided, both ways
    tied = [torch.log_softmax(torch.zeros(2, 12), -1)] * 2  # every token equally likely: argmax is token 0
    assert mixed_from_summaries([summarize(r, [3, 5]) for r in tied], torch.log(torch.tensor([0.5, 0.5])), [3, 5]) is None


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("members")
    paths = []
    for seed in (3, 4):
        paths.append(make_checkpoint(root / f"m{seed}", seed=seed, dtype=torch.float32))
        save_toy_tokenizer(paths[-1])
    from transformers import AutoTokenizer

    return paths, AutoTokenizer.from_pretrained(str(paths[0]))


def peaked(path, memo: Memo) -> LoadedModel:
    """A member with a sharpened LM head: a tiny random model's next-token distributions are
    nearly flat, where the bounds cannot tell (a trained model's are peaked)."""
    lm = LoadedModel(path, "cpu", torch.float32, memo)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(40)
    return lm


def test_an_ensemble_of_scored_members_runs_no_forward_pass(members, monkeypatch):
    paths, tok = members
    memo = Memo()
    lms = [peaked(p, memo) for p in paths]
    lw = torch.log(torch.tensor([0.7, 0.3]))
    prompts = [chat.tokens(tok, chat.prompt_text(tok, p)) for p in ("hello", "a longer question here", "z")]
    answers, _ = greedy_decode(lms, lw, prompts, 5, tok.pad_token_id, set())
    batch = [(p, a) for p, a in zip(prompts, answers)] + [(p, [40, 41, 42]) for p in prompts]
    for lm in lms:
        lm.score(batch, tok.pad_token_id)  # the members, scored as candidates of their own
    calls = []
    for lm in lms:
        real = lm.forward
        monkeypatch.setattr(lm, "forward", lambda keep, real=real, **kw: calls.append(1) or real(keep, **kw))
    got = mixed_scores(lms, lw, batch, tok.pad_token_id)
    assert calls == []
    fresh = [peaked(p, Memo()) for p in paths]
    for lm in fresh:
        lm.reuse_summaries = False
    want = mixed_scores(fresh, lw, batch, tok.pad_token_id)
    assert [g[1:] for g in got] == [w[1:] for w in want]
    assert all(abs(g[0] - w[0]) < 1e-5 for g, w in zip(got, want))
    assert [g[2] for g in got[:3]] == [True] * 3  # the ensemble's own greedy answers
    assert not all(g[2] for g in got[3:])
    assert all(lm.reused_seconds > 0 for lm in lms)  # the cost table still charges the members' work


def test_a_mixture_decodes_a_prompt_once_across_suites(members, monkeypatch):
    """Two suites asking a token ensemble the same prompt (helpful_winrate's prompts are all in
    harmless_overrefusal_broad's): the second gets the remembered answer, its seconds charged."""
    paths, tok = members
    from merge_lab.evaluation.candidates import ModelCandidate, TokenEnsemble
    from merge_lab.evaluation.spec import Settings

    s = Settings(max_new_tokens=5)
    memo = Memo()
    ens = TokenEnsemble("e", [ModelCandidate(f"m{i}", p, s, memo) for i, p in enumerate(paths)], [0.6, 0.4], s)
    first = ens.generate(["hello", "a longer question here"])
    spent = ens.counters.gen_seconds
    other = TokenEnsemble("f", ens.members, [0.4, 0.6], s)  # other weights: another mixture
    other.load()
    calls = []
    for lm in ens.models + other.models:
        real = lm.forward
        monkeypatch.setattr(lm, "forward", lambda keep, real=real, **kw: calls.append(1) or real(keep, **kw))
    assert ens.generate(["a longer question here"]) == first[1:] and calls == []
    assert ens.counters.gen_seconds > spent and ens.counters.gen_tokens > 0
    other.generate(["hello"])  # decoded afresh
    assert calls
