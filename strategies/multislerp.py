"""Multi-SLERP: a weighted interpolation of any number of models on the hypersphere.

C. Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea, 2025); mergekit
0.1.5's `multislerp`.

Semantics (mergekit's), per tensor, each taken as one flat vector: x_i = theta_i - base (or
theta_i without a base); weights w_i, divided by their sum when `normalize_weights`; unit
vectors u_i = x_i / (|x_i| + eps); mean m = sum_i w_i u_i. mergekit then maps the weighted
tangent vectors at m/|m| back with the exponential map; their weighted sum is exactly zero
(sum_i w_i (u_i - (u_i . m^) m^) = m - |m| m^), so that step leaves m/|m| scaled by cos(eps),
and out = base + cos(eps) * (sum_i w_i |x_i|) * m / |m|. One model gives that model back.
Where |m| < eps (e.g. opposite task vectors with equal weights) two models are averaged
linearly, base + w_0 x_0 + w_1 x_1, and more models are an error, as in mergekit.

Everything depends on the tensors only through their Gram matrix x_i . x_j, gathered in float64
in one statistics pass over row blocks; the result is then a weighted sum of the x_i, so every
tensor streams in row blocks.

Differences from mergekit: mergekit requires a `weight` for every model; here it defaults to 1
(equal weights). Weights summing to zero with `normalize_weights` are an error here (mergekit
divides by zero and writes NaN). The noise of the tangent step (float32 rounding, about 1e-7 of
the result) is not reproduced.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.errors import MergeLabError
from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import check_model_count, gram


class SphereWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="this model's weight in the interpolation (mergekit requires it)")


class MultiSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, ge=0.0, description="added to the norms before dividing by them")


def task_vectors(tensors: list[torch.Tensor], base: torch.Tensor | None, in_place: bool) -> list[torch.Tensor]:
    """theta_i - base (in place, or as new tensors), or the tensors themselves without a base."""
    if base is None:
        return tensors
    return [t.sub_(base) if in_place else torch.sub(t, base) for t in tensors]


class MultiSlerp(Strategy):
    name = "multislerp"
    summary = "weighted spherical interpolation of any number of models (or task vectors)"
    Params = MultiSlerpParams
    ModelParams = SphereWeight
    uses_base = True
    identity_params = {"weight": 1.0}
    row_separable = True  # given the Gram matrix

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 1, None)

    def stats_passes(self, params, model_params) -> int:
        return 1 if len(model_params) > 1 else 0

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        return gram(task_vectors(tensors, base, in_place=False), stats)

    def coefficients(self, g: torch.Tensor, params, model_params, ctx: TensorContext) -> list[float]:
        """c_i such that out = base + sum_i c_i x_i."""
        w = [p.weight for p in model_params]
        if params.normalize_weights:
            total = sum(w)
            if total == 0.0:
                raise MergeLabError(
                    f"tensor '{ctx.name}': multislerp's weights sum to zero, so they cannot be normalized; "
                    "change the weights or set normalize_weights: false."
                )
            w = [x / total for x in w]
        norms = g.diagonal().clamp(min=0.0).sqrt()
        c = torch.tensor(w, dtype=torch.float64) / (norms + params.eps)
        mean_norm = math.sqrt(max(float(c @ g @ c), 0.0))
        if mean_norm < params.eps:
            if len(w) == 2:
                return w
            raise MergeLabError(
                f"tensor '{ctx.name}': the weighted unit task vectors of multislerp sum to zero (opposite "
                "tensors with weights that cancel); change the weights."
            )
        scale = math.cos(params.eps) * float(torch.tensor(w, dtype=torch.float64) @ norms) / mean_norm
        return (c * scale).tolist()

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        g = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        coefficients = self.coefficients(g, params, model_params, ctx)
        x = task_vectors(tensors, base, in_place=True)
        out = x[0].mul_(coefficients[0])
        for t, c in zip(x[1:], coefficients[1:]):
            out.add_(t, alpha=c)
        return out.add_(base) if base is not None else out
