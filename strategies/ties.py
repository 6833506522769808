"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708).

Semantics, per tensor: delta_i = theta_i - base; keep the `density` share of each delta_i largest
in magnitude (selection by kthvalue, not a sort; at least one entry); weight it by w_i; elect
each entry's sign as the sign of sum_i w_i delta_i; average the weighted deltas that agree with
the elected sign, dividing by the sum of the weights of the agreeing models (`normalize`, default
true; the disjoint mean); out = base + lambda * that. Matches mergekit's `ties`.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_lab.registry import Strategy, TensorContext
from strategies.common import SparseModel, TaskArithmeticParams, combine, deltas_, trim_topk_


class TiesParams(TaskArithmeticParams):
    normalize: bool = Field(True, description="divide by the summed weights of the agreeing models")


class Ties(Strategy):
    name = "ties"
    summary = "trim task vectors to top-density magnitude, elect signs, disjoint mean"
    Params = TiesParams
    ModelParams = SparseModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        deltas = deltas_(tensors, base)
        for d, p in zip(deltas, model_params):
            trim_topk_(d, p.density)
        return combine(deltas, [p.weight for p in model_params], base, params.lambda_, params.normalize, True)
