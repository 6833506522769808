"""Export a trained MoE in the hub layout, through the same ShardWriter as every merge.

The assembled checkpoint fixes the output: the same tensor names, shapes and dtypes, the same
config.json and side files. Values come from the trained in-memory model, mapped back from
transformers' fused expert tensors (`mlp.experts.gate_up_proj` [E, 2I, H]) to per-expert
w1/w3/w2 (Mixtral) or gate/up/down_proj (Qwen-MoE). transformers' own save_pretrained would
write the fused layout, which older tools do not read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.writer import ShardWriter, TensorSpec, copy_side_files, parse_size
from merge_lab.errors import MergeLabError
from merge_lab.moe.layout import layout_of


def hub_tensors(state: dict[str, torch.Tensor], names: list[str], config: dict):
    """(hub name, tensor) for each name of the assembled checkpoint, from a model state dict."""
    layout = layout_of(config)
    for name in names:
        mem, expert, rows = layout.memory_name(name)
        if mem not in state:
            raise MergeLabError(f"internal: the trained model has no '{mem}' for output tensor '{name}'")
        t = state[mem]
        if expert is not None:
            t = t[expert]
        if rows is not None:
            t = t[rows]
        yield name, t


def export_moe(model: torch.nn.Module, assembled: str | Path, out: str | Path, *, force: bool = False,
               shard_size: str | int = "2GB", card_extra: str = "", inputs: Iterable[Path] = ()) -> Path:
    """Write `model` at `out` in `assembled`'s layout; `out` may not touch any of `inputs` (the
    recipe's base and experts)."""
    assembled = Path(assembled)
    ckpt = Checkpoint(assembled)
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in ckpt.tensors.items()]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "merge_lab_strategy": "h3_moe", "merge_lab_stage": "fusion-trained"}
    with ShardWriter(out, specs, parse_size(shard_size), metadata, force=force, inputs=[*inputs, assembled]) as writer:
        for name, tensor in hub_tensors(state, list(ckpt.tensors), ckpt.config):
            writer.write(name, tensor)
        (writer.folder / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        copy_side_files(assembled, writer.folder)
        for extra in ("merge_recipe.yaml",):
            if (assembled / extra).exists():
                shutil.copy2(assembled / extra, writer.folder / extra)
        card = (assembled / "README.md").read_text() if (assembled / "README.md").exists() else ""
        (writer.folder / "README.md").write_text(card + card_extra)
        path = writer.finish()
    ckpt.close()
    return path
