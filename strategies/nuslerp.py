"""NuSLERP: spherical interpolation of two models (or of their task vectors), whole-tensor,
row by row or column by column.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; mergekit 0.1.5's
`nuslerp` (the "new" slerp: weights instead of t, optional base, vectors other than the whole
tensor).

Semantics (mergekit's): exactly two models with weights w_0, w_1; t = w_1 / (w_0 + w_1) (0.5
when |w_0 + w_1| < 1e-6). With a base the two task vectors theta_i - base are interpolated and
the base added back; without one the two models themselves. The vectors slerped are the whole
flattened tensor (`nuslerp_flatten`, the default), else (flatten off) each column of a matrix,
i.e. the vectors along dimension 0 (`nuslerp_row_wise`, named so in mergekit), else each row
(the vectors along the last dimension); a 1-D tensor is always one vector. For vectors a and b:
norms clamped below at 1e-7, cos = a.b / (|a| |b|) clamped to [-1, 1]; where 1 - cos^2 <= 1e-16
the interpolation is linear, (1-t) a + t b, else
out = (sin((1-t) theta) a + sin(t theta) b) / sin theta, theta = acos(cos). A zero vector has
cos = 0 with anything, as in mergekit.

Norms and dot products are statistics gathered in float64 in one pass over row blocks (per
tensor, per column, or, for 1-D tensors in row mode, per tensor); the interpolation is then
elementwise, so every tensor streams in row blocks. In row mode a matrix needs no statistics,
but the pass still runs (the engine does not tell a strategy a tensor's shape before it).

In bfloat16 / float16 (the recipe's arithmetic dtype, as in mergekit) every op runs in that
dtype as mergekit's do: the norms (rounded), the unit vectors (rounded entry by entry), the sum of
their products (each product rounded; float32 inside, rounded once), the angle, the sines and
each term of the interpolation. A norm must be known before the unit vectors it divides, so
whole-tensor and column vectors take two statistics passes there (norms, then cosines); rows
take none, each block holding whole rows, and run mergekit's ops on them as they are.

Differences from mergekit: mergekit requires a `weight` for each model (here 1 by default:
t = 0.5) and exactly two models; one model (with or without a base) is given back unchanged here.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, check_model_count, gram
from merge_lab.strategies.low_precision import (
    LOW_PRECISION,
    reduced,
    reduced_norm,
    sum_of_squares,
    summed,
)
from merge_lab.strategies.multislerp import SphereWeight, task_vectors

NORM_FLOOR = 1e-7
COLINEAR = 1e-16  # 1 - cos^2 at or below this: linear interpolation


class NuSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nuslerp_flatten: bool = Field(True, description="slerp the whole tensor as one vector (else rows or columns)")
    nuslerp_row_wise: bool = Field(
        False, description="with flatten off: slerp the vectors along dimension 0 (a matrix's columns), not the rows"
    )


def position(model_params) -> float:
    w0, w1 = model_params[0].weight, model_params[1].weight
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def vectors(x: torch.Tensor, params) -> tuple[torch.Tensor, int]:
    """x as a matrix and the dimension its vectors run along (0: columns, 1: rows)."""
    if params.nuslerp_flatten or x.dim() == 1:
        return x.reshape(-1, 1), 0
    if params.nuslerp_row_wise:
        return x.reshape(x.shape[0], -1), 0
    return x.reshape(-1, x.shape[-1]), 1


def column_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.a, b.b, a.b) of every column, float64, shape (3, columns)."""
    x, y = a.double(), b.double()
    return torch.stack([(x * x).sum(0), (y * y).sum(0), (x * y).sum(0)])


def coefficients(t: float, sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slerp's coefficients of a and b for each vector, from its (a.a, b.b, a.b)."""
    na = sums[0].clamp(min=0.0).sqrt().clamp(min=NORM_FLOOR)
    nb = sums[1].clamp(min=0.0).sqrt().clamp(min=NORM_FLOOR)
    cos = (sums[2] / (na * nb)).clamp(-1.0, 1.0)
    linear = (1.0 - cos * cos) <= COLINEAR
    theta = torch.arccos(torch.where(linear, 0.0, cos))
    sin = torch.where(linear, 1.0, torch.sin(theta))
    ca = torch.where(linear, 1.0 - t, torch.sin((1.0 - t) * theta) / sin)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin)
    return ca, cb


def rows_mode(x: torch.Tensor, params) -> bool:
    """Whether the vectors are a matrix's rows: whole in every row block, no statistics needed."""
    return x.dim() > 1 and not params.nuslerp_flatten and not params.nuslerp_row_wise


class RoundedSums:
    """A 16-bit tensor's statistics: each vector's squared norms (pass 0), then the sums of the
    products of its rounded unit vectors (pass 1), float64 over row blocks until rounded."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.squares: torch.Tensor | None = None  # (2, vectors)
        self.dots: torch.Tensor | None = None  # (vectors,)
        self.norms: tuple[torch.Tensor, torch.Tensor] | None = None  # each (1, vectors), in dtype
        self.cos: torch.Tensor | None = None  # (1, vectors), in dtype

    def fold(self, pass_index: int, va: torch.Tensor, vb: torch.Tensor) -> None:
        if pass_index == 0:
            block = torch.stack([sum_of_squares(va, 0), sum_of_squares(vb, 0)]).cpu()
            self.squares = block if self.squares is None else self.squares.add_(block)
        else:
            na, nb = (n.to(va.device) for n in self.norms)
            block = summed(torch.div(va, na).mul_(torch.div(vb, nb)), 0).cpu()
            self.dots = block if self.dots is None else self.dots.add_(block)

    def finish(self, pass_index: int) -> None:
        if pass_index == 0 and self.squares is not None:
            self.norms = tuple(reduced_norm(s, self.dtype).clamp_(min=NORM_FLOOR).reshape(1, -1) for s in self.squares)
        elif pass_index == 1 and self.dots is not None:
            self.cos = reduced(self.dots, self.dtype).clamp_(-1, 1).reshape(1, -1)


def unit_cosines(va: torch.Tensor, vb: torch.Tensor) -> torch.Tensor:
    """The cosines of rows of 16-bit matrices, each op rounded as mergekit's (shape (rows, 1))."""
    na = torch.norm(va, dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
    nb = torch.norm(vb, dim=-1, keepdim=True).clamp_(min=NORM_FLOOR)
    return torch.sum(torch.div(va, na).mul_(torch.div(vb, nb)), dim=-1, keepdim=True).clamp_(-1, 1)


def slerp_rounded(t: float, va: torch.Tensor, vb: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Slerp of 16-bit vectors given their cosines (broadcast along them), every op in their
    dtype as mergekit's nuslerp runs it; where 1 - cos^2 <= 1e-16, linear."""
    colinear = (1 - cos.square()) <= COLINEAR
    theta = torch.acos(torch.where(colinear, 0, cos))
    spherical = (torch.sin((1 - t) * theta) * va + torch.sin(t * theta) * vb) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * va + t * vb, spherical)


class NuSlerp(ComputesInDtype, Strategy):  # 16 bits as mergekit's, more passes (stats_passes)
    name = "nuslerp"
    summary = "spherical interpolation of two models or task vectors, whole, per row or per column"
    Params = NuSlerpParams
    ModelParams = SphereWeight
    uses_base = True
    min_models = 1
    max_models = 3  # two models, and the base when listed among models
    identity_params = {"weight": 1.0}  # one model comes back unchanged
    row_separable = True  # given the norms and dot products

    @classmethod
    def check_recipe(cls, recipe) -> None:
        check_model_count(recipe, cls.name, 1, 2)

    def stats_passes(self, params, model_params, dtype) -> int:
        if len(model_params) != 2 or position(model_params) in (0.0, 1.0):
            return 0
        return 2 if dtype in LOW_PRECISION else 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if rows_mode(tensors[0], params):
            return None  # rows are whole in every block
        low = tensors[0].dtype in LOW_PRECISION
        if pass_index > 0 and not low:
            return stats  # float32 needs one pass; a 16-bit tensor of the plan asked for more
        a, b = task_vectors(tensors, base, in_place=False)
        (va, _), (vb, _) = vectors(a, params), vectors(b, params)
        if low:
            stats = stats if stats is not None else RoundedSums(tensors[0].dtype)
            stats.fold(pass_index, va, vb)
            return stats
        if va.shape[1] == 1:  # one vector: the Gram matrix's sums
            g = gram([a, b])
            block = torch.stack([g[0, 0], g[1, 1], g[0, 1]]).reshape(3, 1)
        else:
            block = column_sums(va, vb)
        return block if stats is None else stats.add_(block)

    def finish_stats(self, pass_index, stats, params, model_params):
        if isinstance(stats, RoundedSums):
            stats.finish(pass_index)
        return stats

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        if len(tensors) == 1:
            return tensors[0]
        t = position(model_params)
        if t in (0.0, 1.0):
            return tensors[int(t)]
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
        a, b = task_vectors(tensors, base, in_place=True)
        (va, dim), (vb, _) = vectors(a, params), vectors(b, params)
        if a.dtype in LOW_PRECISION:
            if stats is None:
                cos = unit_cosines(va, vb)
            elif stats.cos is None:
                raise RuntimeError("nuslerp in 16 bits needs two statistics passes; the stream ran fewer")
            else:
                cos = stats.cos.to(va.device)
            out = slerp_rounded(t, va, vb, cos).reshape(a.shape)
            return out + base if base is not None else out
        if stats is None:  # rows: each row's own sums
            x, y = va.double(), vb.double()
            stats = torch.stack([(x * x).sum(1), (y * y).sum(1), (x * y).sum(1)])
        ca, cb = coefficients(t, stats)
        shape = (1, -1) if dim == 0 else (-1, 1)
        out = va.mul_(ca.float().reshape(shape)).add_(vb.mul_(cb.float().reshape(shape))).reshape(a.shape)
        return out.add_(base) if base is not None else out
