"""End-to-end merges on real safetensors files: layout, metadata, parameters, vocabulary."""

from __future__ import annotations

import json

import pytest
import torch

from merge_lab.core.checkpoint import Checkpoint, read_header
from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.merge.params import resolve
from merge_lab.testing import load_tensors, logits, make_checkpoint, write_recipe


def test_output_layout_metadata_and_card(family, tmp_path):
    base, models = family
    recipe = {"merge_method": "ties", "base_model": str(base), "seed": 11, "shard_size": "30KB",
              "models": [{"model": str(m), "parameters": {"density": 0.5}} for m in models]}
    out = merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False).path
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in Checkpoint(out).tensors.values())
    for s in shards:
        _, metadata = read_header(s)
        assert s.stat().st_size <= 30_000 + 4096
        assert len(metadata["merge_lab_recipe_sha256"]) == 64
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    digest = Checkpoint(models[0]).file_hashes()
    assert all(d in card for d in digest.values())
    assert "seed 11" in card and "torch" in card and "merge_method: ties" in card
    # the merged model loads in transformers, with the base's tokenizer and chat template
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")
    assert torch.isfinite(logits(out)).all()


def test_dtype_conversion(family, tmp_path):
    base, models = family
    recipe = {"merge_method": "linear", "dtype": "float32", "models": [str(m) for m in models]}
    out = merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False).path
    assert {i.dtype for i in Checkpoint(out).tensors.values()} == {torch.float32}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


def test_linear_matches_hand_computation(family, tmp_path):
    base, models = family
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (1.0, 2.0, 5.0))]}
    out = load_tensors(merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False).path)
    ins = [load_tensors(m) for m in models]
    for name, t in out.items():
        expected = (ins[0][name].float() + 2 * ins[1][name].float() + 5 * ins[2][name].float()) / 8
        torch.testing.assert_close(t, expected)


def test_per_layer_gradient_and_filters(family, tmp_path):
    """weight goes 0 -> 1 across layers for MLP tensors; attention uses the filter's 0.25."""
    base, models = family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(models[0]), "parameters": {
                  "weight": [{"filter": "self_attn", "value": 0.25}, {"value": [0.0, 1.0]}]}}]}
    out = load_tensors(merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False).path)
    b, m = load_tensors(base), load_tensors(models[0])

    def expect(name, w):
        torch.testing.assert_close(out[name], b[name].float() + w * (m[name].float() - b[name].float()))

    expect("model.layers.0.mlp.up_proj.weight", 0.0)
    expect("model.layers.1.mlp.up_proj.weight", 1.0)
    expect("model.layers.0.self_attn.q_proj.weight", 0.25)
    expect("model.embed_tokens.weight", 0.0)  # outside the layers: gradient position 0


@pytest.mark.parametrize(
    ("value", "name", "t", "expected"),
    [
        (0.5, "x", 0.3, 0.5),
        ([0.0, 1.0], "x", 0.25, 0.25),
        ([0.0, 1.0, 0.0], "x", 0.5, 1.0),
        ([0.0, 1.0, 0.0], "x", 0.75, 0.5),
        ([{"filter": "attn", "value": 2.0}, {"value": 3.0}], "self_attn.q", 0.0, 2.0),
        ([{"filter": "attn", "value": 2.0}, {"value": 3.0}], "mlp.up", 0.0, 3.0),
        ([{"filter": "attn", "value": 2.0}], "mlp.up", 0.0, None),
        ([{"filter": "mlp", "value": [1.0, 3.0]}], "mlp.up", 0.5, 2.0),
    ],
)
def test_parameter_resolution(value, name, t, expected):
    assert resolve(value, name, t) == expected


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    base = make_checkpoint(root / "base", "llama", seed=0, dtype=torch.float32, vocab_size=96)
    bigger = make_checkpoint(root / "bigger", "llama", seed=1, dtype=torch.float32, vocab_size=100, base=base)
    same = make_checkpoint(root / "same", "llama", seed=2, dtype=torch.float32, vocab_size=96, base=base)
    return base, bigger, same


def test_vocabulary_difference_is_an_error_by_default(vocab_family, tmp_path):
    base, bigger, same = vocab_family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [str(bigger), str(same)]}
    with pytest.raises(MergeLabError, match="tokenizer: base"):
        merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_base_merges_shared_rows(vocab_family, tmp_path):
    base, bigger, same = vocab_family
    recipe = {"merge_method": "task_arithmetic", "base_model": str(base), "tokenizer": "base",
              "models": [str(bigger), str(same)]}
    out = load_tensors(merge(write_recipe(tmp_path / "r.yaml", recipe), tmp_path / "out", progress=False).path)
    b, big, s = load_tensors(base), load_tensors(bigger), load_tensors(same)
    emb = "model.embed_tokens.weight"
    assert out[emb].shape == b[emb].shape
    torch.testing.assert_close(out[emb], big[emb][:96] + s[emb] - b[emb])
    # mergekit's spelling works too
    recipe2 = {k: v for k, v in recipe.items() if k != "tokenizer"} | {"tokenizer_source": "base"}
    out2 = load_tensors(merge(write_recipe(tmp_path / "r2.yaml", recipe2), tmp_path / "out2", progress=False).path)
    torch.testing.assert_close(out2[emb], out[emb])


def test_mergekit_recipe_runs_unchanged(family, tmp_path):
    """A recipe as mergekit users write it: base listed among models, out_dtype, tokenizer_source."""
    base, models = family
    text = f"""\
models:
  - model: {base}
  - model: {models[0]}
    parameters:
      density: 0.53
      weight: 0.4
  - model: {models[1]}
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: {base}
parameters:
  int8_mask: true
dtype: bfloat16
out_dtype: float32
tokenizer_source: base
"""
    (tmp_path / "mk.yml").write_text(text)
    out = merge(tmp_path / "mk.yml", tmp_path / "out", progress=False).path
    assert {i.dtype for i in Checkpoint(out).tensors.values()} == {torch.float32}
    assert torch.isfinite(logits(out)).all()
