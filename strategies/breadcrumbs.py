"""Model Breadcrumbs: cut both tails of each task vector, then combine linearly or with TIES.

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024 (arXiv 2312.06795).

Semantics (those of mergekit 0.1.5), per tensor and model: delta = theta - base, n its entries.
With density < 1, mergekit's counts are target = int(density n) entries kept, n_top =
int(gamma n) outliers, n_bot = max(0, n - target - n_top) smallest entries; in ascending
magnitude order the kept entries are those of rank n_bot .. n_bot + target - 1. So the
gamma share of largest magnitudes goes first, then the smallest until `density` is left; when
density + gamma > 1 fewer outliers go, so that the target is kept. density >= 1 keeps the whole
delta (gamma then has no effect); a target of 0 keeps nothing. With `rescale` the kept entries
are scaled back to the delta's L1 norm (mergekit's rescale, off by default). Then:
- `breadcrumbs`: out = base + lambda * sum_i w_i delta_i (/ sum_i w_i with `normalize`);
- `breadcrumbs_ties`: TIES' sign election (the sign of sum_i w_i delta_i) and the sum of the
  agreeing weighted deltas, divided by the agreeing weights' sum only with `normalize`
  (mergekit's default for it is false, unlike `ties`).

The band is found by value: the magnitudes at the two boundary ranks, both exact by radix
select (sparsify.RankThreshold). Entries tied with a boundary are all kept, where mergekit's sort
keeps an arbitrary subset of the tie; in float32 task vectors only zeros tie in practice, and a
zero adds nothing either way (in bfloat16, with 8-bit mantissas, equal magnitudes are common).
Computed in the recipe's arithmetic dtype, rounded as mergekit rounds (common.combine). The boundaries and the L1 norms are statistics gathered over row
blocks (two passes, three with `rescale`); the cut is then elementwise, and the engine streams
every tensor in row blocks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, RescaledParams, SparseModel, merge_sparsified
from merge_lab.strategies.sparsify import L1Rescale, RankThreshold, magnitude_bits


class BreadcrumbsModel(SparseModel):
    gamma: float = Field(
        0.01, ge=0.0, le=1.0, description="share of the largest-magnitude entries dropped as outliers"
    )


class BreadcrumbsParams(RescaledParams):
    pass


def cuts(p: BreadcrumbsModel) -> bool:
    """Whether this model's task vector is cut (density < 1; density <= 0 zeroes it whole)."""
    return 0.0 < p.density < 1.0


class OutlierCut:
    """The magnitude band breadcrumbs keeps of one task vector: its boundary ranks follow from the
    entry count (pass 0), their values from a radix select (passes 0 and 1)."""

    def __init__(self, density: float, gamma: float) -> None:
        self.density, self.gamma = density, gamma
        self.largest_kept = RankThreshold(lambda n: self._ranks(n)[0])
        self.smallest_kept = RankThreshold(lambda n: self._ranks(n)[1])
        self.norms = L1Rescale()

    def _ranks(self, n: int) -> tuple[int, int]:
        """(k of the largest kept, k of the smallest kept), as k-th largest; 0 when none is kept."""
        target, n_top = int(self.density * n), int(self.gamma * n)
        n_bot = max(0, n - target - n_top)
        return (n - n_bot - target + 1, n - n_bot) if target > 0 else (0, 0)

    def fold(self, pass_index: int, bits: torch.Tensor) -> None:
        self.largest_kept.fold(pass_index, bits)
        self.smallest_kept.fold(pass_index, bits)

    def finish(self, pass_index: int) -> None:
        self.largest_kept.finish(pass_index)
        self.smallest_kept.finish(pass_index)

    def cut_(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the entries of (a block of) delta outside the band."""
        if self.largest_kept.empty:
            return delta.zero_()
        high, low = self.largest_kept.value, self.smallest_kept.value
        if high is None or low is None:  # an empty tensor
            return delta
        magnitude = delta.abs()
        outside = magnitude.gt(high.to(delta.device)).logical_or_(magnitude.lt(low.to(delta.device)))
        return delta.masked_fill_(outside, 0.0)


class Breadcrumbs(ComputesInDtype, Strategy):
    name = "breadcrumbs"
    summary = "drop each task vector's largest (gamma) and smallest entries to density, then weighted sum"
    Params = BreadcrumbsParams
    ModelParams = BreadcrumbsModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}
    row_separable = True  # given the band boundaries and the L1 norms
    sign_consensus = False

    def stats_passes(self, params, model_params, dtype) -> int:
        if not any(cuts(p) for p in model_params):
            return 0
        return 3 if params.rescale else 2

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if stats is None:
            stats = [OutlierCut(p.density, p.gamma) if cuts(p) else None for p in model_params]
        for t, band in zip(tensors, stats):
            if band is None:
                continue
            if pass_index < 2:
                band.fold(pass_index, magnitude_bits(t, base))
            else:
                delta = t - base
                band.norms.add(delta, band.cut_(delta.clone()))
        return stats

    def finish_stats(self, pass_index, stats, params, model_params):
        if pass_index < 2:
            for band in stats:
                if band is not None:
                    band.finish(pass_index)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        norms = [None if band is None else band.norms for band in stats] if params.rescale and stats else ()

        def cut_(i: int, delta: torch.Tensor) -> torch.Tensor:
            return stats[i].cut_(delta)

        return merge_sparsified(tensors, base, params, model_params, cut_, self.sign_consensus, norms)


class BreadcrumbsTies(Breadcrumbs):
    name = "breadcrumbs_ties"
    summary = "breadcrumbs' two-tailed cut, then TIES sign election (sum, or mean with normalize)"
    sign_consensus = True
