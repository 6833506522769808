"""mergekit's task-vector arithmetic in bfloat16 / float16, rounded where mergekit's rounds.

When a recipe computes in a 16-bit dtype (its `dtype`, as in mergekit), mergekit's generalized
task arithmetic (task_arithmetic, ties, dare_*, breadcrumbs*, della*) runs torch ops on tensors
of that dtype: each elementwise op computes in float32 and rounds its result to the dtype, each
sum over the models accumulates in float32 and rounds once, and the per-model weights are a
tensor of the dtype (so 0.7 is bfloat16's 0.69921875). Rounding at those points and no others
gives mergekit's tensors bit for bit; rounding after every partial sum, or keeping the weights
in float32, elects other signs where the weighted task vectors nearly cancel.

Why a separate path: the float32 one (common.combine) multiplies by +-1 and clamps instead of
masking, which is exact in float32 but would round differently here.

Also here, for every strategy that computes in 16 bits: whole-tensor reductions (sums, norms,
means, dot products) as mergekit's 16-bit torch ops round them, rebuilt from row blocks
(`reduced` and its kin); strategies whose 16-bit arithmetic rounds one reduction before the next
(nuslerp, multislerp, karcher) ask for more statistics passes for a 16-bit tensor
(Strategy.stats_passes takes the tensor's arithmetic dtype). Checked against
torch 2.13 on CPU: a 16-bit sum, norm, mean or dot product accumulates the exact values (and
products) in float32 and rounds once; a mean divides the float32 sum by the count first.
"""

from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def rounded(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (a Python float, exact in that dtype)."""
    return float(torch.tensor(value, dtype=dtype))


def combine_rounded(
    deltas: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    lam: float,
    normalize: bool,
    sign_consensus: bool,
) -> torch.Tensor:
    """common.combine for deltas and base in a 16-bit dtype, rounded as mergekit's
    GeneralizedTaskArithmeticMerge rounds (the deltas are scaled in place)."""
    dtype = base.dtype
    weights = [rounded(w, dtype) for w in weights]
    for d, w in zip(deltas, weights):
        if w != 1.0:  # x * 1 == x
            d.mul_(w)
    total = torch.zeros(base.shape, dtype=torch.float32, device=base.device)
    for d in deltas:
        total.add_(d)
    divisor: torch.Tensor | float
    if not sign_consensus:
        divisor = rounded(sum(weights), dtype) if weights else 0.0
        divisor = 1.0 if abs(divisor) < 1e-8 else divisor
    else:
        positive = total.to(dtype).ge(0)  # the elected sign, from the sum as mergekit rounds it
        total.zero_()
        agreeing_weights = torch.zeros_like(total) if normalize else None
        for d, w in zip(deltas, weights):
            agrees = torch.where(positive, d > 0, d < 0)
            total.add_(d.masked_fill_(~agrees, 0.0))
            if agreeing_weights is not None:
                agreeing_weights.add_(agrees, alpha=w)
        del positive
        divisor = 1.0
        if agreeing_weights is not None:
            divisor = agreeing_weights.to(dtype)
            divisor.masked_fill_(divisor == 0, 1.0)
            del agreeing_weights
    mixed = total.to(dtype)
    del total
    if normalize:
        mixed.div_(divisor)
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base)


def l1_factor_rounded(before: float, after: float, dtype: torch.dtype, eps: float) -> torch.Tensor | None:
    """mergekit's rescale factor in a 16-bit dtype: both L1 norms rounded to it, their quotient
    too (None where either norm is below eps: left unscaled)."""
    b = torch.tensor(before, dtype=dtype)
    a = torch.tensor(after, dtype=dtype)
    if bool(b < eps) or bool(a < eps):
        return None
    return b / a


# -- whole-tensor reductions as mergekit's 16-bit torch ops give them, from row blocks
#
# torch reduces a bfloat16 / float16 tensor (sum, norm, mean, dot) by accumulating in float32 and
# rounding the result once to the tensor's dtype. A stream cannot follow torch's float32
# accumulation order over the whole tensor, so the partial sums are taken in float64 over row
# blocks (exact for sums of 16-bit values and their products, up to 2**-52 relative), then
# rounded to float32 and to the dtype: the same 16-bit value unless torch's float32 sum lies within
# its own rounding error of a 16-bit rounding boundary.


def reduced(total: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float64 sum (a Python float or a tensor of them) as a 16-bit torch reduction returns it."""
    value = total if isinstance(total, torch.Tensor) else torch.tensor(total, dtype=torch.float64)
    return value.to(torch.float32).to(dtype)


def reduced_norm(squares: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The norm torch.norm returns for a 16-bit tensor whose squares sum (in float64) to `squares`."""
    value = squares if isinstance(squares, torch.Tensor) else torch.tensor(squares, dtype=torch.float64)
    return value.clamp(min=0.0).to(torch.float32).sqrt().to(dtype)


def reduced_mean(total: float, count: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.mean of a 16-bit tensor of `count` entries summing to `total`: the float32 sum
    divided by the count in float32, rounded once."""
    return (torch.tensor(total, dtype=torch.float64).to(torch.float32) / count).to(dtype)


def sum_of_squares(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The float64 sum of x's squares (x's 16-bit values are exact in float64), over `dim` or all."""
    x = x.double()
    return (x * x).sum() if dim is None else (x * x).sum(dim)


def summed(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The float64 sum of x (over `dim` or all), for a reduction rounded later by `reduced`."""
    return x.sum(dtype=torch.float64) if dim is None else x.sum(dim, dtype=torch.float64)


def model_sum(terms: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """torch.stack(terms).sum(0) for 16-bit terms: accumulated in float32 in model order, rounded once."""
    total = torch.zeros(terms[0].shape, dtype=torch.float32, device=terms[0].device)
    for t in terms:
        total.add_(t)
    return total.to(dtype)
