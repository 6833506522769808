"""Karcher mean: the Riemannian centre of mass of the models on the hypersphere.

H. Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 1977;
for model merging arXiv 2603.04972; mergekit 0.1.5's `karcher`.

Semantics (mergekit's), per tensor, each taken as one flat vector. The points are every model
and, when `base_model` is given, the base too (mergekit adds it as one more point, listed among
`models:` or not), each with weight 1/N. Points of norm <= tol are left out of the mean; the
others become unit vectors u_i. The mean starts at sum_i u_i / |.| (or the first unit vector if
that sum is shorter than tol) and is moved, up to `max_iter` times, along the weighted mean of
the log maps, sum_i (theta_i / sin theta_i) (u_i - cos theta_i mean) / N' (points within tol of
the mean skipped), by the exponential map, stopping when that step is shorter than tol. The
result is that unit mean times the mean norm of all N points.

The mean always lies in the span of the u_i, so the iteration runs on N coefficients and the
tensors' Gram matrix (gathered in float64 in one statistics pass over row blocks); the result
is a weighted sum of the points and every tensor streams in row blocks. The iteration runs in
float64 where mergekit's runs in float32: results agree to float32 precision.

Difference from mergekit, in a degenerate case only: when the starting mean is shorter than tol
(points that cancel), mergekit starts from the first point in its order (the recipe's, the base
where listed); here from the first model, the base coming last.

No parameters give one model back when a base is given (it is averaged with the base), so the
contract's identity check does not apply (identity_params = None).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import check_model_count, gram


class KarcherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_iter: int = Field(10, ge=0, description="most steps of the mean's iteration")
    tol: float = Field(1e-5, ge=0.0, description="stop when a step is shorter; points with a smaller norm are left out")


def quad(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None = None) -> float:
    """a^T G b: the dot product of two vectors given by their coefficients over the points."""
    return float(a @ g @ (a if b is None else b))


def karcher_coefficients(g: torch.Tensor, max_iter: int, tol: float) -> list[float]:
    """c_j such that the Karcher mean of the points with Gram matrix g is sum_j c_j x_j."""
    n = g.shape[0]
    norms = g.diagonal().clamp(min=0.0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    coefficients = [0.0] * n
    if not valid:
        return coefficients
    nv = norms[valid]
    gu = g[valid][:, valid] / torch.outer(nv, nv)  # Gram matrix of the unit vectors
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)
    mean = alpha.clone()
    size = math.sqrt(max(quad(gu, mean), 0.0))
    if size < tol:
        mean = torch.zeros_like(alpha)
        mean[0] = 1.0
    else:
        mean /= size
    for _ in range(max_iter):
        cos = (gu @ mean).clamp(-1.0, 1.0)
        theta = torch.arccos(cos)
        far = theta >= tol
        w = torch.where(far, alpha * theta / torch.sin(torch.where(far, theta, 1.0)), 0.0)
        step = w - float(w @ cos) * mean  # sum_i w_i (u_i - cos_i mean), in coefficients
        length = math.sqrt(max(quad(gu, step), 0.0))
        if length < tol:
            break
        mean = math.cos(length) * mean + (math.sin(length) / length) * step
        size = math.sqrt(max(quad(gu, mean), 0.0))
        if size > tol:
            mean /= size
    scale = float(norms.sum()) / n
    for j, i in enumerate(valid):
        coefficients[i] = scale * float(mean[j]) / float(nv[j])
    return coefficients


class Karcher(Strategy):
    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models on the hypersphere, scaled by their mean norm"
    Params = KarcherParams
    uses_base = True  # the base is one more point, as in mergekit
    identity_params = None
    row_separable = True  # given the Gram matrix

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 0 if recipe.base_model else 1, None)

    def stats_passes(self, params, model_params) -> int:
        return 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        return gram(tensors + ([base] if base is not None else []), stats)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        points = tensors + ([base] if base is not None else [])
        if len(points) == 1:
            return points[0]
        g = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        coefficients = karcher_coefficients(g, params.max_iter, params.tol)
        out = points[0].mul_(coefficients[0])
        for t, c in zip(points[1:], coefficients[1:]):
            out.add_(t, alpha=c)
        return out
