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


# Tensors at least this large find TIES' threshold by a sampled bracket, then an exact selection
# among the few entries inside it; smaller ones call kthvalue directly.
_BRACKET_MIN = 1 << 23
_SAMPLE = 1 << 16


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a flat tensor, exactly as torch.kthvalue gives it.

    kthvalue is an O(n) selection, but a single-threaded one that copies its input. For large
    tensors we bracket the answer with a strided sample, count what lies below the bracket and
    select among the entries inside it (about 1% of them), in a few multi-threaded passes; if the
    bracket misses (odd data), we fall back to kthvalue over everything.
    """
    n = values.numel()
    if n < _BRACKET_MIN:
        return torch.kthvalue(values, k).values
    sample = values[:: n // _SAMPLE]
    m = sample.numel()
    q = k / n
    margin = 6.0 * (q * (1.0 - q) / m) ** 0.5 + 8.0 / m
    lo_rank = max(1, int((q - margin) * m))
    hi_rank = min(m, int((q + margin) * m) + 1)
    lo = torch.kthvalue(sample, lo_rank).values if q - margin > 0 else None
    hi = torch.kthvalue(sample, hi_rank).values if q + margin < 1 else None
    below = int((values < lo).sum()) if lo is not None else 0
    if lo is None and hi is None:
        return torch.kthvalue(values, k).values
    if lo is None:
        inside = values <= hi
    elif hi is None:
        inside = values >= lo
    else:
        inside = (values >= lo).logical_and_(values <= hi)
    candidates = values[inside]
    if below < k <= below + candidates.numel():
        return torch.kthvalue(candidates, k - below).values
    return torch.kthvalue(values, k).values


def trim_topk_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries largest in magnitude (at least one), zero the rest.

    Uses a selection for the threshold (kth_smallest), not a full sort. Entries tied with the
    threshold are all kept.
    """
    n = delta.numel()
    if density >= 1.0 or n == 0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    k = max(1, int(density * n))
    magnitude = delta.abs().reshape(-1)
    threshold = kth_smallest(magnitude, n - k + 1)
    delta.masked_fill_(magnitude.view(delta.shape) < threshold, 0.0)
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
    total = deltas[0].clone() if deltas else torch.zeros_like(base)
    for d in deltas[1:]:
        total.add_(d)
    if not sign_consensus:
        if normalize:
            s = sum(weights)
            total.div_(s if abs(s) >= 1e-8 else 1.0)
    else:
        # elected sign s = +1 where the weighted sum is >= 0, else -1; a delta agrees where d * s > 0.
        # Summing clamp(d * s, min=0) and multiplying by s at the end adds exactly the agreeing
        # deltas (multiplying by +-1 is exact), with no boolean masks or where() per model.
        sign = total.ge_(0).mul_(2.0).sub_(1.0)
        total = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weights):
            d.mul_(sign)
            if divisor is not None:
                divisor.add_(d > 0, alpha=w)
            total.add_(d.clamp_(min=0.0))
        total.mul_(sign)
        del sign
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            total.div_(divisor)
    if lam != 1.0:
        total.mul_(lam)
    return total.add_(base)
