"""The `train:` block of an h3_moe recipe (TrainConfig) and its rows, worked out once per Recipe
object (`train_config`, `train_rows`, `router_rows`): the strategy's check, the fuse pipeline,
centroid router initialisation and the same-training baselines' budgets all ask for them, and
none of them needs the training code (merge_lab.moe.train)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.assemble import expert_labels, h3_params
from merge_lab.moe.data import as_blocks, load_rows
from merge_lab.training.blocks import ExpertBlock

T = TypeVar("T")


class TrainConfig(BaseModel):
    """The recipe's `train:` block.

    gating_tokens: SmolLM2's chat template puts the same 24-token system block before every
    prompt (~40% of a 60-token example). Runs on SmolLM2-135M, 3 experts, router only, 30 steps,
    lr 1e-2, lambda 0.5, batch 8, max_length 96, routing accuracy on 42-48 training rows (all
    tokens / content tokens):
      trained demo experts, random init: before 0.33 / 0.33; all 0.86 / 0.98; content 0.93 / 0.98
      random LoRA experts, centroid init: before 0.58 / 0.79; all 0.48 / 0.98; content 0.54 / 0.83
    Both losses teach the router; what hid it was measuring over all tokens, so accuracy is now
    always measured on content tokens. Neither loss wins in both runs (one seed each), so `all`,
    the paper's definition, stays the default.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data: list[ExpertBlock] = Field(
        description="JSONL of {prompt, response, label} rows, or align-style blocks each with `expert: LABEL` and "
                    "one of `source:` (a shipped set by split), `jsonl:` or `suite:` (a registered suite's items on "
                    "its train split, never the ones it evaluates; reference replies, or response_template)"
    )
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per step over all processes (under `accelerate launch` "
                                                 "each of N processes takes batch_size / N of them)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response), longer are cut")
    trainable: Literal["router", "router+lora", "router+experts"] = Field(
        "router", description="what trains besides nothing else: routers only, + expert LoRA, + full experts"
    )
    train_attention: bool = Field(False, description="also train attention (frozen by default, as in the paper)")
    lora_r: int = Field(8, ge=1, description="rank of the expert LoRA (router+lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    gating_weight: float = Field(0.01, alias="lambda", ge=0, description="weight of the gating loss")
    drift_weight: float | dict[str, float] = Field(
        0.0, alias="gamma", description="weight of each expert's drift regulariser: one number or {label: gamma}"
    )
    load_balance: float = Field(0.0, ge=0, description="weight of the load-balancing loss (0: off)")
    gating_tokens: Literal["all", "content"] = Field(
        "all", description="tokens the gating loss averages over: all real tokens (the issue's and paper's "
                           "definition), or content: all but the prefix every example shares (the chat template's "
                           "system block, identical hidden states in every example). Routing accuracy is always "
                           "measured on the content tokens")
    seed: int = Field(0, description="seed of LoRA init, data order and dropout")
    eval_rows: int = Field(96, ge=0, description="routing accuracy before/after is measured on this many rows (0: off)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: only on Ctrl-C)")
    cpu: bool = Field(False, description="train on CPU even when a GPU is present")

    @field_validator("data", mode="before")
    @classmethod
    def _jsonl_shorthand(cls, data: Any) -> Any:
        return as_blocks(data)

    @model_validator(mode="after")
    def _gamma_non_negative(self) -> TrainConfig:
        if any(v < 0 for v in self.gamma_values()):
            raise ValueError("gamma must be >= 0")
        return self

    def gamma_values(self) -> list[float]:
        """Every gamma the block sets: the one number, or each label's."""
        return list(self.drift_weight.values()) if isinstance(self.drift_weight, dict) else [self.drift_weight]

    def gammas(self, labels: list[str]) -> list[float]:
        if isinstance(self.drift_weight, dict):
            return [float(self.drift_weight.get(lab, 0.0)) for lab in labels]
        return [float(self.drift_weight)] * len(labels)


_ONCE: dict[tuple[int, str], Any] = {}


def _once_per_recipe(recipe: Recipe, what: str, compute: Callable[[], T]) -> T:
    """compute() the first time `what` is asked of this Recipe object; forgotten with the recipe."""
    key = (id(recipe), what)
    if key not in _ONCE:
        _ONCE[key] = compute()
        weakref.finalize(recipe, _ONCE.pop, key, None)
    return _ONCE[key]


def train_config(recipe: Recipe) -> TrainConfig:
    """The recipe's `train:` block, validated (data blocks included) with the recipe line of the offending key."""
    if recipe.train is None:
        raise MergeLabError(f"{recipe.source}: has no 'train:' block; add one (data, steps, ...) to fuse.")
    return _once_per_recipe(recipe, "train_config", lambda: _validated(recipe))


def _validated(recipe: Recipe) -> TrainConfig:
    cfg = recipe.validate_block(TrainConfig, ("train",), "train block")
    labels = expert_labels(recipe)
    if isinstance(cfg.drift_weight, dict):
        unknown = [k for k in cfg.drift_weight if k not in labels]
        if unknown:
            raise MergeLabError(
                f"{recipe.where('train', 'gamma')}: label(s) {unknown} are not expert labels ({', '.join(labels)})."
            )
    return cfg


def train_rows(recipe: Recipe) -> list[Example]:
    """The labelled rows of the recipe's train.data, loaded once (errors name the recipe's lines)."""
    return _once_per_recipe(recipe, "train_rows", lambda: load_rows(
        train_config(recipe).data, expert_labels(recipe), lambda *key: recipe.where("train", "data", *key)))


def router_rows(recipe: Recipe) -> list[Example]:
    """Centroid router initialisation's labelled prompts: parameters.router_data, else the train rows."""
    router_data = h3_params(recipe).router_data
    if router_data is None:
        return train_rows(recipe)
    return load_rows(recipe.resolve_path(router_data), expert_labels(recipe),
                     lambda *key: recipe.where("parameters", "router_data"))
