"""Router initialisation: `random`, `centroid` from the base's hidden states, or `gates`:
mergekit-moe's rows for a mergekit-moe config (merge_lab.moe.gates; `merge-lab moe` sets it).

Centroid: run the base on each expert's labelled prompts, take the mean of the hidden state that
enters each layer's FFN (after the post-attention norm, i.e. what the router will see) over the
prompts' tokens, per label. The shared component of these means dominates them, so we subtract
the mean over experts before normalising each row to unit length; otherwise every row would
point the same way and the router would start near uniform whatever the data.

Centroid rows need a forward pass of the base, which neither planning (header-only) nor the
engine (files, never math) may run: CentroidInit (and GateInit) is a plan step, run once when the engine starts
and before it opens the output; its rows reach the router tensors as constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_lab.core.hashing import folder_state
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.merge.ops import Input, TensorOp
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.data import encode_prompt
from merge_lab.training import chat


def random_rows(n_experts: int, hidden: int, std: float, seed: int, layer: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.randn((n_experts, hidden), generator=g) * std


@dataclass(frozen=True)
class RandomRouterOp(TensorOp):
    """One layer's router, `router_init: random`: seeded rows drawn when the engine writes them."""

    n_experts: int
    hidden: int
    std: float
    seed: int
    layer: int

    def arguments(self) -> tuple[Input, ...]:
        return ()

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return random_rows(self.n_experts, self.hidden, self.std, self.seed, self.layer)


@dataclass(frozen=True, eq=False)
class CentroidInit:
    """The plan step of `router_init: centroid`: every layer's router rows from one pass of the
    base over the labelled prompts (merge.planner.PlanStep)."""

    base: Path
    recipe: Recipe  # its labelled prompts: parameters.router_data, else the train rows (loaded once per recipe)
    labels: tuple[str, ...]
    routers: Mapping[str, int]  # router tensor -> its layer

    def run(self) -> dict[str, torch.Tensor]:
        from merge_lab.moe.train_config import router_rows  # the rows fuse trains on, loaded once

        labels = list(self.labels)
        rows = centroid_rows(self.base, router_rows(self.recipe), labels)
        return {name: rows[layer] for name, layer in self.routers.items()}


# Centroid rows already computed in this process, by (base folder state, prompts, labels, sizes):
# the demo assembles one MoE three times (the fusion and its two ablations) from the same rows.
_COMPUTED: dict[tuple, torch.Tensor] = {}


def centroid_rows(base: str | Path, examples: list[Example], labels: list[str], max_length: int = 256,
                  batch_size: int = 16) -> torch.Tensor:
    """[layers, experts, hidden] unit rows from the base's FFN inputs on each label's prompts,
    computed once per process for the same base files (by their stat), prompts and labels."""
    missing = [lab for lab in labels if not any(e.label == lab for e in examples)]
    if missing:
        raise MergeLabError(f"router_init: centroid needs prompts for every expert; none labelled {missing}.")
    key = (folder_state(Path(base)), tuple((e.label, e.prompt) for e in examples), tuple(labels), max_length, batch_size)
    if key not in _COMPUTED:
        _COMPUTED.clear()  # one set kept: a process assembles from one base at a time
        _COMPUTED[key] = _centroid_rows(base, examples, labels, max_length, batch_size)
    return _COMPUTED[key].clone()


@torch.no_grad()
def _centroid_rows(base: str | Path, examples: list[Example], labels: list[str], max_length: int,
                   batch_size: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    layers = model.model.layers
    sums = torch.zeros(len(layers), len(labels), model.config.hidden_size)
    counts = torch.zeros(len(labels))
    captured: dict[int, torch.Tensor] = {}
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: captured.__setitem__(i, args[0]))
        for i, layer in enumerate(layers)
    ]
    pad = chat.pad_id(tokenizer)
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            rows = [encode_prompt(tokenizer, ex.prompt, max_length) for ex in chunk]
            ids, mask = chat.right_padded(rows, pad)
            model.base_model(input_ids=ids, attention_mask=mask)  # the decoder alone: no vocabulary rows
            m = mask[..., None].float()
            for i, h in captured.items():
                per_example = (h.float() * m).sum(1) / m.sum(1)  # mean over each prompt's real tokens
                for ex, v in zip(chunk, per_example):
                    sums[i, labels.index(ex.label)] += v
            for ex in chunk:
                counts[labels.index(ex.label)] += 1
    finally:
        for h in hooks:
            h.remove()
    means = sums / counts[None, :, None]
    centred = means - means.mean(dim=1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def check_gates_config(config_path: Path, base: Path, n_experts: int, where: str) -> None:
    """Header-only check of `router_gates`: the mergekit-moe config gates this base's experts."""
    from merge_lab.moe.mergekit_config import base_path, load_moe_file

    config, cwhere, _ = load_moe_file(config_path, allow_all_same=True)
    if len(config.experts) != n_experts:
        raise MergeLabError(f"{where}: {config_path} lists {len(config.experts)} experts but the recipe has "
                            f"{n_experts}; the router needs one row per expert.")
    if base_path(config, cwhere).resolve() != base.resolve():
        raise MergeLabError(f"{where}: {config_path} computes gates on base_model {base_path(config, cwhere)}, "
                            f"not on this recipe's base {base}.")


@dataclass(frozen=True, eq=False)
class GateInit:
    """The plan step of `router_init: gates`: mergekit-moe's router rows for its config (its
    gate_mode and prompts; one pass of the base for the hidden modes), cast to the router's
    output dtype as mergekit casts its gates (merge.planner.PlanStep)."""

    config: Path  # the mergekit-moe config
    seed: int  # the random gate modes' generator seed
    routers: Mapping[str, int]  # router tensor -> its layer
    dtype: torch.dtype
    notes: list[str]  # the plan's notes: layers whose prompts are too alike (mergekit warns on these)
    shared_gates: Mapping[str, int] = field(default_factory=dict)  # Qwen MoE shared expert gate -> its layer

    def run(self) -> dict[str, torch.Tensor]:
        from merge_lab.moe.gates import degenerate_layers
        from merge_lab.moe.mergekit_config import config_gate_rows, load_moe_file

        config, where, _ = load_moe_file(self.config, allow_all_same=True)
        rows, shared = config_gate_rows(config, where, seed=self.seed)
        if self.shared_gates and shared.shape[1] != 1:
            raise MergeLabError(f"{self.config}: the recipe has a shared expert, but this mergekit-moe config gates "
                                f"{shared.shape[1]} shared experts (Qwen MoE: exactly one, with prompts or random gates).")
        if config.gate_mode not in ("random", "uniform_random") and (bad := degenerate_layers(rows)):
            self.notes.append(f"gate_mode {config.gate_mode}: the router rows of layer(s) {bad} are nearly dependent "
                              "(the experts' prompts are too alike there); give more distinct prompts or train them")
        out = {name: rows[layer].to(self.dtype) for name, layer in self.routers.items()}
        out.update({name: shared[layer].to(self.dtype) for name, layer in self.shared_gates.items()})
        return out
