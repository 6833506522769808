"""LoRA SFT on a tiny model: response-only loss, adapter + merged checkpoint, seeded, disjoint rows."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from merge_lab.datasets import sources as data
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.testing import make_checkpoint
from merge_lab.training.align import align, encode, load_align_recipe, parse_align_recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    rows = root / "rows.jsonl"
    pairs = [("Say hi", "hi"), ("Say no", "no"), ("Count to 3", "1 2 3"), ("Spell cat", "c a t")]
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    return root, base, rows


def _recipe(root, base, rows, seed=0, steps=8):
    path = root / f"align_{seed}_{steps}.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": str(base), "label": "helpful", "data": [{"jsonl": str(rows)}],
        "lora": {"r": 4, "alpha": 8}, "train": {"steps": steps, "batch_size": 4, "lr": 0.05, "seed": seed},
    }))
    return path


def test_loss_counts_only_the_reply(tiny):
    from transformers import AutoTokenizer

    _, base, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(base))
    ids, labels = encode(tok, Example("x:0", "x", 0, "Say hi", "hi there"), max_tokens=64)
    kept = [t for t in labels if t != -100]
    assert labels[: len(ids) - len(kept)] == [-100] * (len(ids) - len(kept))
    assert tok.decode(kept) .replace(" ", "").startswith("hithere<|im_end|>")
    assert "Say hi" not in tok.decode(kept)
    ids, labels = encode(tok, Example("x:1", "x", 1, "long " * 40, "ok"), max_tokens=24)
    assert len(ids) == 24 and tok.decode([t for t in labels if t != -100]).replace(" ", "").startswith("ok")


def test_align_saves_adapter_and_merged_checkpoint(tiny):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, base, rows = tiny
    res = align(_recipe(root, base, rows), root / "expert", progress=False)
    assert res.last_loss < res.first_loss, (res.first_loss, res.last_loss)
    assert (res.adapter / "adapter_model.safetensors").exists()
    assert list(res.merged.glob("*.safetensors"))
    items = json.loads((res.path / "train_items.json").read_text())
    assert items["ids"] == ["rows:0", "rows:1", "rows:2", "rows:3"] and items["by_source"] == {"rows": [0, 1, 2, 3]}
    stamp = json.loads((res.merged / "config.json").read_text())["merge_lab_align"]
    assert stamp["label"] == "helpful" and len(stamp["adapter_sha256"]) == 64

    ids = torch.tensor([[3, 10, 20, 30, 4, 3, 40]])
    base_model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        before = base_model(ids).logits
        adapted = PeftModel.from_pretrained(base_model, str(res.adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(res.merged), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert (merged - before).abs().max() > 1e-3, "training changed nothing"

    # the same seed gives the same expert; the folder is not overwritten without force
    again = align(_recipe(root, base, rows), root / "expert2", progress=False)
    a = AutoModelForCausalLM.from_pretrained(str(again.merged), dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, merged, rtol=0, atol=1e-6)
    with pytest.raises(MergeLabError, match="already exists"):
        align(_recipe(root, base, rows), root / "expert", progress=False)


def test_shipped_rows_come_from_train_split_and_are_templated():
    recipe = parse_align_recipe(yaml.safe_dump({
        "base_model": "smollm2", "data": [
            {"source": "advbench", "limit": 5, "response_template": "{refusal}"},
            {"source": "truthfulqa_pairs", "limit": 3, "prompt_template": "True or false? {false}",
             "response_template": "False."},
        ]}))
    rows = recipe.rows()
    assert len(rows) == 8
    assert all(data.split_of(r.id) == "train" for r in rows)
    assert rows[5].prompt.startswith("True or false? ") and rows[5].response == "False."
    assert all(r.response for r in rows[:5]) and rows[0].response != rows[0].prompt
    evaluation = data.select("advbench", "test") + data.select("truthfulqa_pairs", "test")
    data.check_disjoint([r.id for r in rows], evaluation)


def test_bad_align_recipes_say_what_to_fix(tmp_path):
    with pytest.raises(MergeLabError, match="line 2"):
        parse_align_recipe("base_model: x\ndata: [{source: advbench, jsonl: y.jsonl}]\n", "r.yaml")
    with pytest.raises(MergeLabError, match=r"r.yaml, line 2 \(data.0\): training on the 'test' split would leak"):
        parse_align_recipe("base_model: x\ndata: [{source: advbench, split: test}]\n", "r.yaml").rows()
    with pytest.raises(MergeLabError, match=r"r.yaml, line 4 \(data.1\) \(advbench\): item advbench:\d+ has no response"):
        parse_align_recipe("base_model: x\ndata:\n  - {source: benign_requests, limit: 1}\n  - {source: advbench, limit: 2}\n",
                           "r.yaml").rows()
    with pytest.raises(MergeLabError, match="not found"):
        load_align_recipe(tmp_path / "nope.yaml")


def test_align_command(tiny):
    from typer.testing import CliRunner

    from merge_lab.cli import app

    root, base, rows = tiny
    res = CliRunner().invoke(app, ["align", str(_recipe(root, base, rows, steps=2)), "-o", str(root / "cli"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "align complete" in res.output and (root / "cli" / "merged" / "config.json").exists()
    res = CliRunner().invoke(app, ["align", str(root / "missing.yaml"), "-o", str(root / "cli2")])
    assert res.exit_code == 2 and "not found" in res.output


def test_reply_loss_equals_the_models_own_loss(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from merge_lab.training.align import batch_tensors, reply_loss

    _, base, _ = tiny
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    rows = [Example("x:0", "x", 0, "Say hi", "hi there"), Example("x:1", "x", 1, "Count to five please", "1 2 3 4 5")]
    batch = batch_tensors([encode(tok, r, 64) for r in rows], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(reply_loss(model, batch), model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_lora_on_the_last_layers_only(tiny):
    from safetensors import safe_open

    root, base, rows = tiny
    path = _recipe(root, base, rows, steps=1)
    doc = yaml.safe_load(path.read_text())
    doc["lora"]["layers"] = 1
    path.write_text(yaml.safe_dump(doc))
    res = align(path, root / "last1", progress=False)
    with safe_open(str(res.adapter / "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all(".layers.1." in n for n in names), names


def test_readme_align_recipe_is_valid():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("# my_align.yaml\n", 1)[1].split("```", 1)[0]
    recipe = parse_align_recipe(block, "README.md")
    assert recipe.data[0].jsonl == "my_rows.jsonl" and recipe.data[1].split == "train"
