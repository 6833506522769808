"""SLERP: spherical linear interpolation between two models.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used for model merging
since mergekit (Goddard et al., arXiv 2403.13257).

Semantics (those of mergekit 0.1.5): the endpoints are the base model (t = 0) and the one other
model (t = 1), or, without a base, the first and second models. Each tensor is taken as one
flat vector: both are normalised, their angle theta = acos(dot) is found, and
out = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b on the original
(unnormalised) tensors. Nearly collinear tensors (|dot| > 0.9995) are interpolated linearly,
(1-t) a + t b.

mergekit 0.1.5's slerp has one parameter, `t` (no `embed_slerp` or other options in that
version). Differences: mergekit requires `t` and a base; here `t` defaults to 0.5 and two models
without a base are interpolated too (first to second).

The norms and the dot product are statistics (Strategy.stats_passes), summed in float64 over row
blocks in one pass; the interpolation is then elementwise, so the engine streams every tensor in
row blocks whatever its size.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.errors import MergeLabError
from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import gram

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    t: float = Field(0.5, ge=0.0, le=1.0, description="interpolation position in [0, 1]: 0 gives the first endpoint, 1 the second")


def sums(a: torch.Tensor, b: torch.Tensor, into: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    """(a.a, b.b, a.b) in float64, added to `into`: the statistics slerp needs, block by block."""
    g = gram([a, b])
    aa, bb, ab = into
    return aa + float(g[0, 0]), bb + float(g[1, 1]), ab + float(g[0, 1])


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, stats: tuple[float, float, float] | None = None) -> torch.Tensor:
    """Interpolate in place into `a`; `stats` are sums(a, b) over the whole tensors (a, b may be
    row blocks of them), computed here when not given."""
    aa, bb, ab = stats if stats is not None else sums(a, b)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    dot = ab / (na * nb)
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        return a.mul_(1.0 - t).add_(b, alpha=t)
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return a.mul_(math.sin((1.0 - t) * theta) / sin_theta).add_(b, alpha=math.sin(t * theta) / sin_theta)


class Slerp(Strategy):
    name = "slerp"
    summary = "spherical interpolation between two models"
    Params = SlerpParams
    uses_base = True
    symmetric = False
    min_models = 1
    max_models = 2
    identity_params = {"t": 1.0}  # with a base: t = 1 is the other model
    row_separable = True  # given the norms and the dot product

    def stats_passes(self, params, model_params, dtype) -> int:
        return 0 if params.t in (0.0, 1.0) else 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        a, b = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
        return sums(a, b, stats or (0.0, 0.0, 0.0))

    @classmethod
    def check_recipe(cls, recipe) -> None:
        others = [m for m in recipe.models if not recipe.is_base(m.model)]
        ends = len(others) + (1 if recipe.base_model else 0)
        if ends != 2:
            raise MergeLabError(
                f"{recipe.where('models')}: slerp interpolates exactly two models: give base_model and one "
                "other model, or two models and no base_model."
            )

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        a, b = (base, tensors[0]) if base is not None else (tensors[0], tensors[1])
        if params.t == 0.0:
            return a
        if params.t == 1.0:
            return b
        return slerp(params.t, a, b, ctx.stats)
