"""The training budget of the same-training baselines, worked out from the recipes, never typed by hand.

- `multitask`: one LoRA fine-tune of the base on the union of the experts' and the fusion's rows,
  with as much as they got together: the sum of their optimizer steps, as many rows per step on
  average (so as many rows seen in all), and a LoRA whose trainable parameters are at least the
  experts' LoRA plus everything the fusion trained (routers, expert LoRA, ...), spread over every
  layer any of them trained (the rank is the smallest that reaches that count).
- `merge_then_train`: a merge trained further on the fusion's rows with the fusion's steps, rows per
  step, learning rate, sequence length, seed and LoRA rank and alpha, on the FFN projections the
  fusion's expert LoRA adapts (gate, up, down), in every layer.

Both train with `merge-lab align` (training/align.py), so its schedule applies: linear warm-up, then
cosine down to 0.1 of the learning rate. `TrainingPlan.record()` is what the report prints.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError

FFN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # what the fusion's expert LoRA adapts, per expert


@dataclass(frozen=True)
class Shapes:
    """What parameter counts need of a decoder: layers, each layer's linear maps (in, out), attention size."""

    layers: int
    linear: dict[str, tuple[int, int]]
    attention_params: int


@lru_cache(maxsize=8)
def model_shapes(base: Path) -> Shapes:
    """The shapes of the model in `base`, built on the meta device from its config.json (no weights read)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base))
    except Exception as e:
        raise MergeLabError(f"{base}: config.json does not load ({e}).") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layers = model.get_decoder().layers
    first = layers[0]
    linear = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
              for name, m in first.named_modules() if isinstance(m, torch.nn.Linear)}
    attention = sum(p.numel() for n, p in first.named_parameters() if n.startswith("self_attn."))
    return Shapes(len(layers), linear, attention)


def adapted_layers(layers: int | list[int] | None, n: int) -> list[int]:
    """The layer indices an align recipe's `lora.layers` adapts (as training/align.py reads it)."""
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        return list(range(max(0, n - layers), n))
    return sorted(set(layers))


def lora_params(shapes: Shapes, targets: list[str], layers: list[int], r: int) -> int:
    """Trainable parameters of a rank-r LoRA on `targets` in `layers`: r * (in + out) per adapted map."""
    missing = [t for t in targets if t not in shapes.linear]
    if missing:
        raise MergeLabError(f"LoRA targets {missing} are not linear maps of the model; it has {sorted(shapes.linear)}.")
    return r * len(layers) * sum(sum(shapes.linear[t]) for t in targets)


@dataclass(frozen=True)
class SourceBudget:
    """What one expert's or the fusion's training spent, from its recipe."""

    recipe: str
    kind: str  # align | fuse
    steps: int
    batch_size: int
    rows: int
    trainable: int  # parameters it trained
    layers: tuple[int, ...]  # layers it trained in
    what: str  # e.g. "LoRA r16 on gate_proj, up_proj, down_proj in 10 layers"

    def as_dict(self) -> dict:
        return {"recipe": self.recipe, "kind": self.kind, "steps": self.steps, "batch_size": self.batch_size,
                "rows": self.rows, "trainable_params": self.trainable, "layers": len(self.layers), "what": self.what}


@dataclass
class TrainingPlan:
    """A baseline's training, as `merge-lab align` runs it: the base, the rows, the LoRA and the schedule."""

    kind: str  # multitask | merge_then_train
    base: Path
    rows: list[Example]
    lora: dict[str, Any]
    train: dict[str, Any]
    sources: list[SourceBudget]
    trainable: int  # parameters this plan's LoRA trains
    notes: list[str] = field(default_factory=list)

    @property
    def budget(self) -> int:
        """Parameters the sources trained together."""
        return sum(s.trainable for s in self.sources)

    def digest(self) -> str:
        """What the training depends on besides the base's weights: rows (ids and text), LoRA, schedule."""
        h = hashlib.sha256(json.dumps([self.kind, self.lora, self.train]).encode())
        for r in self.rows:
            h.update(json.dumps([r.id, r.prompt, r.response]).encode())
        return h.hexdigest()[:16]

    def record(self) -> dict:
        """The budget as the report prints it (results.json: candidates.NAME.training)."""
        return {"kind": self.kind, "base": str(self.base), "steps": self.train["steps"],
                "batch_size": self.train["batch_size"], "rows": len(self.rows), "rows_seen": self.train["steps"] * self.train["batch_size"],
                "lora_r": self.lora["r"], "lora_alpha": self.lora["alpha"], "target_modules": self.lora["target_modules"],
                "layers": len(self.lora["layers"]), "trainable_params": self.trainable, "budget_params": self.budget,
                "lr": self.train["lr"], "max_tokens": self.train["max_tokens"], "seed": self.train["seed"],
                "sources": [s.as_dict() for s in self.sources], "notes": self.notes}


# ------------------------------------------------------------------ what each source spent


def align_budget(path: Path) -> tuple[SourceBudget, Any]:
    """An align recipe's spend (steps, rows per step, rows, LoRA parameters) and the recipe itself."""
    from merge_lab.core.bases import resolve_base
    from merge_lab.training.align import load_align_recipe

    recipe = load_align_recipe(path)
    rows = recipe.rows()
    cfg, lora = recipe.train, recipe.lora
    # as align counts them; rows truncation leaves without a reply token are counted too (align drops them)
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.epochs or 1) * math.ceil(len(rows) / cfg.batch_size)))
    shapes = model_shapes(resolve_base(recipe.base_model).resolve())
    layers = adapted_layers(lora.layers, shapes.layers)
    trainable = lora_params(shapes, list(lora.target_modules), layers, lora.r)
    what = f"LoRA r{lora.r} on {', '.join(lora.target_modules)} in {len(layers)} layers"
    return SourceBudget(str(path), "align", steps, cfg.batch_size, len(rows), trainable, tuple(layers), what), recipe


def fusion_budget(path: Path) -> tuple[SourceBudget, Any, Any, list[Example]]:
    """A fuse recipe's spend: steps, rows per step, rows, and every parameter its training updates
    (routers, plus expert LoRA, full experts or attention as `trainable:` and `train_attention:` say);
    with the recipe, its train block and its rows."""
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.moe.train_config import train_config, train_rows

    recipe = load_recipe(path)
    if recipe.merge_method != "h3_moe" or recipe.train is None or recipe.base_model is None:
        raise MergeLabError(f"{path}: not a fuse recipe (an h3_moe recipe with base_model and a train: block).")
    cfg = train_config(recipe)
    rows = train_rows(recipe)
    shapes = model_shapes(recipe.model_identity(recipe.base_model))
    missing = [p for p in FFN_PROJECTIONS if p not in shapes.linear]
    if missing:
        raise MergeLabError(f"{path}: the base has no {missing}: its FFN is not the gate/up/down layout H3 fusion uses.")
    experts, n = len(recipe.models), shapes.layers
    gate, up, down = (shapes.linear[p] for p in FFN_PROJECTIONS)
    hidden = gate[0]
    trainable = experts * hidden * n  # one router row per expert per layer
    what = ["routers"]
    if cfg.trainable == "router+lora":  # peft's LoRA on the stacked expert tensors: r * experts * (in + out)
        trainable += cfg.lora_r * experts * n * ((gate[0] + gate[1] + up[1]) + (down[0] + down[1]))
        what.append(f"expert LoRA r{cfg.lora_r}")
    elif cfg.trainable == "router+experts":
        trainable += experts * n * sum(i * o for i, o in (gate, up, down))
        what.append("full experts")
    if cfg.train_attention:
        trainable += shapes.attention_params * n
        what.append("attention")
    budget = SourceBudget(str(path), "fuse", cfg.steps, cfg.batch_size, len(rows), trainable, tuple(range(n)),
                          f"{' + '.join(what)} of {experts} experts in {n} layers")
    return budget, recipe, cfg, rows


# ------------------------------------------------------------------ the two plans


def _agreed(recipes: list[tuple[SourceBudget, Any]], what: str, get) -> Any:
    values = {str(s.recipe): get(r) for s, r in recipes}
    if len(set(map(str, values.values()))) > 1:
        listed = ", ".join(f"{Path(k).name}: {v}" for k, v in values.items())
        raise MergeLabError(f"multitask: the align recipes differ in {what} ({listed}); one fine-tune has one value, "
                            "so give recipes that agree.")
    return next(iter(values.values()))


def union_rows(groups: list[list[Example]]) -> list[Example]:
    """Every distinct (prompt, reply) once, in order of first appearance: the same row in two recipes counts once."""
    seen: set[tuple[str, str]] = set()
    out = []
    for rows in groups:
        for r in rows:
            key = (r.prompt, str(r.response))
            if key not in seen:
                seen.add(key)
                out.append(r)
    return out


def multitask_plan(align_paths: list[Path], fuse_path: Path | None) -> TrainingPlan:
    """The data-mixture baseline: as many steps, rows and trainable parameters as the experts and the fusion together."""
    from merge_lab.core.bases import resolve_base

    aligned = [align_budget(p) for p in align_paths]
    sources = [s for s, _ in aligned]
    groups = [r.rows() for _, r in aligned]
    base = Path(_agreed(aligned, "base_model", lambda r: resolve_base(r.base_model).resolve()))
    notes = []
    max_tokens = _agreed(aligned, "train.max_tokens", lambda r: r.train.max_tokens)
    if fuse_path is not None:
        fused, recipe, cfg, rows = fusion_budget(fuse_path)
        if recipe.model_identity(recipe.base_model) != base:
            raise MergeLabError(f"multitask: the fuse recipe's base ({recipe.base_model}) is not the experts' ({base}).")
        sources.append(fused)
        groups.append(rows)
        if cfg.max_length > max_tokens:
            max_tokens = cfg.max_length
        notes.append(f"the fusion trained at lr {cfg.lr}; the multitask run uses the experts' lr")
    steps = sum(s.steps for s in sources)
    batch = math.ceil(sum(s.steps * s.batch_size for s in sources) / steps)
    shapes = model_shapes(base)
    targets = list(dict.fromkeys(t for _, r in aligned for t in r.lora.target_modules))
    layers = sorted({i for s in sources for i in s.layers})
    per_rank = lora_params(shapes, targets, layers, 1)
    r = max(1, math.ceil(sum(s.trainable for s in sources) / per_rank))
    ratio = _agreed(aligned, "lora.alpha / lora.r", lambda x: x.lora.alpha / x.lora.r)
    lora = {"r": r, "alpha": ratio * r, "dropout": _agreed(aligned, "lora.dropout", lambda x: x.lora.dropout),
            "target_modules": targets, "layers": layers}
    train = {"steps": steps, "batch_size": batch, "lr": _agreed(aligned, "train.lr", lambda x: x.train.lr),
             "warmup_steps": _agreed(aligned, "train.warmup_steps", lambda x: x.train.warmup_steps),
             "max_tokens": max_tokens, "seed": _agreed(aligned, "train.seed", lambda x: x.train.seed)}
    return TrainingPlan("multitask", base, union_rows(groups), lora, train, sources,
                        lora_params(shapes, targets, layers, r), notes)


def merge_then_train_plan(fuse_path: Path, base: Path) -> TrainingPlan:
    """The merge `base` trained on the fusion's rows with the fusion's steps, batch, lr, length, seed and LoRA."""
    fused, _, cfg, rows = fusion_budget(fuse_path)
    if cfg.trainable != "router+lora":
        raise MergeLabError(f"{fuse_path}: merge_then_train copies the fusion's expert LoRA settings, but this recipe "
                            f"trains '{cfg.trainable}'; use a fuse recipe with trainable: router+lora.")
    shapes = model_shapes(base.resolve())
    layers = list(range(shapes.layers))
    lora = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": 0.0, "target_modules": list(FFN_PROJECTIONS),
            "layers": layers}
    train = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": 0,
             "max_tokens": cfg.max_length, "seed": cfg.seed}
    notes = ["the fusion trains its LoRA once per expert; this run has one FFN, so fewer trainable parameters"]
    return TrainingPlan("merge_then_train", base, list(rows), lora, train, [fused],
                        lora_params(shapes, list(FFN_PROJECTIONS), layers, cfg.lora_r), notes)
