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
