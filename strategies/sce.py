"""SCE: select the task-vector entries that vary most across models, calculate weights, erase.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models" (SCE merging), 2024 (arXiv 2408.07990).

Semantics (those of mergekit 0.1.5), per tensor, over the N models other than the base:
delta_i = theta_i - base.
1. Select: with select_topk < 1, the entries kept are the k = int(nonzero * select_topk)
   largest in the population variance of (delta_1 .. delta_N) across models, where nonzero
   counts the entries of nonzero variance (k computed as mergekit does, a float32 product); the
   other entries of every delta are zeroed. select_topk <= 0 zeroes them all (out = base).
2. Calculate: w_i = mean(delta_i^2) over the tensor (after selection), divided by sum_j w_j;
   when that sum is below 1e-6, w_i = 1/N.
3. Erase: each entry's sign is elected as the sign of the unweighted sum_i delta_i (ties go
   to +); out = base + sum_i w_i delta_i [agrees] / max(sum_i w_i [agrees], 1e-6), where
   [agrees] marks the nonzero deltas of the elected sign.
No lambda, no per-model weights (mergekit has none for sce). `int8_mask` is accepted and has no
effect: our masks are boolean, and mergekit's int8 masks give the same float results.

Entries tied in variance with the k-th largest are all kept (mergekit's topk keeps k of them);
the variances are computed as mergekit does (torch.var of the stacked deltas), so ties with the
threshold are as rare as in float32 data. The threshold (exact radix select,
sparsify.RankThreshold) and the mean squares are statistics gathered over row blocks, in three
passes (one when select_topk is 1); the rest is elementwise, and the engine streams every tensor
in row blocks.

Computed in the recipe's arithmetic dtype, as mergekit computes it: in bfloat16 / float16 the
deltas, variances, squares, mean squares (float32 sums rounded once), weights, elected signs,
weighted deltas and their sums (float32 over the models, rounded once) and the quotient are
rounded to it where mergekit's ops round (strategies.low_precision).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, deltas_
from merge_lab.strategies.low_precision import LOW_PRECISION, model_sum, reduced_mean
from merge_lab.strategies.sparsify import RankThreshold, float_bits

WEIGHT_EPS = 1e-6  # mergekit's guards: uniform weights below this sum, and the divisor's floor


class SceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    select_topk: float = Field(
        1.0, ge=0.0, le=1.0, description="share of the entries kept: those whose deltas vary most across the models"
    )
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; no effect on float results")


def variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """The population variance of each entry across the models, as mergekit computes it (the
    stack is one block's worth: torch.var's own algorithm, so thresholds match to the bit)."""
    return torch.var(torch.stack(deltas), dim=0, unbiased=False)


class SceStats:
    """One tensor's statistics: the variance threshold (passes 0 and 1 when selecting) and each
    model's sum of squared selected deltas (the last pass)."""

    def __init__(self, select_topk: float, models: int) -> None:
        self.nonzero = 0
        self.selection: RankThreshold | None = None
        if select_topk < 1.0:
            # mergekit: int(count_nonzero(var) * select_topk), an int64 tensor times a float: float32
            self.selection = RankThreshold(lambda n: int(torch.tensor(self.nonzero) * select_topk))
        self.squares = [0.0] * models
        self.n = 0

    def select_(self, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
        """Zero the entries of (a block of) the deltas outside the selection, in place."""
        if self.selection is None:
            return deltas
        if self.selection.empty or self.selection.value is None:
            keep = torch.zeros_like(deltas[0]) if self.selection.empty else None
        else:
            keep = variance(deltas).ge_(self.selection.value.to(deltas[0].device))
        if keep is not None:
            for d in deltas:
                d.mul_(keep)
        return deltas

    def add_squares(self, deltas: list[torch.Tensor]) -> None:
        self.n += deltas[0].numel()
        for i, d in enumerate(deltas):
            if d.dtype in LOW_PRECISION:  # mergekit squares in the dtype: each square rounded to it
                self.squares[i] += float(d.square().sum(dtype=torch.float64))
            else:
                self.squares[i] += float(torch.dot(d.reshape(-1).double(), d.reshape(-1).double()))

    def weights(self) -> list[float]:
        means = [s / self.n if self.n else 0.0 for s in self.squares]
        total = sum(means)
        if abs(total) < WEIGHT_EPS:
            return [1.0 / len(means)] * len(means)
        return [m / total for m in means]

    def weights_rounded(self, dtype: torch.dtype) -> torch.Tensor:
        """weights() as mergekit computes them in a 16-bit dtype: each mean square and their sum
        rounded to it, the quotients too (a tensor of the dtype, one weight per model)."""
        means = torch.stack([reduced_mean(s, self.n, dtype) for s in self.squares])
        total = float(means.sum())
        if abs(total) < WEIGHT_EPS:
            return torch.ones_like(means) / len(self.squares)
        return means / total


def erase_rounded(deltas: list[torch.Tensor], weights: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Step 3 in a 16-bit dtype, rounded where mergekit's ops round: the elected sign from the
    deltas' sum, each agreeing delta times its weight, their sum and the weights' sum (float32
    inside, rounded once), the quotient and the base added."""
    dtype = base.dtype
    positive = model_sum(deltas, dtype).ge(0)
    terms, kept_weights = [], []
    for d, w in zip(deltas, weights.to(base.device)):
        agreeing = torch.where(positive, d > 0, d < 0).to(dtype).mul_(w)
        terms.append(d.mul_(agreeing))
        kept_weights.append(agreeing)
    del positive
    merged = model_sum(terms, dtype)
    return merged.div_(model_sum(kept_weights, dtype).clamp_(min=WEIGHT_EPS)).add_(base)


class Sce(ComputesInDtype, Strategy):
    name = "sce"
    summary = "select high-variance entries, weight models by their task vectors' mean square, erase minority signs"
    Params = SceParams
    needs_base = True
    uses_base = True
    identity_params = {"select_topk": 1.0}
    row_separable = True  # given the variance threshold and the mean squares

    def stats_passes(self, params, model_params, dtype) -> int:
        if params.select_topk <= 0.0:
            return 0
        return 3 if params.select_topk < 1.0 else 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if stats is None:
            stats = SceStats(params.select_topk, len(tensors))
        deltas = [t - base for t in tensors]
        if stats.selection is not None and pass_index < 2:
            var = variance(deltas)
            if pass_index == 0:
                stats.nonzero += int(torch.count_nonzero(var))
            stats.selection.fold(pass_index, float_bits(var.abs_()))
        else:
            stats.add_squares(stats.select_(deltas))
        return stats

    def finish_stats(self, pass_index, stats, params, model_params):
        if stats.selection is not None and pass_index < 2:
            stats.selection.finish(pass_index)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        if params.select_topk <= 0.0:
            return base
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        deltas = stats.select_(deltas_(tensors, base))
        if base.dtype in LOW_PRECISION:
            return erase_rounded(deltas, stats.weights_rounded(base.dtype), base)
        sign = torch.zeros_like(base)
        for d in deltas:
            sign.add_(d)
        sign = sign.ge_(0).mul_(2.0).sub_(1.0)  # +1 where the sum is >= 0, else -1
        total = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, stats.weights()):
            agrees = (d * sign).gt_(0)  # nonzero and of the elected sign
            divisor.add_(agrees, alpha=w)
            total.add_(d.mul_(agrees), alpha=w)
        return total.div_(divisor.clamp_(min=WEIGHT_EPS)).add_(base)
