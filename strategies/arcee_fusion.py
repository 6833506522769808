"""Arcee Fusion: keep only the changes of a fine-tune that stand out by importance.

Arcee AI, "Arcee Fusion" (arcee.ai, 2025; used for Arcee's Virtuoso models); mergekit 0.1.5's
`arcee_fusion`.

Semantics (mergekit's), per tensor, for the base and exactly one model: importance =
|model - base| * KL(p || q), where p = softmax(model) + 1e-8 and q = softmax(base) + 1e-8 along
the last dimension, the KL divergence summed along it (one value per row; one per tensor for a
1-D tensor). With Q1, the median and Q3 the quartiles of the importance over the whole tensor
(the floor(q (n - 1))-th smallest value, 0-based, no interpolation) and
threshold = median + 1.5 (Q3 - Q1), out = base + (model - base) where importance >= threshold,
else the base. Computed in the recipe's arithmetic dtype, as mergekit computes it, with
mergekit's ops in mergekit's order: in bfloat16 / float16 the difference, each softmax, the
divergence's terms and row sums, the importance and the threshold's steps are rounded to it where
mergekit's are, so the mask is the same. (mergekit multiplies the kept difference by a float32
mask and so returns float32 tensors, which it writes as such unless `out_dtype` is set; here the
result is the recipe's dtype, the same values as mergekit's cast to it.)

The quartiles are exact order statistics over row blocks (strategies.sparsify.OrderStatistics,
two statistics passes); the importance of a row depends on that row only, so matrices stream in
row blocks. A 1-D tensor is one softmax: its blocks are kept in the statistics (it is at most a
hidden size), and its quartiles found from the whole.

Difference from mergekit: for tensors above 1,000,000 entries mergekit estimates the quartiles
from 1,000,000 entries drawn with replacement from the global torch RNG (not reproducible from
the recipe); here they are exact, so the masks of such tensors differ in the entries near the
threshold. No parameters give the model back (identity_params = None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, check_model_count
from merge_lab.strategies.sparsify import OrderStatistics

EPS = 1e-8
QUARTILES = [0.25, 0.5, 0.75]


def row_divergence(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(model) + eps || softmax(base) + eps) along the last dimension, kept as a dimension."""
    p = F.softmax(model, dim=-1) + EPS
    q = F.softmax(base, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def importance(model: torch.Tensor, base: torch.Tensor, divergence: torch.Tensor | None = None) -> torch.Tensor:
    """|model - base| times the divergence of its row (or the given one, for a 1-D tensor)."""
    diff = (model - base).abs()
    return diff * (row_divergence(model, base) if divergence is None else divergence)


@dataclass
class FusionStats:
    quartiles: OrderStatistics = field(default_factory=lambda: OrderStatistics(QUARTILES))
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # a 1-D tensor's blocks
    divergence: torch.Tensor | None = None  # a 1-D tensor's one KL value
    threshold: torch.Tensor | None = None
    dtype: torch.dtype = torch.float32  # the importance's


class ArceeFusion(ComputesInDtype, Strategy):
    name = "arcee_fusion"
    summary = "the model's changes only where their KL-weighted importance is an upper outlier"
    needs_base = True
    uses_base = True
    symmetric = False
    max_models = 2  # the model, and the base when listed among models
    identity_params = None
    row_separable = True  # given the quartiles

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 1, 1)

    def stats_passes(self, params, model_params, dtype) -> int:
        return 2

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        stats = stats if stats is not None else FusionStats()
        model = tensors[0]
        stats.dtype = model.dtype
        if model.dim() == 1:
            if pass_index == 0:
                stats.parts.append((model.clone(), base.clone()))
        else:
            stats.quartiles.fold(pass_index, importance(model, base))
        return stats

    def finish_stats(self, pass_index, stats, params, model_params):
        if stats.parts:  # a 1-D tensor, now whole: its divergence and quartiles at once
            model, base = (torch.cat(p) for p in zip(*stats.parts))
            stats.parts = []
            stats.divergence = row_divergence(model, base)
            values = importance(model, base, stats.divergence)
            for p in (0, 1):
                stats.quartiles.fold(p, values)
                stats.quartiles.finish(p)
        elif stats.divergence is None:
            stats.quartiles.finish(pass_index)
        if pass_index == 1 and stats.quartiles.values:
            q1, median, q3 = (v.to(stats.dtype) for v in stats.quartiles.values)  # exact: they are its values
            stats.threshold = median + 1.5 * (q3 - q1)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        model = tensors[0]
        if stats.threshold is None:  # an empty tensor
            return base
        keep = importance(model, base, stats.divergence if model.dim() == 1 else None) >= stats.threshold
        return model.sub_(base).mul_(keep).add_(base)
