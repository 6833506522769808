"""RAM and RAM+ (tensor-local): merge task vectors by whether one model or several changed an entry.

"Reinforced Agent Merging" (arXiv 2601.13572); mergekit 0.1.5's `ram` and `ramplus_tl`.

Semantics (mergekit's), per tensor: delta_i = theta_i - base; an entry of delta_i counts when
|delta_i| > epsilon (the others are dropped). Where exactly one model's entry counts it is taken
whole; where several count, their mean; where none, the base's value. out = base + that.

`ramplus_tl` (RAM+, tensor-local) also rescales each model's unique entries by
lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), where over the whole
tensor unique_i counts the entries only model i changed and shared_i those it changed together
with another model: a model whose changes overlap others' a lot gets its few unique ones boosted.

Difference from mergekit: with epsilon = 0 and a model that changes nothing in a tensor, mergekit
computes lambda_i = 0 / 0 and the whole tensor becomes NaN; here lambda_i of a model with no
unique entries multiplies nothing, so the tensor is merged as usual.

`ram` is elementwise; `ramplus_tl` needs the per-model counts, integers gathered in one
statistics pass over row blocks, so both stream every tensor in row blocks.

`ram` computes in the recipe's arithmetic dtype as mergekit does (in bfloat16: each shared entry
divided by its count and rounded, the models' terms summed in float32 and rounded once: mergekit's
bits). So does `ramplus_tl` up to its boost: the deltas, masks and shared means are rounded to
the dtype as mergekit's are; the boost lambda_i is mergekit's float32 factor (float32 counts,
quotient, clamp and product), and, as in mergekit, a unique entry times it is a float32 term,
the terms are summed over the models in float32 and the base added in float32, rounded once to
the dtype at the end (mergekit returns those float32 sums and writes them as float32 unless
`out_dtype` is set; here the result is the recipe's dtype: mergekit's values cast to it).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, check_model_count
from merge_lab.strategies.low_precision import LOW_PRECISION


class RamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(1e-5, ge=0.0, description="a delta entry counts as changed when its magnitude exceeds this")


class RamPlusParams(RamParams):
    r: float = Field(0.1, ge=0.0, description="strength of the boost of a model's unique entries")
    alpha: float = Field(0.2, ge=0.0, description="cap on the shared / unique ratio that sets the boost")


def changed(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float):
    """The deltas (in place) with unchanged entries zeroed, each one's mask, and the per-entry count."""
    masks = []
    for t in tensors:
        t.sub_(base)
        mask = t.abs() > epsilon
        t.mul_(mask)
        masks.append(mask)
    counts = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    for mask in masks:
        counts.add_(mask)
    return tensors, masks, counts


def boosts(shared: list[int], unique: list[int], params) -> torch.Tensor:
    """RAM+'s lambda_i per model as mergekit computes it: float32 from the integer counts (a model
    with no unique entry gets 1: its factor multiplies nothing)."""
    s, u = torch.tensor(shared, dtype=torch.int64), torch.tensor(unique, dtype=torch.int64)
    factor = 1 + params.r * (s / u.clamp(min=params.epsilon)).clamp(min=0, max=params.alpha)
    return torch.where(u > 0, factor, 1.0)


def combine_ram(deltas, counts, base: torch.Tensor, unique_scales: list[float] | None = None) -> torch.Tensor:
    """base + the unique entries (each scaled by its model's factor) + the mean of the shared ones."""
    unique = counts == 1
    if base.dtype in LOW_PRECISION:  # as mergekit rounds: each d / count, one float32 sum
        shared_entries, count = counts > 1, counts.clamp(min=1)
        merged = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
        for i, d in enumerate(deltas):
            own = d if unique_scales is None else d.float().mul_(unique_scales[i])  # float32, as mergekit's
            merged.add_(torch.where(unique, own, torch.where(shared_entries, d / count, 0.0)))
        if unique_scales is None:
            return merged.to(base.dtype).add_(base)
        return merged.add_(base)  # mergekit adds the float32 sum to the base in float32
    shared = torch.zeros_like(base)
    total = torch.zeros_like(base)
    for i, d in enumerate(deltas):
        scale = 1.0 if unique_scales is None else unique_scales[i]
        total.add_(torch.where(unique, d, 0.0), alpha=scale)
        shared.add_(d)
    shared.masked_fill_(counts <= 1, 0.0).div_(counts.clamp(min=1))
    return total.add_(shared).add_(base)


class _RamBase(Strategy):
    needs_base = True
    uses_base = True
    identity_params = {"epsilon": 0.0}  # every change of the one model counts
    row_separable = True

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 1, None)


class Ram(ComputesInDtype, _RamBase):
    name = "ram"
    summary = "unique task-vector entries kept whole, entries several models changed averaged"
    Params = RamParams

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        deltas, _, counts = changed(tensors, base, params.epsilon)
        return combine_ram(deltas, counts, base)


class RamPlusTensorLocal(ComputesInDtype, _RamBase):
    name = "ramplus_tl"
    summary = "RAM with each model's unique entries boosted by its share of overlapping changes"
    Params = RamPlusParams

    def stats_passes(self, params, model_params, dtype) -> int:
        return 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        shared, unique = stats if stats is not None else ([0] * len(tensors), [0] * len(tensors))
        _, masks, counts = changed([t.clone() for t in tensors], base, params.epsilon)
        for i, mask in enumerate(masks):
            shared[i] += int(mask.logical_and(counts > 1).sum())
            unique[i] += int(mask.logical_and(counts == 1).sum())
        return shared, unique

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        scales = boosts(*stats, params).tolist()
        deltas, _, counts = changed(tensors, base, params.epsilon)
        return combine_ram(deltas, counts, base, scales)
