"""One chat format: align, fusion and the comparison see a prompt the same way, template or not."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from merge_lab.datasets.sources import Example
from merge_lab.evaluation.candidates import ModelCandidate, Settings
from merge_lab.moe.data import encode, encode_prompt
from merge_lab.testing import make_checkpoint
from merge_lab.training import chat
from merge_lab.training.align import encode as align_encode


@pytest.fixture(params=["template", "no_template"])
def model(request, tmp_path):
    path = make_checkpoint(tmp_path / "m", "llama", seed=0)
    if request.param == "no_template":
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(cfg))
        (path / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    assert bool(tok.chat_template) == (request.param == "template")
    return path, tok


def test_align_fusion_and_compare_see_the_same_prompt(model):
    path, tok = model
    prompt, reply = "Name a colour", "Blue."
    ids, labels = align_encode(tok, Example("x:0", "x", 0, prompt, reply), max_tokens=200)
    head = [t for t, lab in zip(ids, labels) if lab == chat.IGNORE]
    fused = encode(tok, Example("x:0", "x", 0, prompt, reply, "a"), ["a"], 200)
    assert fused.ids == ids and [not m for m in fused.loss_mask] == [lab == chat.IGNORE for lab in labels]
    assert encode_prompt(tok, prompt, 200) == head
    candidate = ModelCandidate("m", path, Settings())
    ctx, cont = candidate.encode(candidate.format_prompt(prompt), reply)
    assert ctx == head  # scored after exactly the prompt the model was trained after
    assert ids[len(head):len(head) + len(cont)] == cont  # and the reply's tokens are the trained ones


def test_one_truncation_rule_keeps_the_prompt_end_and_the_reply_start():
    head, reply = list(range(100)), list(range(100, 200))
    h, r = chat.fit(head, reply, 40)
    assert h == head[-20:] and r == reply[:20]
    h, r = chat.fit(head[:5], reply, 40)
    assert h == head[:5] and r == reply[:35]
    h, r = chat.fit(head, reply[:3], 40)
    assert h == head[-37:] and r == reply[:3]
