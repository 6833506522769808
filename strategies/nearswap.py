"""NearSwap: take the fine-tune where it is near the base, stay with the base where it is far.

alchemonaut, "QuartetAnemoi-70B-t0.0001" (model card, Hugging Face, 2024), where the method was
introduced; mergekit 0.1.5's `nearswap`.

Semantics (mergekit's), elementwise: w = clamp(t / max(|model - base|, 1e-6), 0, 1) and
out = w * model + (1 - w) * base. Entries that differ from the base by at most t are the model's,
the others move towards the model by t / |difference|. Exactly one model besides the base.

Difference from mergekit: `t` has no default in mergekit (a recipe must set it); here it defaults
to 0.0001, the value of the model the method is named after, so recipes without it still run.
Elementwise, so the engine streams every tensor in row blocks. Computed in the recipe's arithmetic
dtype with mergekit's ops (each rounds as its does: in bfloat16, mergekit's bits).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, check_model_count

MIN_DIFFERENCE = 1e-6  # mergekit's guard against dividing by zero


class NearSwapParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = Field(
        1e-4, ge=0.0, description="distance from the base within which the model's value is taken whole"
    )


class NearSwap(ComputesInDtype, Strategy):
    name = "nearswap"
    summary = "the model's values where they are within t of the base, moved towards the base elsewhere"
    Params = NearSwapParams
    needs_base = True
    uses_base = True
    symmetric = False
    max_models = 2  # the model, and the base when listed among models
    identity_params = {"t": 1e6}  # t above every |model - base| gives the model
    row_separable = True

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 1, 1)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        model = tensors[0]
        weight = (params.t / torch.sub(model, base).abs_().clamp_(min=MIN_DIFFERENCE)).clamp_(0.0, 1.0)
        model.mul_(weight)
        return model.add_(base.mul_(weight.neg_().add_(1.0)))
