"""`merge-lab fuse` and `merge-lab inspect-routing` end to end on a tiny model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.testing import make_checkpoint, write_recipe
from merge_lab.testing.moe import labelled_jsonl, lora_expert


def test_fuse_then_inspect_routing(tmp_path):
    base = make_checkpoint(tmp_path / "base", "qwen2", seed=0, shards=False)
    labels = ["helpful", "harmless"]
    models = [{"model": str(lora_expert(base, tmp_path / lab, seed=i)), "label": lab} for i, lab in enumerate(labels)]
    data = labelled_jsonl(tmp_path / "data.jsonl", labels, per_label=8)
    recipe = write_recipe(tmp_path / "fuse.yaml", {
        "merge_method": "h3_moe", "base_model": str(base), "models": models,
        "parameters": {"top_k": 1, "router_init": "centroid"},
        "train": {"data": str(data), "steps": 3, "batch_size": 4, "trainable": "router+lora", "lambda": 0.5},
    })
    runner = CliRunner()
    res = runner.invoke(app, ["fuse", str(recipe), "-o", str(tmp_path / "moe"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "fuse complete" in res.output and "routing accuracy" in res.output
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts_per_tok"] == 1

    again = runner.invoke(app, ["fuse", str(recipe), "-o", str(tmp_path / "moe"), "--no-progress"])
    assert again.exit_code == 2 and "already exists" in again.output

    plot = tmp_path / "routing.png"
    res = runner.invoke(app, ["inspect-routing", str(tmp_path / "moe"), str(data), "--plot", str(plot)])
    assert res.exit_code == 0, res.output
    assert "data labelled 'helpful'" in res.output and "routing accuracy" in res.output
    assert plot.stat().st_size > 1000
