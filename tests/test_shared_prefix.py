"""The shared-prefix path and the shrinking decoding batch change no result: log-probs and greedy
tokens equal plain, unpadded transformers forwards on a tiny Llama and tiny MoEs (Mixtral,
Qwen2-MoE) made here, for items that share a chat prefix and items that share nothing."""

from __future__ import annotations

import pytest
import torch

from merge_lab.evaluation import decoding_memory, runtime
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.runtime import LoadedModel, decode, mixed_scores
from merge_lab.testing import make_checkpoint
from merge_lab.testing.toy import save_toy_tokenizer
from merge_lab.training import chat

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "You are a careful assistant. Answer briefly."
PROMPTS = ["hello there", "a much longer request that needs padding on the left", "z", "two words"]
UNSHARED = [[5, 9, 11, 12], [7, 30, 31, 40, 41, 42, 43], [8, 20]]  # no two rows start alike
STOPS = {2, 4}


def moe_checkpoint(path, family: str):
    from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "mixtral":
        cfg = MixtralConfig(intermediate_size=32, num_local_experts=3, num_experts_per_tok=2, **common)
    else:
        cfg = Qwen2MoeConfig(intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                             num_experts=3, num_experts_per_tok=2, **common)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    save_toy_tokenizer(path)
    return path


@pytest.fixture(scope="module", params=["llama", "mixtral", "qwen2_moe"])
def model(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        path = make_checkpoint(folder / "m", seed=3, dtype=torch.float32)
        save_toy_tokenizer(path)
    else:
        path = moe_checkpoint(folder / "m", request.param)
    lm = LoadedModel(path, "cpu", torch.float32, Memo())
    from transformers import AutoTokenizer

    return lm, AutoTokenizer.from_pretrained(str(path))


def chat_prompts(tok) -> list[list[int]]:
    return [chat.tokens(tok, chat.prompt_text(tok, p, SYSTEM)) for p in PROMPTS]


def plain_logprobs(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Log-softmax over every position of one unpadded sequence: the reference."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids])).logits[0].float(), -1)


def batch_sizes(lm: LoadedModel, monkeypatch) -> list[int]:
    """Records the batch size of every forward pass `lm` runs."""
    seen, real = [], lm.forward

    def spy(keep, **inputs):
        seen.append(int(inputs["input_ids"].shape[0]))
        return real(keep, **inputs)

    monkeypatch.setattr(lm, "forward", spy)
    return seen


def early_stop(answers: list[list[int]]) -> int:
    """A token that, as a stop, ends the answers at different steps, one of them before the last
    step (so later steps run on fewer rows): the one that ends an answer earliest."""
    def ends(t: int) -> list[int]:
        return [a.index(t) if t in a else len(a) for a in answers]

    last = max(len(a) for a in answers) - 1
    options = [t for a in answers for t in a if len(set(ends(t))) > 1 and min(ends(t)) < last]
    assert options, answers  # the model says the same thing to every prompt: pick other prompts
    return min(options, key=lambda t: min(ends(t)))


def test_shared_prefix_scores_equal_plain_forwards(model, monkeypatch):
    lm, tok = model
    prompts = chat_prompts(tok)
    replies = [chat.tokens(tok, r) for r in ("Sure, here.", "No", "ok then", "x")]
    shared = list(zip(prompts, replies))
    unshared = [(c[:-1], c[-1:] + [9]) for c in UNSHARED]
    assert chat.common_prefix([c + t for c, t in shared], 99) >= runtime.MIN_SHARED_PREFIX
    assert chat.common_prefix([c + t for c, t in unshared], 99) == 0
    sizes = batch_sizes(lm, monkeypatch)
    for batch, first_size in ((shared, 1), (unshared, len(unshared))):
        sizes.clear()
        rows = lm.rows(batch, tok.pad_token_id)
        assert sizes[0] == first_size  # the prefix ran once, on one row; with no prefix, the plain path
        lm.share_prefix = False
        old = lm.rows(batch, tok.pad_token_id)
        lm.share_prefix = True
        for (c, t), got, before in zip(batch, rows, old):
            expected = plain_logprobs(lm, c + t)[len(c) - 1 : len(c) + len(t) - 1]
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=1e-5) and torch.allclose(got, before, atol=1e-5)


def test_a_prefix_never_swallows_a_scored_position(model):
    """Identical contexts: the prefix stops one token short of the shortest context."""
    lm, tok = model
    context = chat_prompts(tok)[0]
    batch = [(context, [40, 41]), (context, [50]), (context, [60, 61, 62])]
    for (c, t), got in zip(batch, lm.rows(batch, tok.pad_token_id)):
        expected = plain_logprobs(lm, c + t)[len(c) - 1 : len(c) + len(t) - 1]
        assert torch.allclose(got, expected, atol=1e-5)


def test_shared_prefix_greedy_tokens_equal_one_prompt_at_a_time(model, monkeypatch):
    lm, tok = model
    prompts = chat_prompts(tok)
    alone = [decode([lm], torch.zeros(1), [p], 8, tok.pad_token_id, set())[0][0] for p in prompts]
    sizes = batch_sizes(lm, monkeypatch)
    together, made = decode([lm], torch.zeros(1), prompts, 8, tok.pad_token_id, set())
    assert sizes[0] == 1 and together == alone and made == 8 * len(prompts)
    # greedy tokens as transformers' own generate gives them, for one prompt
    ref = lm.model.generate(torch.tensor([prompts[1]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    made_there = ref[0, len(prompts[1]):].tolist()  # transformers stops after its eos (id 2)
    made_there = made_there[: made_there.index(2) + 1] if 2 in made_there else made_there
    assert together[1][: len(made_there)] == made_there
    # the first step's distribution equals the unpadded forward's last row
    first = lm.stepper(prompts, tok.pad_token_id).logp
    for i, p in enumerate(prompts):
        assert torch.allclose(first[i], plain_logprobs(lm, p)[-1], atol=1e-5)
    # stopping rows leave the batch: stop on a token one prompt makes early, the others go on
    # (replies already begun differently: tiny random models answer every chat alike)
    prompts = [p + chat.tokens(tok, start) for p, start in zip(prompts, ("Su", "No", "I w", "ok"))]
    alone = [decode([lm], torch.zeros(1), [p], 8, tok.pad_token_id, set())[0][0] for p in prompts]
    stops = {early_stop(alone)}
    expected = [decode([lm], torch.zeros(1), [p], 8, tok.pad_token_id, stops)[0][0] for p in prompts]
    assert len({len(e) for e in expected}) > 1  # rows really stop at different steps
    sizes.clear()
    got, made = decode([lm], torch.zeros(1), prompts, 8, tok.pad_token_id, stops)
    assert got == expected and made == sum(len(e) for e in expected)
    assert sizes[1:] and sizes[-1] < len(prompts)  # the last steps ran on fewer rows
    # no shared prefix: the plain path, same answers as one at a time
    plain = [decode([lm], torch.zeros(1), [p], 5, tok.pad_token_id, STOPS)[0][0] for p in UNSHARED]
    assert decode([lm], torch.zeros(1), UNSHARED, 5, tok.pad_token_id, STOPS)[0] == plain


def test_the_token_ensemble_is_unchanged_by_the_prefix_path(model):
    lm, tok = model
    other = LoadedModel(lm.model.name_or_path, "cpu", torch.float32, Memo())
    with torch.no_grad():  # a second member that differs from the first
        for p in other.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    weights = torch.log(torch.tensor([0.7, 0.3]))
    prompts = chat_prompts(tok)
    batch = [(p, [40, 41, 42]) for p in prompts]
    shared_scores = mixed_scores([lm, other], weights, batch, tok.pad_token_id)
    shared_answers = decode([lm, other], weights, prompts, 6, tok.pad_token_id, STOPS)
    for m in (lm, other):
        m.share_prefix = False
    try:
        plain_scores = mixed_scores([lm, other], weights, batch, tok.pad_token_id)
        assert decode([lm, other], weights, prompts, 6, tok.pad_token_id, STOPS) == shared_answers
    finally:
        for m in (lm, other):
            m.share_prefix = True
    for (a, n, g), (b, m_, h) in zip(shared_scores, plain_scores):
        assert abs(a - b) < 1e-5 and n == m_ and g == h


def test_decoding_batches_fit_the_free_memory(model, monkeypatch):
    """The rule: as many rows as fit in MEMORY_SHARE of the free memory, at most the batch given;
    split batches give the same answers as one."""
    lm, tok = model
    prompts = chat_prompts(tok)
    per_row = decoding_memory.row_bytes(lm, max(len(p) for p in prompts), 6)
    assert per_row > 2 * lm.model.config.num_hidden_layers * len(prompts[0]) * 4  # the KV cache at least
    whole = decode([lm], torch.zeros(1), prompts, 6, tok.pad_token_id, STOPS)
    room = int(2.5 * per_row / decoding_memory.MEMORY_SHARE)
    monkeypatch.setattr(decoding_memory, "free_memory", lambda device: room)
    assert decoding_memory.fitting_rows([lm], max(len(p) for p in prompts), 6, len(prompts)) == 2
    assert decoding_memory.fitting_rows([lm, lm], max(len(p) for p in prompts), 6, len(prompts)) == 1
    assert decoding_memory.fitting_rows([lm], 1, 1, 1) == 1
    sizes = batch_sizes(lm, monkeypatch)
    assert decode([lm], torch.zeros(1), prompts, 6, tok.pad_token_id, STOPS) == whole
    assert max(sizes) <= 2


def test_routing_counts_a_shared_prefix_once_per_row(model):
    """An MoE's routing counts come from the scoring pass itself: the prefix routed once, counted
    for every row, equal to each row run alone and to the rows run whole (a dense model notes none)."""
    lm, tok = model
    texts = [p + chat.tokens(tok, r) for p, r in zip(chat_prompts(tok), ("Sure.", "No", "ok then", "x"))]

    def counts(rows):
        lm.routed.clear()
        lm.run(rows, tok.pad_token_id, 1, min(len(r) for r in rows) - 1)
        return torch.stack([lm.routed[tuple(r)] for r in rows]) if lm.is_moe else lm.routed

    if not lm.is_moe:
        assert counts(texts) == {}
        return
    alone = torch.cat([counts([t]) for t in texts])
    assert lm.shared_prefix(texts, min(len(t) for t in texts) - 1) > 0  # the shared path is the one tested
    together = counts(texts)
    assert torch.equal(together, alone)
    k = lm.model.config.num_experts_per_tok
    assert [int(c[0].sum()) for c in together] == [len(t) * k for t in texts]
    lm.share_prefix = False
    try:
        assert torch.equal(counts(texts), alone)
        assert torch.equal(counts(UNSHARED), torch.cat([counts([t]) for t in UNSHARED]))
    finally:
        lm.share_prefix = True


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_routing_counts_per_label_equal_each_row_routed_alone(tmp_path, family):
    """`inspect-routing`'s per-label shares count the same top-k slots as the comparison's rows
    (row_slot_counts): padded batches give each label the slots of its rows run alone, over real tokens."""
    from transformers import AutoModelForCausalLM

    from merge_lab.moe.routing import capture_router_logits, routing_counts

    model = AutoModelForCausalLM.from_pretrained(str(moe_checkpoint(tmp_path / family, family))).eval()
    rows, labels = [*UNSHARED, [3, 4, 5, 6, 7]], [0, 2, 0, 1]
    k, experts, layers = model.config.num_experts_per_tok, 3, model.config.num_hidden_layers
    expected, tokens = torch.zeros(3, layers, experts), torch.zeros(3)
    for row, lab in zip(rows, labels):
        with torch.no_grad(), capture_router_logits(model) as captured:
            model(input_ids=torch.tensor([row]))
        for layer, logits in enumerate(captured):
            expected[lab, layer] += torch.bincount(logits.topk(k, dim=-1).indices.reshape(-1), minlength=experts)
        tokens[lab] += len(row)
    width = max(map(len, rows))
    batches = [{"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in part]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in part]),
                "expert": torch.tensor(labs)}
               for part, labs in ((rows[:3], labels[:3]), (rows[3:], labels[3:]))]
    result = routing_counts(model, batches, ["a", "b", "c"])
    assert result["tokens"] == {i: int(t) for i, t in enumerate(tokens)}
    assert torch.allclose(result["share"], expected / tokens[:, None, None])
    assert torch.allclose(result["share"].sum(-1), torch.full((3, layers), float(k)))
