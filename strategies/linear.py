"""Weighted averaging of weights ("model soups").

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy
without increasing inference time", ICML 2022 (arXiv 2203.05482).

Semantics: out = sum_i w_i theta_i, divided by sum_i w_i when `normalize` (the default).
A base model is not used unless listed among `models`. Computed in float32 whatever the recipe's
dtype (and rounded to it once), as mergekit's linear does.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import PARAMS_CONFIG, weights_problem


class LinearModel(BaseModel):
    model_config = PARAMS_CONFIG
    weight: float = Field(1.0, description="this model's weight in the average")


class LinearParams(BaseModel):
    model_config = PARAMS_CONFIG
    normalize: bool = Field(True, description="divide by the sum of the weights")


class Linear(Strategy):
    name = "linear"
    summary = "weighted average of the models (model soup)"
    Params = LinearParams
    ModelParams = LinearModel
    identity_params = {"weight": 1.0}
    row_separable = True

    @classmethod
    def check_params(cls, params, model_params) -> str | None:
        weights = [p.weight for p in model_params]
        if all(w == 0 for w in weights):
            return "every weight is 0, so the output would be all zeros. Give some model a weight."
        return weights_problem(weights, params.normalize)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        weights = [p.weight for p in model_params]
        out = tensors[0] if weights[0] == 1.0 else tensors[0].mul_(weights[0])  # x * 1 == x: skip the pass
        for t, w in zip(tensors[1:], weights[1:]):
            out.add_(t, alpha=w)
        if params.normalize:  # the weights summed in float32, as mergekit sums them: the same bits
            total = float(torch.tensor(weights, dtype=torch.float32).sum())
            if abs(total) < 1e-8:
                raise ValueError("the weights sum to zero; set normalize: false or change the weights")
            out.div_(total)
        return out
