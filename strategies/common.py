"""Tensor operations shared by the delta-based strategies (task arithmetic, TIES, DARE): their
parameters, the task vectors, `combine` and the sparsifying loop; which entries a method keeps
is strategies.sparsify's.

All work in place on tensors the engine already copied for this merge, so a merge of N models
holds N input tensors plus a few temporaries, never N stacked copies on top. The tensors are
float32, or bfloat16 / float16 where a recipe computes in that dtype as mergekit does
(Strategy.working_dtype): then `combine` and the rescale round where mergekit's arithmetic rounds
(strategies.low_precision), and the selections rank the low-precision values exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.strategies.low_precision import LOW_PRECISION, combine_rounded
from merge_lab.strategies.sparsify import L1Rescale

# Parameter models refuse NaN and infinities (YAML's .nan, .inf): no merge is meant with them.
PARAMS_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class WeightedModel(BaseModel):
    model_config = PARAMS_CONFIG
    weight: float = Field(1.0, description="scale of this model's task vector (theta_i - base)")


class SparseModel(WeightedModel):
    density: float = Field(
        1.0, ge=0.0, le=1.0, description="share of this model's task vector kept (0 drops it all, as in mergekit)"
    )


class TaskArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = Field(False, description="divide the combined task vector by the sum of the weights")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; masks here are boolean already")


class ComputesInDtype:
    """Mixin of strategies whose mergekit counterpart (generalized task arithmetic) computes in the
    tensors' dtype: merge() gets the inputs in the recipe's arithmetic dtype, not float32."""

    def working_dtype(self, arithmetic: torch.dtype) -> torch.dtype:
        return arithmetic


def weights_problem(weights: list[float], normalize: bool, disjoint: bool = False) -> str | None:
    """Why these per-model weights make no merge, or None. `disjoint`: `normalize` divides each
    entry by the summed weights of the models that agree on its sign (TIES' disjoint mean)."""
    listed = ", ".join(f"{w:g}" for w in weights)
    if normalize and disjoint and any(w < 0 for w in weights):
        return (
            f"normalize divides by the summed weights of the agreeing models, which a negative weight ({listed}) "
            "can bring to zero or below. Set normalize: false to subtract a task vector."
        )
    if normalize and abs(sum(weights)) < 1e-8:
        return f"the weights ({listed}) sum to zero and normalize divides by their sum. Set normalize: false or change the weights."
    return None


def deltas_(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """theta_i - base, in place."""
    for t in tensors:
        t.sub_(base)
    return tensors


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
    by the sum of the weights of the contributing models (the disjoint mean). In bfloat16 /
    float16, rounded as mergekit's arithmetic in that dtype (low_precision.combine_rounded).
    """
    if base.dtype in LOW_PRECISION:
        return combine_rounded(deltas, weights, base, lam, normalize, sign_consensus)
    for d, w in zip(deltas, weights):
        if w != 1.0:  # x * 1 == x: skip the pass
            d.mul_(w)
    if not deltas:
        total = torch.zeros_like(base)
    else:  # without sign consensus the deltas are not needed again: sum into the first in place
        total = deltas[0].clone() if sign_consensus else deltas[0]
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


def merge_sparsified(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    params: TaskArithmeticParams,
    model_params: list[SparseModel],
    sparsify_: Callable[[int, torch.Tensor], object],
    sign_consensus: bool,
    norms: Sequence[L1Rescale | None] = (),
) -> torch.Tensor:
    """The loop of mergekit's sparsifying task arithmetic (TIES, DARE, breadcrumbs, DELLA), so that each
    method states only its rule: per model, delta_i = theta_i - base, zeroed at density <= 0, kept
    whole at density >= 1, else sparsified in place by `sparsify_(i, delta_i)` and, where
    `norms[i]` is given (the method's `rescale`), scaled back to its L1 norm; then `combine`."""
    deltas = deltas_(tensors, base)
    for i, (d, p) in enumerate(zip(deltas, model_params)):
        if p.density <= 0.0:
            d.zero_()
        elif p.density < 1.0:
            sparsify_(i, d)
            rescale = norms[i] if norms else None
            if rescale is not None:
                rescale.rescale_(d)
    weights = [p.weight for p in model_params]
    return combine(deltas, weights, base, params.lambda_, params.normalize, sign_consensus)


# -- helpers of the geometric strategies (nuslerp, multislerp, karcher, arcee_fusion, ram)

# Sums are taken over sub-blocks of this many elements converted to float64: small enough to stay
# in cache and in the allocator's reused memory (1M-element sub-blocks took 5x the CPU time), and
# memory stays bounded even when a whole embedding comes at once.
GRAM_ELEMENTS = 1 << 16


def gram(tensors: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix G[i, j] = t_i . t_j of flattened tensors (or row blocks of them),
    added to `into`: the statistics of every method that only needs norms and angles."""
    flat = [t.reshape(-1) for t in tensors]
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64) if into is None else into
    n = flat[0].numel() if flat else 0
    for i in range(0, n, GRAM_ELEMENTS):
        block = torch.stack([f[i : i + GRAM_ELEMENTS] for f in flat]).double()
        total += (block @ block.T).cpu()
    return total


def check_model_count(recipe, method: str, low: int, high: int | None) -> None:
    """Raise MergeLabError unless the recipe has between low and high models besides its base."""
    from merge_lab.errors import MergeLabError

    others = [m for m in recipe.models if m.model != recipe.base_model]
    if len(others) < low or (high is not None and len(others) > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise MergeLabError(
            f"{recipe.where('models')}: '{method}' takes {wanted} model(s) besides the base, got {len(others)}; "
            "change the list under `models:`."
        )


# -- the rescaling methods' parameters (breadcrumbs, DELLA, DARE) and their statistics passes' generators


class RescaledParams(TaskArithmeticParams):
    rescale: bool = Field(
        False, description="scale each sparsified task vector back to the L1 norm it had before (mergekit's rescale)"
    )


def generator_copy(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state. A statistics pass draws from a copy of ctx.generator(i) the
    masks merge() will draw later (e.g. to know their L1 norm), leaving merge()'s stream untouched."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
