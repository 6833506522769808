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

In bfloat16 / float16 (the recipe's arithmetic dtype, as in mergekit) the steps run as
mergekit's ops run them in that dtype, each rounded: the weights, the norms, the unit vectors,
their weighted mean and its norm, the mean's direction, each unit vector's dot product with it,
the tangent vectors, their weighted sum and its norm, the exponential map and the scale. Four of
those are whole-tensor reductions, each needing the one before it rounded, so such a tensor
takes four statistics passes over its row blocks (strategies.low_precision says how a stream
reproduces a 16-bit reduction).

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
from merge_lab.strategies.common import ComputesInDtype, check_model_count, gram
from merge_lab.strategies.low_precision import (
    LOW_PRECISION,
    reduced,
    reduced_norm,
    sum_of_squares,
    summed,
)


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


ROUNDED_PASSES = 4  # norms, the mean's norm, the dot products, the tangent's norm


def stacked(tensors: list[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The (task) vectors of a block as one (models, entries) matrix, as mergekit stacks them."""
    x = torch.stack([t.reshape(-1) for t in tensors])
    return x.sub_(base.reshape(1, -1)) if base is not None else x


class RoundedSphere:
    """A 16-bit tensor's statistics, one rounded whole-tensor reduction per pass (float64 sums
    over the row blocks until then), and the steps between them, applied to one block."""

    def __init__(self, weights: torch.Tensor, eps: float) -> None:
        self.dtype = weights.dtype
        self.eps = eps
        self.weights = weights  # (models,), in dtype, normalized as mergekit does
        self.sums: list[torch.Tensor] = []  # the pass's float64 partial sums
        self.norms: torch.Tensor | None = None  # (models, 1)
        self.mean_norm: torch.Tensor | None = None
        self.dots: torch.Tensor | None = None  # (models, 1)
        self.tangent_norm: torch.Tensor | None = None

    def units(self, x: torch.Tensor) -> torch.Tensor:
        return x / (self.norms.to(x.device) + self.eps)

    def mean(self, units: torch.Tensor) -> torch.Tensor:
        return (units * self.weights.to(units.device).view(-1, 1)).sum(0)

    def direction(self, units: torch.Tensor) -> torch.Tensor:
        return self.mean(units) / self.mean_norm.to(units.device)

    def tangent(self, units: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        tangents = units - self.dots.to(units.device) * direction
        return (tangents * self.weights.to(units.device).view(-1, 1)).sum(0)

    def fold(self, pass_index: int, x: torch.Tensor) -> None:
        if pass_index == 0:
            part = sum_of_squares(x, 1)
        else:
            units = self.units(x)
            if pass_index == 1:
                part = sum_of_squares(self.mean(units))
            elif pass_index == 2:
                part = summed(units * self.direction(units), 1)
            else:
                part = sum_of_squares(self.tangent(units, self.direction(units)))
        self.sums.append(part.cpu())

    def finish(self, pass_index: int) -> None:
        total = torch.stack(self.sums).sum(0) if self.sums else torch.zeros((), dtype=torch.float64)
        self.sums = []
        if pass_index == 0:
            self.norms = reduced_norm(total, self.dtype).reshape(-1, 1)
        elif pass_index == 1:
            self.mean_norm = reduced_norm(total, self.dtype)
        elif pass_index == 2:
            self.dots = reduced(total, self.dtype).reshape(-1, 1)
        else:
            self.tangent_norm = reduced_norm(total, self.dtype) + self.eps

    def merged(self, x: torch.Tensor) -> torch.Tensor:
        """The block's result without the base: the exponential map of the tangent at the mean's
        direction, scaled by the weighted norms."""
        units = self.units(x)
        direction = self.direction(units)
        tangent = self.tangent(units, direction)
        tn = self.tangent_norm.to(x.device)
        result = direction * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
        return result * (self.norms.squeeze(-1) * self.weights).sum().to(x.device)


class MultiSlerp(ComputesInDtype, Strategy):  # 16 bits as mergekit's, more passes (stats_passes)
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

    def stats_passes(self, params, model_params, dtype) -> int:
        if len(model_params) <= 1:
            return 0
        return ROUNDED_PASSES if dtype in LOW_PRECISION else 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if tensors[0].dtype in LOW_PRECISION:
            if stats is None:
                stats = RoundedSphere(self.weights_rounded(tensors[0].dtype, params, model_params, ctx), params.eps)
            if stats.mean_norm is None or stats.mean_norm >= params.eps:  # else: linear, nothing more to know
                stats.fold(pass_index, stacked(tensors, base))
            return stats
        return gram(task_vectors(tensors, base, in_place=False), stats)

    def finish_stats(self, pass_index, stats, params, model_params):
        if isinstance(stats, RoundedSphere) and (stats.mean_norm is None or stats.mean_norm >= params.eps):
            stats.finish(pass_index)
        return stats

    def weights_rounded(self, dtype: torch.dtype, params, model_params, ctx: TensorContext) -> torch.Tensor:
        """The weights as a tensor of the dtype, divided by their sum (rounded) when normalizing."""
        w = torch.tensor([p.weight for p in model_params], dtype=dtype)
        if not params.normalize_weights:
            return w
        total = w.sum()
        if float(total) == 0.0:
            raise MergeLabError(
                f"tensor '{ctx.name}': multislerp's weights sum to zero in {str(dtype).removeprefix('torch.')}, "
                "so they cannot be normalized; change the weights or set normalize_weights: false."
            )
        return w / total

    def merge_rounded(self, tensors, base, params, stats: RoundedSphere, ctx: TensorContext) -> torch.Tensor:
        """The 16-bit merge of a block, given its tensor's statistics (RoundedSphere)."""
        x = stacked(tensors, base)
        if stats.mean_norm < params.eps:
            if len(tensors) != 2:
                raise MergeLabError(
                    f"tensor '{ctx.name}': the weighted unit task vectors of multislerp sum to zero (opposite "
                    "tensors with weights that cancel); change the weights."
                )
            w = stats.weights.to(x.device)
            out = x[0] * w[0] + x[1] * w[1]
        elif stats.tangent_norm is None:
            raise RuntimeError("multislerp in 16 bits needs four statistics passes; the stream ran fewer")
        else:
            out = stats.merged(x)
        out = out.reshape(tensors[0].shape)
        return out + base if base is not None else out

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
        if isinstance(g, RoundedSphere):
            return self.merge_rounded(tensors, base, params, g, ctx)
        coefficients = self.coefficients(g, params, model_params, ctx)
        x = task_vectors(tensors, base, in_place=True)
        out = x[0].mul_(coefficients[0])
        for t, c in zip(x[1:], coefficients[1:]):
            out.add_(t, alpha=c)
        return out.add_(base) if base is not None else out
