"""Tokenizer surgery: the output vocabulary and embedding rows aligned by token, against mergekit 0.1.5.

Each model gets its own tiny word-level tokenizer (different words, orders and added tokens), and
the same recipe runs through mergekit and through merge_lab. mergekit builds a `union` in the
order of a Python set and a Rust hash map (it changes from run to run), so rows are compared by
token string: every token's row must match, and for `base` or a model the ids must be the same.
"""

from __future__ import annotations

import json

import pytest
import torch
from parity_support import run_mergekit, run_ours

from merge_lab.core.architecture import is_vocab_tensor
from merge_lab.errors import MergeLabError
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import load_recipe
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"w{i}" for i in range(30)]
TEMPLATE_A = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
TEMPLATE_B = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"


def save_tokenizer(path, words: list[str], added: list[str] = (), special: list[str] = (), template: str = TEMPLATE_A):
    """A word-level tokenizer of SPECIALS + words, then `added` and `special` added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.add_tokens(list(added))
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    fast.chat_template = template
    fast.save_pretrained(str(path))
    return len(fast)


def model_with(path, seed, words, base=None, tie=False, **kw):
    """A tiny llama whose embedding rows match the tokenizer saved with it."""
    probe = path.parent / f".{path.name}-probe"
    size = save_tokenizer(probe, words, **kw)
    make_checkpoint(path, "llama", seed=seed, dtype=torch.float32, vocab_size=size, base=base, tie=tie, tokenizer=False)
    save_tokenizer(path, words, **kw)
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """base; a: the base's words reordered plus new ones and an added token; b: fewer words, other
    added tokens (one special), another chat template."""
    root = tmp_path_factory.mktemp("tokmerge")
    base = model_with(root / "base", 0, WORDS[:24])
    a = model_with(root / "a", 1, list(reversed(WORDS[:24])) + ["x1", "x2"], base=base, added=["<tool>"])
    b = model_with(root / "b", 2, WORDS[4:20] + ["y1"], base=base, added=["<tool>", "<b_only>"], special=["<|sp|>"],
                   template=TEMPLATE_B)
    return base, a, b


def vocab_of(folder) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def assert_same_by_token(ours_dir, theirs_dir, case, same_ids: bool) -> None:
    ours, theirs = load_tensors(ours_dir), load_tensors(theirs_dir)
    ov, tv = vocab_of(ours_dir), vocab_of(theirs_dir)
    assert set(ov) == set(tv), f"{case}: vocabularies differ: {sorted(set(ov) ^ set(tv))}"
    if same_ids:
        assert ov == tv, f"{case}: token ids differ"
    assert set(ours) == set(theirs), f"{case}: tensor names differ"
    ours_cfg, theirs_cfg = (json.loads((d / "config.json").read_text()) for d in (ours_dir, theirs_dir))
    assert ours_cfg["vocab_size"] == theirs_cfg["vocab_size"]
    for name, t in theirs.items():
        o = ours[name]
        assert o.shape == t.shape, f"{case}: {name}: shape {o.shape} vs {t.shape}"
        if not is_vocab_tensor(name):
            torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
            continue
        for token, i in tv.items():
            torch.testing.assert_close(o[ov[token]], t[i], rtol=1e-5, atol=1e-6, msg=f"{case}: {name} {token!r}")
        torch.testing.assert_close(o[len(tv):], t[len(tv):], rtol=1e-5, atol=1e-6, msg=f"{case}: {name} padding")


def recipes(base, a, b):
    base, a, b = str(base), str(a), str(b)
    ta = {"merge_method": "task_arithmetic", "base_model": base,
          "models": [{"model": a, "parameters": {"weight": 0.7}}, {"model": b, "parameters": {"weight": 0.4}}]}
    return {
        "base": (ta | {"tokenizer_source": "base"}, True),
        "model": (ta | {"tokenizer_source": b}, True),
        "base_block": ({"merge_method": "linear", "base_model": base, "models": [{"model": m, "parameters": {"weight": w}}
                                                            for m, w in ((a, 1.0), (b, 0.5), (base, 0.3))],
                        "tokenizer": {"source": "base"}}, True),
        "union": (ta | {"tokenizer_source": "union"}, False),
        "union_ties": ({"merge_method": "ties", "base_model": base, "parameters": {"density": 0.6},
                        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (a, b)],
                        "tokenizer": {"source": "union"}}, False),
        # (with source: base, mergekit 0.1.5 adds new tokens to the base's own vocabulary too and fails)
        "tokens_and_padding": (ta | {"tokenizer": {
            "source": "union", "pad_to_multiple_of": 16, "tokens": {
                "x1": {"source": a, "force": True},  # a's own row of a token the base lacks, for every model
                "w5": {"source": {"kind": "zero"}, "force": True},  # forced even where models have it
                "w6": {"source": {"kind": "model_token", "model": b, "token": "y1"}, "force": True},
                "<new>": {"source": {"kind": "model_token", "model": a, "token_id": 3}},
                "y1": {"source": {"kind": "zero"}},
            }}}, False),
    }


@pytest.mark.parametrize("case", list(recipes("b", "1", "2")))
def test_same_vocabulary_and_rows_as_mergekit(case, vocab_models, tmp_path):
    recipe, same_ids = recipes(*vocab_models)[case]
    run_mergekit(recipe, tmp_path / "mergekit")
    run_ours(recipe, tmp_path)
    assert_same_by_token(tmp_path / "ours", tmp_path / "mergekit", case, same_ids)
    # streamed in small row blocks: the re-indexed reads give the same bytes
    run_ours(recipe, tmp_path, "blocked", chunk_elements=512)  # embeddings: 16-row blocks
    blocked, whole = load_tensors(tmp_path / "blocked"), load_tensors(tmp_path / "ours")
    for name in whole:
        torch.testing.assert_close(blocked[name], whole[name], rtol=1e-6, atol=1e-7, msg=f"{case} blocked: {name}")


def test_union_output_loads_and_keeps_each_models_rows(vocab_models, tmp_path):
    """The union holds every token; a token only one model has keeps that model's row in the
    merge, and the output loads in transformers with the tokenizer written beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, a, b = vocab_models
    recipe = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (a, b)],
              "tokenizer_source": "union",
              "chat_template": "auto"}
    run_ours(recipe, tmp_path)
    out = tmp_path / "ours"
    vocab = vocab_of(out)
    assert {*vocab_of(a), *vocab_of(b)} <= set(vocab)
    assert (out / "generation_config.json").read_bytes() == (a / "generation_config.json").read_bytes()
    emb = load_tensors(out)["model.embed_tokens.weight"]
    a_emb = load_tensors(a)["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["x2"]], a_emb[vocab_of(a)["x2"]])  # only a has it: its row
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template.strip() in (TEMPLATE_A, TEMPLATE_B)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] == len(vocab)
    ids = tok("w1 x1 y1 <b_only>", return_tensors="pt").input_ids
    assert (ids != tok.unk_token_id).all()
    assert torch.isfinite(model(ids).logits).all()


def test_tied_embeddings_follow_the_vocabulary(tmp_path):
    base = model_with(tmp_path / "base", 0, WORDS[:10], tie=True)
    other = model_with(tmp_path / "other", 1, WORDS[2:12], base=base, tie=True)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(other), "parameters": {"weight": 0.8}}],
              "tokenizer_source": "union"}
    run_mergekit(recipe, tmp_path / "mergekit")
    run_ours(recipe, tmp_path)
    assert "lm_head.weight" not in load_tensors(tmp_path / "ours")
    assert_same_by_token(tmp_path / "ours", tmp_path / "mergekit", "tied", same_ids=False)


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }}|{% endfor %}"])
def test_chat_template_named_or_literal(vocab_models, tmp_path, template):
    from transformers import AutoTokenizer

    base = vocab_models[0]
    same = model_with(tmp_path / "same", 3, WORDS[:24], base=base)  # same vocabulary: only the template changes
    run_ours({"merge_method": "linear", "models": [str(same), str(base)], "chat_template": template}, tmp_path)
    text = AutoTokenizer.from_pretrained(str(tmp_path / "ours")).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert text == ("<|im_start|>user\nhi<|im_end|>\n" if template == "chatml" else "hi|")


def errors(vocab_models, tmp_path, extra: dict, models=None) -> str:
    base, a, b = vocab_models
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base),
              "models": [str(m) for m in (models or (a, b))]} | extra
    with pytest.raises(MergeLabError) as e:
        make_plan(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    return str(e.value)


def test_errors_name_the_recipe_line(vocab_models, tmp_path):
    stranger = str(tmp_path / "elsewhere")
    msg = errors(vocab_models, tmp_path, {"tokenizer": {"source": "base", "tokens": {"w1": {"source": stranger}}}})
    assert "line" in msg and "tokenizer.tokens.w1.source" in msg and "not among the recipe's models" in msg
    msg = errors(vocab_models, tmp_path, {"tokenizer_source": stranger})
    assert "tokenizer_source" in msg and "not among the recipe's models" in msg
    msg = errors(vocab_models, tmp_path, {"tokenizer": {"tokens": {"w1": {"source": {
        "kind": "model_token", "model": str(vocab_models[0]), "token": "nope"}}}}})
    assert "has no token 'nope'" in msg
    msg = errors(vocab_models, tmp_path, {"tokenizer": {"source": "base", "tokens": {"x1": {"source": str(vocab_models[2])}}}})
    assert "has no token 'x1'" in msg  # b lacks x1
    msg = errors(vocab_models, tmp_path, {"tokenizer": "base", "tokenizer_source": "base"})
    assert "not both" in msg
    msg = errors(vocab_models, tmp_path, {"tokenizer": {"pad_to_multiple_of": 0}})
    assert "pad_to_multiple_of" in msg
    msg = errors(vocab_models, tmp_path, {"tokenizer_source": "base", "chat_template": "no-such-template"})
    assert "chat_template" in msg and "chatml" in msg


def test_validate_checks_tokenizer_files_before_reading_tensors(vocab_models, tmp_path):
    import shutil

    base, a, b = vocab_models
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    (broken / "tokenizer.json").write_text("{not json")
    msg = errors(vocab_models, tmp_path, {"tokenizer_source": "union"}, models=(a, broken))
    assert str(broken) in msg and "tokenizer files do not load" in msg
    # a tokenizer whose ids pass the embedding rows (config.json's vocab_size says there are more)
    short = tmp_path / "short"
    shutil.copytree(a, short)
    save_tokenizer(short, list(reversed(WORDS[:24])) + ["x1", "x2", "z1", "z2"], added=["<tool>"])
    cfg = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps(cfg | {"vocab_size": cfg["vocab_size"] + 8}))
    msg = errors(vocab_models, tmp_path, {"tokenizer_source": "union"}, models=(short, b))
    assert "rows" in msg and str(short) in msg


def test_validate_command_reports_the_vocabulary_or_the_broken_tokenizer(vocab_models, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from merge_lab.cli import app

    base, a, b = vocab_models
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(a), str(b)],
              "tokenizer": {"source": "union", "pad_to_multiple_of": 8}}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path / "ok.yaml", recipe))])
    assert result.exit_code == 0, result.output
    tokens = len({*vocab_of(base), *vocab_of(a), *vocab_of(b)})
    assert f"output vocabulary: {tokens} tokens, {-(-tokens // 8) * 8} rows" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(b, broken)
    (broken / "tokenizer.json").write_text("[]")
    recipe["models"] = [str(a), str(broken)]
    result = CliRunner().invoke(app, ["validate", str(write_recipe(tmp_path / "bad.yaml", recipe))])
    assert result.exit_code != 0 and "tokenizer files do not load" in result.output
    assert "Traceback" not in result.output


def test_rows_far_apart_are_read_in_spans_and_padded_with_the_mean(tmp_path):
    """A shuffled vocabulary of 300 tokens: each block's rows gathered from spans of the input,
    the missing tokens' default rows and the padding rows as defined."""
    from merge_lab.core.checkpoint import Checkpoint
    from merge_lab.merge.embeddings import VocabularyRows

    ckpt = Checkpoint(make_checkpoint(tmp_path / "m", "llama", vocab_size=300, tokenizer=False))
    name = "model.embed_tokens.weight"
    source = ckpt.get(name).clone()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(300, generator=g).tolist()[:280] + [-1] * 10  # 290 tokens, 10 missing
    defaults = {i: [(0, 5), (0, 7)] for i in range(280, 289)} | {289: []}  # mean of rows 5 and 7; zeros
    rows = VocabularyRows(name, [ckpt], [perm], frozenset([3]), defaults | {3: [(0, 9)]}, tokens=290, rows=296)
    expected = torch.empty(296, source.shape[1])
    for i in range(290):
        expected[i] = source[perm[i]] if 0 <= perm[i] and i != 3 else 0
    expected[3] = source[9]  # forced
    expected[280:289] = (source[5] + source[7]) / 2
    expected[290:] = expected[:290].mean(0)
    view = rows.view(0)
    assert view.info(name).shape == (296, source.shape[1])
    for step in (8, 37):  # 8 rows of 300 lie far apart: several spans per block
        blocks = [view.read(name, (s, min(296, s + step)), torch.float32) for s in range(0, 296, step)]
        torch.testing.assert_close(torch.cat(blocks), expected, msg=f"blocks of {step}")
    buf = torch.empty(296 * source.shape[1])
    torch.testing.assert_close(view.read(name, None, torch.float32, out=buf), expected)


def sliced_recipes(base, a, b):
    """`slices:` recipes with tokenizer keys: a slerp over base and a, layer by layer, and a
    passthrough frankenmerge whose embeddings come from a alone and whose head comes from b alone."""
    base, a, b = str(base), str(a), str(b)

    def layers(*models, start=0, stop=2):
        return {"sources": [{"model": m, "layer_range": [start, stop]} for m in models]}

    return {
        "slerp_union": {"merge_method": "slerp", "base_model": base, "parameters": {"t": [{"value": [0.2, 0.8]}]},
                        "slices": [layers(base, a, stop=1), layers(base, a, start=1)], "tokenizer_source": "union"},
        "passthrough_union": {"merge_method": "passthrough", "slices": [layers(a), layers(b, start=1)],
                              "tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
    }


@pytest.mark.parametrize("case", list(sliced_recipes("b", "1", "2")))
def test_slices_with_a_tokenizer_match_mergekit(case, vocab_models, tmp_path):
    """mergekit re-indexes each vocabulary tensor over the sources of the slice it comes from (the
    embeddings: the first slice's, the head: the last's): a token none of them has gets zeros."""
    recipe = sliced_recipes(*vocab_models)[case]
    run_mergekit(recipe, tmp_path / "mergekit")
    run_ours(recipe, tmp_path)
    assert_same_by_token(tmp_path / "ours", tmp_path / "mergekit", case, same_ids=False)
    if case == "passthrough_union":  # b's words a lacks: zero embedding rows; a's own rows otherwise
        base, a, b = vocab_models
        ours, vocab = load_tensors(tmp_path / "ours"), vocab_of(tmp_path / "ours")
        assert not ours["model.embed_tokens.weight"][vocab["y1"]].any()
        a_emb = load_tensors(a)["model.embed_tokens.weight"]
        torch.testing.assert_close(ours["model.embed_tokens.weight"][vocab["x1"]], a_emb[vocab_of(a)["x1"]])
        assert not ours["lm_head.weight"][vocab["x1"]].any() and ours["lm_head.weight"][vocab["y1"]].any()
