"""Task arithmetic.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv 2212.04089).

Semantics: out = base + lambda * sum_i w_i (theta_i - base); with `normalize`, the sum is divided
by sum_i w_i. A model listed that is the base itself is left out (its task vector is zero).
Computed in the recipe's arithmetic dtype, rounded as mergekit rounds (common.combine).
"""

from __future__ import annotations

import torch

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import (
    ComputesInDtype,
    TaskArithmeticParams,
    WeightedModel,
    combine,
    deltas_,
    weights_problem,
)


class TaskArithmetic(ComputesInDtype, Strategy):
    name = "task_arithmetic"
    summary = "base + lambda * weighted sum of task vectors"
    Params = TaskArithmeticParams
    ModelParams = WeightedModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0}
    row_separable = True

    @classmethod
    def check_params(cls, params, model_params) -> str | None:
        return weights_problem([p.weight for p in model_params], params.normalize)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        deltas = deltas_(tensors, base)
        return combine(deltas, [p.weight for p in model_params], base, params.lambda_, params.normalize, False)
