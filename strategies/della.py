"""DELLA: drop task-vector entries with probabilities by magnitude rank (MAGPRUNE), then combine.

Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", 2024 (arXiv 2406.11617).

Semantics (those of mergekit 0.1.5), per tensor and model: delta = theta - base. Within each row
(along dimension 1, as mergekit; a 1-D tensor is one row) of m entries, an entry of 0-based
ascending magnitude rank r is kept with probability
    p = density - epsilon + 2 epsilon r / (m - 1),
so from density - epsilon for the smallest to density + epsilon for the largest. density >= 1
keeps the delta whole, <= 0 drops it; in between density +- epsilon must lie strictly inside
(0, 1) (mergekit raises otherwise; our validation says which model and tensor). With `rescale`
(default true) the kept entries are scaled by ||delta||_1 / ||kept||_1 over the whole tensor
(mergekit's rescale, where the paper divides each entry by its p). Then:
- `della`: TIES' sign election and the disjoint mean (normalize, default true), times lambda;
- `della_linear`: out = base + lambda * sum_i w_i delta_i (/ sum_i w_i with `normalize`).

Where we differ: entries tied in magnitude share the lowest rank of the tie (mergekit's argsort
orders them arbitrarily); only zeros tie in practice and they add nothing whatever is kept. A
row of one entry is kept with probability density (mergekit divides by m - 1 = 0 and fails).
Masks come from ctx.generator (seeded by recipe seed, tensor and model), not the global RNG:
results match mergekit in distribution, not entry by entry.

Streaming: the ranks are within a row, so the drop is row-wise; the L1 factor needs the whole
tensor's mask, so one statistics pass draws the masks from copies of the generators merge()
will use (common.generator_copy) and sums both norms. A 1-D tensor is a single row: the pass
also keeps its sorted magnitudes (one row's worth), from which each block's ranks are found;
without `rescale` that is all the pass is for. With `rescale` the pass keeps each 2-D block's
mask as packed bits (one bit an entry, at most MASK_CACHE_ELEMENTS per model and tensor: 32 MiB,
so a 128256 x 2048 embedding or lm_head is ranked once too) for merge() to use instead of ranking and
drawing the block again; past that budget it notes the generator's state, and merge() resumes
drawing from there, so the masks are the same either way.
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, RescaledParams, SparseModel, generator_copy, merge_sparsified
from merge_lab.strategies.packed_masks import PackedMasks, packed_bytes
from merge_lab.strategies.sparsify import L1Rescale


class DellaModel(SparseModel):
    epsilon: float = Field(
        0.15,
        ge=0.0,
        description="spread of the keep probabilities: density - epsilon for a row's smallest magnitude, "
        "density + epsilon for its largest",
    )

    @model_validator(mode="after")
    def _probabilities_inside(self) -> DellaModel:
        d, e = self.density, self.epsilon
        if 0.0 < d < 1.0 and not (d - e > 0.0 and d + e < 1.0):
            raise ValueError(
                f"density {d:g} with epsilon {e:g} gives keep probabilities from {d - e:g} to {d + e:g}; "
                "they must lie strictly between 0 and 1: lower epsilon or move density"
            )
        return self


class DellaParams(RescaledParams):
    rescale: bool = Field(
        True, description="scale each pruned task vector back to its L1 norm before pruning (mergekit's rescale)"
    )


class DellaLinearParams(DellaParams):
    pass


class DellaTiesParams(DellaParams):
    normalize: bool = Field(True, description="divide by the summed weights of the agreeing models")


def prunes(p: DellaModel) -> bool:
    """Whether this model's task vector is sampled (not kept or zeroed whole)."""
    return 0.0 < p.density < 1.0


def tie_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based ascending rank within its row (the last dimension), tied entries sharing
    the lowest rank of their tie: `searchsorted(rows.sort().values, rows)` exactly, from one sort and
    a scatter (half the time: the binary searches cost as much as the sort)."""
    values, order = rows.sort(dim=-1)
    if rows.shape[-1] < 2:
        return torch.zeros_like(order)
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(order)
    # where a new value starts in sorted order, its position; within a tie, the tie's first position
    starts = torch.where(values[..., 1:] != values[..., :-1], positions[..., 1:], 0)
    starts = torch.cat([torch.zeros_like(starts[..., :1]), starts], dim=-1).cummax(dim=-1).values
    return torch.empty_like(order).scatter_(-1, order, starts)


# Entries ranked at once within a work unit: tie_ranks holds several int64 copies of what it ranks
# (sort order, tie starts, their running maximum, the scattered ranks), so a group of 2^18 entries
# keeps them near 10 MB, whatever the unit's size (the plan counts float32 temporaries only)
RANK_GROUP_ELEMENTS = 2**18


def keep_probabilities(
    delta: torch.Tensor, density: float, epsilon: float, sorted_magnitudes: torch.Tensor | None = None
) -> torch.Tensor:
    """MAGPRUNE's keep probability of each entry of (a block of rows of) delta; a 1-D delta (a
    block of a 1-D tensor) is ranked in `sorted_magnitudes`, the whole tensor's."""
    assert delta.dim() != 1 or sorted_magnitudes is not None
    m = sorted_magnitudes.numel() if delta.dim() == 1 else delta.shape[1]
    if m < 2:
        return torch.full_like(delta, density)
    scale, shift = 2.0 * epsilon / (m - 1), density - epsilon  # rank 0 -> density - eps, rank m-1 -> + eps
    magnitude = delta.abs()
    if delta.dim() == 1:
        return torch.searchsorted(sorted_magnitudes.to(delta.device), magnitude).to(delta.dtype).mul_(scale).add_(shift)
    rows = magnitude.movedim(1, -1).contiguous()
    out = torch.empty_like(delta)
    into = out.movedim(1, -1)  # a view: each group's probabilities land in delta's layout
    group = max(1, RANK_GROUP_ELEMENTS // (rows.numel() // rows.shape[0]))
    for s in range(0, rows.shape[0], group):  # the ranking's int64 temporaries stay a group's size
        into[s:s + group] = tie_ranks(rows[s:s + group]).to(delta.dtype).mul_(scale).add_(shift)
    return out


# Entries of one model's masks a statistics pass keeps per tensor for merge(), as packed bits:
# 2^28 entries are 32 MiB (held_bytes counts them in the plan's predicted peak)
MASK_CACHE_ELEMENTS = 2**28


class MagPrune:
    """One model's statistics: a copy of its generator, its L1 norms before and after pruning, and
    for a 1-D tensor its sorted magnitudes (plus its draws, kept until the ranks are known)."""

    def __init__(self, generator: torch.Generator, rescale: bool) -> None:
        self.generator = generator
        self.rescale = rescale
        self.norms = L1Rescale()
        self.flat: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # 1-D blocks: (delta, draws)
        self.sorted_magnitudes: torch.Tensor | None = None
        self.masks = PackedMasks()  # 2-D blocks' masks, in fold order, for merge() to take back
        self.cached = 0
        self.resume_state: torch.Tensor | None = None  # generator state at the first block not cached

    def fold(self, delta: torch.Tensor, p: DellaModel) -> None:
        if delta.dim() == 1:  # ranks need the whole tensor: decide in finish()
            draws = torch.rand(delta.shape, generator=self.generator, device=delta.device) if self.rescale else None
            self.flat.append((delta, draws))
        elif self.rescale:
            caching = self.resume_state is None and self.cached + delta.numel() <= MASK_CACHE_ELEMENTS
            if not caching and self.resume_state is None:
                self.resume_state = self.generator.get_state()
            keep = torch.rand(delta.shape, generator=self.generator, device=delta.device)
            keep = keep.lt_(keep_probabilities(delta, p.density, p.epsilon))
            self.norms.add(delta, delta * keep)
            if caching:
                self.masks.add(keep)
                self.cached += delta.numel()

    def keep_mask(self, delta: torch.Tensor, p: DellaModel, generator: torch.Generator) -> torch.Tensor:
        """This block's mask: the one fold() kept, or drawn from `generator` (merge()'s own, set to
        where fold() stopped keeping masks)."""
        if self.masks.entries:
            return self.masks.take(delta.shape)
        if self.resume_state is not None:
            generator.set_state(self.resume_state)
            self.resume_state = None
        keep = torch.rand(delta.shape, generator=generator, device=delta.device)
        return keep.lt_(keep_probabilities(delta, p.density, p.epsilon, self.sorted_magnitudes))

    def finish(self, p: DellaModel) -> None:
        self.masks.close()
        if not self.flat:
            return
        whole = torch.cat([d for d, _ in self.flat])
        self.sorted_magnitudes = whole.abs().sort().values
        if self.rescale:
            draws = torch.cat([u for _, u in self.flat])
            keep = draws.lt_(keep_probabilities(whole, p.density, p.epsilon, self.sorted_magnitudes))
            self.norms.add(whole, whole * keep)
        self.flat = []


class _Della(ComputesInDtype, Strategy):  # in the arithmetic dtype, rounded as mergekit's (common.combine)
    ModelParams = DellaModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}
    row_separable = True  # given the L1 norms (and a 1-D tensor's sorted magnitudes)
    sign_consensus = False

    def stats_passes(self, params, model_params, dtype) -> int:
        return 1 if any(prunes(p) for p in model_params) else 0

    def held_bytes(self, numel, params, model_params, dtype) -> int:
        """With rescale, each pruning model's kept masks (packed bits), up to MASK_CACHE_ELEMENTS a tensor."""
        if not params.rescale:
            return 0
        return sum(packed_bytes(min(numel, MASK_CACHE_ELEMENTS)) for p in model_params if prunes(p))

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if stats is None:
            stats = [
                MagPrune(generator_copy(ctx.generator(i, base.device)), params.rescale) if prunes(p) else None
                for i, p in enumerate(model_params)
            ]
        for t, p, prune in zip(tensors, model_params, stats):
            if prune is not None:
                prune.fold(t - base, p)
        return stats

    def finish_stats(self, pass_index, stats, params, model_params):
        for prune, p in zip(stats, model_params):
            if prune is not None:
                prune.finish(p)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        norms = [None if prune is None else prune.norms for prune in stats] if params.rescale and stats else ()

        def prune_(i: int, delta: torch.Tensor) -> torch.Tensor:
            return delta.mul_(stats[i].keep_mask(delta, model_params[i], ctx.generator(i, delta.device)))

        return merge_sparsified(tensors, base, params, model_params, prune_, self.sign_consensus, norms)


class Della(_Della):
    name = "della"
    summary = "drop task-vector entries with probabilities by magnitude rank (MAGPRUNE), then TIES"
    Params = DellaTiesParams
    sign_consensus = True


class DellaLinear(_Della):
    name = "della_linear"
    summary = "drop task-vector entries with probabilities by magnitude rank (MAGPRUNE), then weighted sum"
    Params = DellaLinearParams
