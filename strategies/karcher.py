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

In bfloat16 / float16 (the recipe's arithmetic dtype, as in mergekit) mergekit rounds the unit
vectors, the mean and the tangent to that dtype after every op (its norms stay float32), so the
mean no longer lies exactly in the points' span: the iteration then runs on the tensors
themselves as mergekit's does (RoundedKarcher), one whole-tensor reduction per statistics pass
(2 + 3 max_iter passes, the later ones skipped once it stops) with the mean held between passes
(a tensor's worth of the dtype, counted in the plan's peak).

Difference from mergekit, in a degenerate case only: when the starting mean is shorter than tol
(points that cancel), mergekit starts from the first point in its order (the recipe's, the base
where listed); here from the first model, the base coming last.

No parameters give one model back when a base is given (it is averaged with the base), so the
contract's identity check does not apply (identity_params = None).
"""

from __future__ import annotations

import math
from collections import deque

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, check_model_count, gram
from merge_lab.strategies.low_precision import LOW_PRECISION, reduced, reduced_norm, sum_of_squares


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


class RoundedKarcher:
    """A 16-bit tensor's Karcher iteration as mergekit runs it in that dtype, one whole-tensor
    reduction per statistics pass: the points' norms (pass 0), the starting mean's norm (1),
    then per iteration the mean's dot product with each unit vector, the tangent's norm and the
    moved mean's norm (three passes). The mean itself, a tensor's worth of the dtype, is held
    between the passes block by block (in fold order, so the deque turns once a pass)."""

    def __init__(self, points: int, dtype: torch.dtype, params) -> None:
        self.dtype = dtype
        self.alphas = [1.0 / points] * points
        self.tol = params.tol
        self.max_iter = params.max_iter
        self.sums: list[torch.Tensor] = []
        self.norms: list[torch.Tensor] = []  # float32 scalars, as mergekit's (float32) norms
        self.valid: list[int] = []
        self.weights: list[float] = []  # the valid points' alphas, normalized
        self.means: deque[torch.Tensor] = deque()  # the current mean, block by block
        self.divide_by: torch.Tensor | None = None  # a norm the held mean is still to be divided by
        self.start_with_first = False  # the starting mean was too short: the first unit vector
        self.steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (point, dot, weight) this iteration
        self.tangent_norm: torch.Tensor | None = None
        self.done = False

    def units(self, points: list[torch.Tensor]) -> list[torch.Tensor]:
        return [points[i] / self.norms[i].to(points[i].device) for i in self.valid]

    def current_mean(self, units: list[torch.Tensor]) -> torch.Tensor:
        """The held mean of the next block, divided by its norm where that is pending."""
        mean = self.means.popleft()
        if self.start_with_first:
            mean = units[0].clone()
        elif self.divide_by is not None:
            mean = mean / self.divide_by.to(mean.device)
        return mean

    def tangent(self, units: list[torch.Tensor], mean: torch.Tensor) -> torch.Tensor:
        tangent = torch.zeros_like(mean)
        for j, dot, weight in self.steps:
            tangent += weight * (units[j] - dot * mean)
        return tangent

    def fold(self, pass_index: int, points: list[torch.Tensor]) -> None:
        if self.done:
            return
        if pass_index == 0:
            self.sums.append(torch.stack([sum_of_squares(x) for x in points]).cpu())
            return
        units = self.units(points)
        stage = (pass_index - 2) % 3
        if pass_index == 1:  # the starting mean: the weighted unit vectors, summed in the dtype
            mean = torch.zeros_like(units[0])
            for w, u in zip(self.weights, units):
                mean += w * u
            part = sum_of_squares(mean)
        elif stage == 0:  # this iteration's mean, and its dot product with each unit vector
            mean = self.current_mean(units)
            part = torch.stack([(mean.double() * u.double()).sum() for u in units])
        else:
            mean = self.means.popleft()
            tangent = self.tangent(units, mean)
            if stage == 1:
                part = sum_of_squares(tangent)
            else:
                tn = self.tangent_norm.to(mean.device)
                mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
                part = sum_of_squares(mean)
        self.means.append(mean)
        self.sums.append(part.cpu())

    def finish(self, pass_index: int) -> None:
        if self.done:
            return
        total = torch.stack(self.sums).sum(0) if self.sums else torch.zeros(len(self.alphas), dtype=torch.float64)
        self.sums = []
        stage = (pass_index - 2) % 3
        if pass_index == 0:
            self.norms = [reduced_norm(s, torch.float32) for s in total]
            self.valid = [i for i, n in enumerate(self.norms) if n.item() > self.tol]
            valid_alphas = [self.alphas[i] for i in self.valid]
            self.weights = [a / sum(valid_alphas) for a in valid_alphas]
            self.done = not self.valid
        elif pass_index == 1:
            mean_norm = reduced_norm(total, torch.float32)
            self.start_with_first = mean_norm.item() < self.tol
            self.divide_by = None if self.start_with_first else mean_norm
            self.done = self.max_iter == 0
        elif stage == 0:
            self.start_with_first, self.divide_by = False, None
            self.steps = []
            for j, dot in enumerate(reduced(total, self.dtype)):
                dot = dot.clamp(-1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() >= self.tol:
                    self.steps.append((j, dot, self.weights[j] * (theta / torch.sin(theta))))
        elif stage == 1:
            self.tangent_norm = reduced_norm(total, torch.float32)
            self.done = self.tangent_norm.item() < self.tol
        else:
            unit_norm = reduced_norm(total, torch.float32)
            self.divide_by = unit_norm if unit_norm.item() > self.tol else None
            self.done = (pass_index - 1) // 3 >= self.max_iter

    def merged(self, points: list[torch.Tensor]) -> torch.Tensor:
        """A block's result: the final mean times the points' mean norm (float32, as mergekit's)."""
        if not self.valid:
            return torch.zeros_like(points[0])
        mean = self.current_mean(self.units(points))
        scale = sum(a * n for a, n in zip(self.alphas, self.norms))
        return scale.to(mean.device) * mean


class Karcher(ComputesInDtype, Strategy):  # 16 bits as mergekit's, more passes (stats_passes)
    name = "karcher"
    summary = "Riemannian (Karcher) mean of the models on the hypersphere, scaled by their mean norm"
    Params = KarcherParams
    uses_base = True  # the base is one more point, as in mergekit
    identity_params = None
    # In float32 the mean does not depend on the points' order; in bfloat16 / float16 mergekit's
    # (and so ours) does: the mean and the tangent are rounded sums in that order, and the 16-bit
    # iteration carries the difference on (one or two steps of the dtype on the tiny models).
    symmetric = False
    row_separable = True  # given the Gram matrix

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 0 if recipe.base_model else 1, None)

    def stats_passes(self, params, model_params, dtype) -> int:
        return 2 + 3 * params.max_iter if dtype in LOW_PRECISION else 1

    def held_bytes(self, numel, params, model_params, dtype) -> int:
        return 2 * numel if dtype in LOW_PRECISION else 0  # the 16-bit mean between passes

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        points = tensors + ([base] if base is not None else [])
        if points[0].dtype in LOW_PRECISION:
            stats = stats if stats is not None else RoundedKarcher(len(points), points[0].dtype, params)
            stats.fold(pass_index, points)
            return stats
        return gram(points, stats)

    def finish_stats(self, pass_index, stats, params, model_params):
        if isinstance(stats, RoundedKarcher):
            stats.finish(pass_index)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        points = tensors + ([base] if base is not None else [])
        if len(points) == 1:
            return points[0]
        g = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        if isinstance(g, RoundedKarcher):
            return g.merged(points)
        coefficients = karcher_coefficients(g, params.max_iter, params.tol)
        out = points[0].mul_(coefficients[0])
        for t, c in zip(points[1:], coefficients[1:]):
            out.add_(t, alpha=c)
        return out
