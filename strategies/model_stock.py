"""Model Stock: interpolate between the base and the models' average by the angle of their offsets.

Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(arXiv 2403.19522).

Semantics (those of mergekit 0.1.5), per tensor, over the N >= 2 models other than the base:
offsets o_i = theta_i - base; cos = the mean over pairs i < j of
clamp(<o_i, o_j> / max(|o_i| |o_j|, 1e-6), -1, 1);
t = N cos / (1 + (N - 1) cos), or 0 (the base) where |1 + (N - 1) cos| < 1e-6;
out = t * mean_i theta_i + (1 - t) * base. With `filter_wise`, cos and t are taken per vector
along the last dimension (each output filter of a weight matrix; a 1-D tensor is one vector),
otherwise per tensor taken flat.

mergekit needs 3 inputs, the base included, so this needs two models besides the base (there is
no angle with one): `min_models` is 2 and the contract suite's identity check does not apply.

The dot products and norms of a whole tensor are statistics summed in float64 over row blocks in
one pass (common.gram); filter-wise rows need only themselves. The interpolation is then
elementwise, and the engine streams every tensor in row blocks.

Computed in the recipe's arithmetic dtype, as mergekit computes it: in bfloat16 / float16 the
offsets, the products of the dot products, each norm, cosine and ratio and the interpolation
are rounded to it where mergekit's torch ops round (the sums themselves accumulate in float64
over blocks, where torch accumulates in float32 over the whole tensor: equal once rounded to 16
bits unless a sum straddles a rounding boundary).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.errors import MergeLabError
from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import ComputesInDtype, gram
from merge_lab.strategies.low_precision import LOW_PRECISION

NORM_EPS = 1e-6  # mergekit's floor on |o_i| |o_j|
SINGULAR_EPS = 1e-6  # and on |1 + (N - 1) cos|


class ModelStockParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter_wise: bool = Field(False, description="one ratio per vector along the last dimension instead of per tensor")


def stock_ratio(g: torch.Tensor) -> torch.Tensor:
    """Model Stock's t from Gram matrices of the offsets, g of shape [..., N, N] (float64)."""
    n = g.shape[-1]
    norms = g.diagonal(dim1=-2, dim2=-1).clamp(min=0.0).sqrt()
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(
        (g[..., i, j] / (norms[..., i] * norms[..., j]).clamp(min=NORM_EPS)).clamp(-1.0, 1.0) for i, j in pairs
    ) / len(pairs)
    denominator = 1.0 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    return torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))


def stock_ratio_rounded(norms: list[torch.Tensor], dots: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
    """stock_ratio from each offset's norm and each pair's dot product in a 16-bit dtype (any
    shape, one entry per filter), every step rounded to that dtype as mergekit's ops round."""
    n = len(norms)
    cos = [(dots[i, j] / (norms[i] * norms[j]).clamp(min=NORM_EPS)).clamp(-1.0, 1.0) for i, j in sorted(dots)]
    mean = torch.stack(cos).mean(dim=0)
    denominator = 1 + (n - 1) * mean
    singular = denominator.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(mean), (n * mean) / safe)


def gram_rounded(offsets: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix of 16-bit offsets as mergekit's arithmetic sees it: squared norms
    of the exact values (torch's norm upcasts), dot products of the products rounded to the dtype."""
    n = len(offsets)
    total = torch.zeros(n, n, dtype=torch.float64) if into is None else into
    for i in range(n):
        total[i, i] += float(offsets[i].double().square().sum())
        for j in range(i + 1, n):
            total[i, j] += float((offsets[i] * offsets[j]).sum(dtype=torch.float64))
    return total


def whole_tensor_ratio_rounded(g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """stock_ratio_rounded from gram_rounded's sums, each rounded to `dtype` as a 16-bit reduction is."""
    n = g.shape[0]
    norms = [torch.tensor(float(g[i, i]) ** 0.5, dtype=dtype) for i in range(n)]
    dots = {(i, j): torch.tensor(float(g[i, j]), dtype=dtype) for i in range(n) for j in range(i + 1, n)}
    return stock_ratio_rounded(norms, dots)


def filter_ratio_rounded(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Filter-wise stock_ratio_rounded of 16-bit offsets: one ratio per vector along the last dimension."""
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    n = len(offsets)
    dots = {(i, j): (offsets[i] * offsets[j]).sum(dim=-1) for i in range(n) for j in range(i + 1, n)}
    return stock_ratio_rounded(norms, dots).unsqueeze(-1)


class ModelStock(ComputesInDtype, Strategy):
    name = "model_stock"
    summary = "interpolate base -> average of the models by the angle between their task vectors"
    Params = ModelStockParams
    needs_base = True
    uses_base = True
    min_models = 2
    row_separable = True  # given the tensor's dot products (filter-wise: rows are independent)

    def stats_passes(self, params, model_params, dtype) -> int:
        return 1  # filter-wise too: a 1-D tensor is one filter, which a streamed block cuts

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if params.filter_wise and base.dim() >= 2:
            return stats  # rows need only themselves
        if base.dtype in LOW_PRECISION:
            return gram_rounded([t - base for t in tensors], stats)
        return gram([t - base for t in tensors], stats)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        others = [m for m in recipe.models if m.model != recipe.base_model]
        if len(others) < 2:
            raise MergeLabError(
                f"{recipe.where('models')}: model_stock needs at least two models besides the base_model "
                f"(the angle between their task vectors sets the ratio); got {len(others)}."
            )

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        low = base.dtype in LOW_PRECISION
        if low and params.filter_wise and base.dim() >= 2:
            t = filter_ratio_rounded([x - base for x in tensors])
        elif low:
            stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
            t = whole_tensor_ratio_rounded(stats, base.dtype).to(base.device)
        elif params.filter_wise and base.dim() >= 2:
            offsets = torch.stack([t - base for t in tensors]).double()  # [N, ..., d]
            t = stock_ratio(torch.einsum("i...k,j...k->...ij", offsets, offsets)).unsqueeze(-1)
            del offsets
        else:
            stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)
            t = stock_ratio(stats)
        if not low:
            t = t.to(base.dtype).to(base.device)
        average = tensors[0]
        for x in tensors[1:]:
            average.add_(x)
        average.div_(len(tensors))
        return average.mul_(t).add_(base * (1.0 - t))
