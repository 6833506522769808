"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(arXiv 2306.01708).

Semantics, per tensor: delta_i = theta_i - base; keep the `density` share of each delta_i largest
in magnitude (at least one entry; entries tied with the threshold are kept); weight it by w_i; elect
each entry's sign as the sign of sum_i w_i delta_i; average the weighted deltas that agree with
the elected sign, dividing by the sum of the weights of the agreeing models (`normalize`, default
true; the disjoint mean); out = base + lambda * that. Matches mergekit's `ties`, computed as it
is in the recipe's arithmetic dtype: with `dtype: bfloat16` the task vectors, the weights (0.7
is bfloat16's 0.69921875) and the sum that elects the signs are bfloat16's, so signs are elected
as mergekit elects them (common.combine). mergekit keeps exactly k entries where several tie
with the threshold (its argsort picks which); we keep every tied entry: rare in float32, more
frequent in bfloat16, whose 8-bit mantissas make equal magnitudes common.

Only the thresholds need the whole tensor, so they are statistics (Strategy.stats_passes): two
passes of an exact radix select over row blocks (merge_lab.strategies.sparsify.TopKThreshold); the trim, the
sign election and the disjoint mean are then elementwise, and the engine streams every tensor in
row blocks whatever its size.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import (
    ComputesInDtype,
    SparseModel,
    TaskArithmeticParams,
    merge_sparsified,
    weights_problem,
)
from merge_lab.strategies.sparsify import TopKThreshold, magnitude_bits


class TiesParams(TaskArithmeticParams):
    normalize: bool = Field(True, description="divide by the summed weights of the agreeing models")


class Ties(ComputesInDtype, Strategy):
    name = "ties"
    summary = "trim task vectors to top-density magnitude, elect signs, disjoint mean"
    Params = TiesParams
    ModelParams = SparseModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}
    row_separable = True  # given the thresholds

    @classmethod
    def check_params(cls, params, model_params) -> str | None:
        return weights_problem([p.weight for p in model_params], params.normalize, disjoint=True)

    def stats_passes(self, params, model_params, dtype) -> int:
        return 2 if any(0.0 < p.density < 1.0 for p in model_params) else 0

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if stats is None:  # one threshold per model that trims; None: keep all or drop all
            stats = [TopKThreshold(p.density) if 0.0 < p.density < 1.0 else None for p in model_params]
        for t, selection in zip(tensors, stats):
            if selection is not None:
                selection.fold(pass_index, magnitude_bits(t, base))
        return stats

    def finish_stats(self, pass_index, stats, params, model_params):
        for selection in stats:
            if selection is not None:
                selection.finish(pass_index)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        return merge_sparsified(tensors, base, params, model_params, lambda i, d: stats[i].trim_(d), True)
