"""SLERP: spherical linear interpolation between two models.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used for model merging
since mergekit (Goddard et al., arXiv 2403.13257).

Semantics (those of mergekit 0.1.5): the endpoints are the base model (t = 0) and the one other
model (t = 1), or, without a base, the first and second models. Each tensor is taken row by row
(its first dimension; a 1-D tensor is one row per element): both rows are normalised, their angle
theta = acos(dot) is found, and out = sin((1-t) theta)/sin(theta) * a + sin(t theta)/sin(theta) * b
on the original (unnormalised) rows. Rows that are nearly collinear (|dot| > 0.9995) are
interpolated linearly, (1-t) a + t b.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.errors import MergeLabError
from merge_lab.registry import Strategy, TensorContext

DOT_THRESHOLD = 0.9995
EPS = 1e-8


class SlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = Field(0.5, description="interpolation position: 0 gives the first endpoint, 1 the second")


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    shape = a.shape
    a2 = a.reshape(shape[0], -1) if a.dim() else a.reshape(1, 1)
    b2 = b.reshape(a2.shape)
    na = torch.linalg.vector_norm(a2, dim=1, keepdim=True)
    nb = torch.linalg.vector_norm(b2, dim=1, keepdim=True)
    na = torch.where(na > EPS, na, 1.0)
    nb = torch.where(nb > EPS, nb, 1.0)
    dot = ((a2 / na) * (b2 / nb)).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    linear = dot.abs() > DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0.0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    return (ca * a2 + cb * b2).reshape(shape)


class Slerp(Strategy):
    name = "slerp"
    summary = "spherical interpolation between two models, row by row"
    Params = SlerpParams
    uses_base = True
    symmetric = False
    min_models = 1
    max_models = 2
    identity_params = {"t": 1.0}  # with a base: t = 1 is the other model

    @classmethod
    def check_recipe(cls, recipe) -> None:
        others = [m for m in recipe.models if m.model != recipe.base_model]
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
        return slerp(params.t, a, b)
