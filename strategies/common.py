"""Tensor operations shared by the delta-based strategies (task arithmetic, TIES, DARE).

All work in place on float32 tensors the engine already copied for this merge, so a merge of
N models holds N input tensors plus a few temporaries, never N stacked copies on top.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field


class WeightedModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="scale of this model's task vector (theta_i - base)")


class SparseModel(WeightedModel):
    density: float = Field(1.0, ge=0.0, le=1.0, description="share of this model's task vector kept")


class TaskArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = Field(False, description="divide the combined task vector by the sum of the weights")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; masks here are boolean already")


def deltas_(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """theta_i - base, in place."""
    for t in tensors:
        t.sub_(base)
    return tensors


def trim_topk_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries largest in magnitude (at least one), zero the rest.

    Uses a selection (kthvalue) for the threshold, not a full sort: O(n) instead of O(n log n).
    Entries tied with the threshold are all kept.
    """
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    k = max(1, int(density * n))
    magnitude = delta.abs().reshape(-1)
    threshold = torch.kthvalue(magnitude, n - k + 1).values
    delta.masked_fill_(delta.abs() < threshold, 0.0)
    return delta


def dare_drop_(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """Drop each entry with probability 1 - density; rescale survivors by 1/density (DARE)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    lam: float,
    normalize: bool,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + lam * (sum_i w_i delta_i) / divisor, optionally over sign-agreeing entries only (TIES).

    With `sign_consensus`, the elected sign of each entry is the sign of sum_i w_i delta_i (ties
    go to +); only entries whose weighted delta has that sign contribute, and `normalize` divides
    by the sum of the weights of the contributing models (the disjoint mean).
    """
    for d, w in zip(deltas, weights):
        d.mul_(w)
    total = torch.zeros_like(base)
    for d in deltas:
        total.add_(d)
    if not sign_consensus:
        if normalize:
            s = sum(weights)
            total.div_(s if abs(s) >= 1e-8 else 1.0)
    else:
        positive = total >= 0
        total.zero_()
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weights):
            agree = torch.where(positive, d > 0, d < 0)
            total.add_(d * agree)
            if divisor is not None:
                divisor.add_(agree, alpha=w)
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            total.div_(divisor)
    if lam != 1.0:
        total.mul_(lam)
    return total.add_(base)
