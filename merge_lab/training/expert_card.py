"""What an align output says about its expert: the card (README.md) and the stamp in merged/config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from merge_lab.core.hashing import file_sha256

if TYPE_CHECKING:
    from merge_lab.training.align import AlignRecipe


def stamp_merged(merged: Path, adapter: Path, label: str | None) -> None:
    """Record in the merged checkpoint's config which adapter made it (label, adapter sha256).

    Experts of one base differ only in a few FFN tensors deep inside the weight file, so tools
    that fingerprint a folder by its config and the ends of its weight files would take them for
    one model; the adapter's hash in config.json tells them apart (and traces the expert).
    """
    cfg_path = merged / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["merge_lab_align"] = {"label": label, "adapter_sha256": file_sha256(adapter / "adapter_model.safetensors")}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def loss_ends(losses: list[float]) -> tuple[float, float]:
    """Mean loss of the first and of the last fifth of the steps."""
    fifth = max(1, len(losses) // 5)
    return sum(losses[:fifth]) / fifth, sum(losses[-fifth:]) / fifth


def expert_card(recipe: AlignRecipe, base: Path, rows: int, steps: int, processes: int, losses: list[float]) -> str:
    """README.md of the output: what was trained, on what, and how the batch was split."""
    from merge_lab.moe.pipeline import processes_text

    cfg = recipe.train
    first, last = loss_ends(losses)
    return (
        f"# Aligned expert{f': {recipe.label}' if recipe.label else ''}\n\n"
        f"LoRA (r {recipe.lora.r}, alpha {recipe.lora.alpha}, on {', '.join(recipe.lora.target_modules)}) "
        f"of `{base}`, trained by `merge-lab align` on {rows} rows (ids in train_items.json).\n"
        f"{steps} steps, lr {cfg.lr}, seed {cfg.seed}; batch: {cfg.batch_size} rows per step, "
        f"{processes_text(processes, cfg.batch_size)}.\n"
        f"Reply-token loss: {first:.4f} (first fifth of the steps) -> {last:.4f} (last fifth).\n\n"
        "adapter/: the LoRA adapter; merged/: the adapter merged into a full checkpoint; "
        "align_log.json: the loss of every step; align_recipe.yaml: the recipe.\n"
    )
