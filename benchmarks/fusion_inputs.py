"""Inputs of the fusion benchmark, made from a base alone: three FFN experts and their H3 MoE.

The benchmark must not depend on a demo run, so the experts are the base with small seeded noise
on its FFN weights (tensor by tensor, seeded by (expert, tensor name), so a rebuild gives the same
bytes), and the MoE is assembled from them by the h3_moe strategy through `merge_lab.merge.engine.merge`,
as a user would. The noise is small (2% of each tensor's spread) so that all candidates stay close
to the base and generate answers of similar length: generation throughput is then comparable.
A stamp file per folder makes a second run reuse what is already complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from benchmarks.synth import _gen
from merge_lab.core.architecture import MLP_ROLES, classify

LABELS = ("helpful", "harmless", "honest")
NOISE = 0.02  # of each FFN tensor's standard deviation
STAMP = ".complete"


def _fresh(folder: Path, key: str) -> bool:
    stamp = folder / STAMP
    return not (stamp.exists() and stamp.read_text() == key)


def ffn_expert(base: Path, out: Path, seed: int, noise: float = NOISE) -> Path:
    """`base` with seeded noise on its FFN weights; every other file (config, tokenizer) copied."""
    key = json.dumps({"base": str(base.resolve()), "seed": seed, "noise": noise})
    if not _fresh(out, key):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(base.iterdir()):
        if f.name.startswith(".") or not f.is_file():
            continue
        if f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
            continue
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if classify(name).role in MLP_ROLES:
                x = t.float()
                x += noise * x.std() * torch.randn(x.shape, generator=_gen(seed, name))
                tensors[name] = x.to(t.dtype)
        save_file(tensors, str(out / f.name), metadata={"format": "pt"})
        del tensors
    (out / STAMP).write_text(key)
    return out


def moe_recipe(base: Path, experts: list[Path], top_k: int = 2) -> dict:
    """The H3 assembly recipe: FFN experts of one base, top-k routing, attention from the base."""
    return {
        "name": "fusion benchmark MoE",
        "merge_method": "h3_moe",
        "base_model": str(base),
        "models": [{"model": str(p), "label": lab} for p, lab in zip(experts, LABELS)],
        "parameters": {"top_k": top_k, "router_init": "random", "non_ffn": "base"},
    }


def build(base: Path, work: Path, top_k: int = 2) -> tuple[list[Path], Path]:
    """(expert folders, assembled MoE folder) under `work`, reused when already complete."""
    from merge_lab.merge.engine import merge

    work.mkdir(parents=True, exist_ok=True)
    experts = [ffn_expert(base, work / "experts" / lab, seed=i + 1) for i, lab in enumerate(LABELS)]
    recipe = moe_recipe(base, experts, top_k)
    moe = work / "moe"
    key = yaml.safe_dump(recipe, sort_keys=True) + "".join((e / STAMP).read_text() for e in experts)
    if _fresh(moe, key):
        path = work / "moe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        merge(path, moe, force=True, progress=False, hash_inputs=False)
        (moe / STAMP).write_text(key)
    return experts, moe
