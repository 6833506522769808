"""Tensor operations shared by the delta-based strategies (task arithmetic, TIES, DARE).

All work in place on tensors the engine already copied for this merge, so a merge of N models
holds N input tensors plus a few temporaries, never N stacked copies on top. The tensors are
float32, or bfloat16 / float16 where a recipe computes in that dtype as mergekit does
(Strategy.working_dtype): then `combine` and the rescale round where mergekit's arithmetic rounds
(strategies.low_precision), and the selections rank the low-precision values exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.strategies.low_precision import LOW_PRECISION, combine_rounded, l1_factor_rounded

# Parameter models refuse NaN and infinities (YAML's .nan, .inf): no merge is meant with them.
PARAMS_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)


class WeightedModel(BaseModel):
    model_config = PARAMS_CONFIG
    weight: float = Field(1.0, description="scale of this model's task vector (theta_i - base)")


class SparseModel(WeightedModel):
    density: float = Field(
        1.0, ge=0.0, le=1.0, description="share of this model's task vector kept (0 drops it all, as in mergekit)"
    )


class TaskArithmeticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)
    lambda_: float = Field(1.0, alias="lambda", description="scale of the combined task vector")
    normalize: bool = Field(False, description="divide the combined task vector by the sum of the weights")
    int8_mask: bool = Field(False, description="accepted for mergekit recipes; masks here are boolean already")


class ComputesInDtype:
    """Mixin of strategies whose mergekit counterpart (generalized task arithmetic) computes in the
    tensors' dtype: merge() gets the inputs in the recipe's arithmetic dtype, not float32."""

    def working_dtype(self, arithmetic: torch.dtype) -> torch.dtype:
        return arithmetic


def weights_problem(weights: list[float], normalize: bool, disjoint: bool = False) -> str | None:
    """Why these per-model weights make no merge, or None. `disjoint`: `normalize` divides each
    entry by the summed weights of the models that agree on its sign (TIES' disjoint mean)."""
    listed = ", ".join(f"{w:g}" for w in weights)
    if normalize and disjoint and any(w < 0 for w in weights):
        return (
            f"normalize divides by the summed weights of the agreeing models, which a negative weight ({listed}) "
            "can bring to zero or below. Set normalize: false to subtract a task vector."
        )
    if normalize and abs(sum(weights)) < 1e-8:
        return f"the weights ({listed}) sum to zero and normalize divides by their sum. Set normalize: false or change the weights."
    return None


def deltas_(tensors: list[torch.Tensor], base: torch.Tensor) -> list[torch.Tensor]:
    """theta_i - base, in place."""
    for t in tensors:
        t.sub_(base)
    return tensors


def float_bits(values: torch.Tensor) -> torch.Tensor:
    """Float values as the int32 bit patterns of their float32 values, flat (16-bit values are
    widened first, exactly, so the difference is computed and rounded in their own dtype)."""
    return values.to(torch.float32).view(torch.int32).reshape(-1)


def magnitude_bits(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|tensor - base| (computed in the tensors' dtype) as float_bits.

    For non-negative floats the bit pattern orders like the value, so a radix select over these
    integers finds the exact k-th largest magnitude.
    """
    return float_bits(torch.sub(tensor, base).abs_())


def _select(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest of the counted values, and that value's rank in the bin."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))
    above = int(from_top[j - 1]) if j > 0 else 0
    return counts.numel() - 1 - j, k - above


class TopKThreshold:
    """The magnitude threshold that keeps the `density` share of a tensor (at least one entry),
    found exactly over row blocks in two passes of a radix select on the float32 bit patterns:
    pass 0 counts the values per high 16 bits, pass 1 counts the low 16 bits of the values in the
    bin that holds the k-th largest. The result is torch.kthvalue's (n - k + 1)-th smallest."""

    def __init__(self, density: float) -> None:
        self.density = density
        self.n = 0
        self.high = torch.zeros(1 << 16, dtype=torch.int64)
        self.low = torch.zeros(1 << 16, dtype=torch.int64)
        self.bin = self.rank = 0
        self.value: torch.Tensor | None = None  # float32 scalar; None: keep everything

    def fold(self, pass_index: int, bits: torch.Tensor) -> None:
        """Count one block's magnitude bits (from magnitude_bits) in this pass's histogram."""
        if pass_index == 0:
            self.n += bits.numel()
            self.high += torch.bincount(bits >> 16, minlength=1 << 16).to(self.high.device)
        elif self.n:
            lo = self.bin << 16
            inside = bits[(bits >= lo).logical_and_(bits < lo + (1 << 16))]
            if inside.numel():
                self.low += torch.bincount(inside.sub_(lo), minlength=1 << 16).to(self.low.device)

    def finish(self, pass_index: int) -> None:
        if not self.n:
            return
        if pass_index == 0:
            self.bin, self.rank = _select(self.high, max(1, int(self.density * self.n)))
        else:
            low, _ = _select(self.low, self.rank)
            self.value = torch.tensor((self.bin << 16) | low, dtype=torch.int32).view(torch.float32)

    def trim_(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero the entries of (a block of) delta below the threshold; ties with it are kept."""
        if self.value is not None:
            delta.masked_fill_(delta.abs() < self.value.to(delta.device), 0.0)
        return delta


def trim_topk_(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the `density` share of entries largest in magnitude (at least one), zero the rest.

    The threshold is TopKThreshold's exact selection over the whole tensor (no sort); entries
    tied with the threshold are all kept.
    """
    if density >= 1.0 or delta.numel() == 0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    selection = TopKThreshold(density)
    bits = float_bits(delta.abs())
    for p in (0, 1):
        selection.fold(p, bits)
        selection.finish(p)
    return selection.trim_(delta)


def dare_drop_(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """Drop each entry with probability 1 - density; rescale survivors by 1/density (DARE)."""
    if density >= 1.0:
        return delta
    if density <= 0.0:
        return delta.zero_()
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def combine(
    deltas: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor,
    lam: float,
    normalize: bool,
    sign_consensus: bool,
) -> torch.Tensor:
    """base + lam * (sum_i w_i delta_i) / divisor, optionally over sign-agreeing entries only (TIES).

    With `sign_consensus`, the elected sign of each entry is the sign of sum_i w_i delta_i (ties
    go to +); only entries whose weighted delta has that sign contribute, and `normalize` divides
    by the sum of the weights of the contributing models (the disjoint mean). In bfloat16 /
    float16, rounded as mergekit's arithmetic in that dtype (low_precision.combine_rounded).
    """
    if base.dtype in LOW_PRECISION:
        return combine_rounded(deltas, weights, base, lam, normalize, sign_consensus)
    for d, w in zip(deltas, weights):
        if w != 1.0:  # x * 1 == x: skip the pass
            d.mul_(w)
    if not deltas:
        total = torch.zeros_like(base)
    else:  # without sign consensus the deltas are not needed again: sum into the first in place
        total = deltas[0].clone() if sign_consensus else deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    if not sign_consensus:
        if normalize:
            s = sum(weights)
            total.div_(s if abs(s) >= 1e-8 else 1.0)
    else:
        # elected sign s = +1 where the weighted sum is >= 0, else -1; a delta agrees where d * s > 0.
        # Summing clamp(d * s, min=0) and multiplying by s at the end adds exactly the agreeing
        # deltas (multiplying by +-1 is exact), with no boolean masks or where() per model.
        sign = total.ge_(0).mul_(2.0).sub_(1.0)
        total = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for d, w in zip(deltas, weights):
            d.mul_(sign)
            if divisor is not None:
                divisor.add_(d > 0, alpha=w)
            total.add_(d.clamp_(min=0.0))
        total.mul_(sign)
        del sign
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1.0)
            total.div_(divisor)
    if lam != 1.0:
        total.mul_(lam)
    return total.add_(base)


def merge_sparsified(
    tensors: list[torch.Tensor],
    base: torch.Tensor,
    params: TaskArithmeticParams,
    model_params: list[SparseModel],
    sparsify_: Callable[[int, torch.Tensor], object],
    sign_consensus: bool,
    norms: Sequence[L1Rescale | None] = (),
) -> torch.Tensor:
    """The loop of mergekit's sparsifying task arithmetic (TIES, breadcrumbs, DELLA), so that each
    method states only its rule: per model, delta_i = theta_i - base, zeroed at density <= 0, kept
    whole at density >= 1, else sparsified in place by `sparsify_(i, delta_i)` and, where
    `norms[i]` is given (the method's `rescale`), scaled back to its L1 norm; then `combine`."""
    deltas = deltas_(tensors, base)
    for i, (d, p) in enumerate(zip(deltas, model_params)):
        if p.density <= 0.0:
            d.zero_()
        elif p.density < 1.0:
            sparsify_(i, d)
            rescale = norms[i] if norms else None
            if rescale is not None:
                rescale.rescale_(d)
    weights = [p.weight for p in model_params]
    return combine(deltas, weights, base, params.lambda_, params.normalize, sign_consensus)


# -- helpers of the geometric strategies (nuslerp, multislerp, karcher, arcee_fusion, ram)

# Sums are taken over sub-blocks of this many elements converted to float64: small enough to stay
# in cache and in the allocator's reused memory (1M-element sub-blocks took 5x the CPU time), and
# memory stays bounded even when a whole embedding comes at once.
GRAM_ELEMENTS = 1 << 16


def gram(tensors: list[torch.Tensor], into: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 Gram matrix G[i, j] = t_i . t_j of flattened tensors (or row blocks of them),
    added to `into`: the statistics of every method that only needs norms and angles."""
    flat = [t.reshape(-1) for t in tensors]
    total = torch.zeros(len(flat), len(flat), dtype=torch.float64) if into is None else into
    n = flat[0].numel() if flat else 0
    for i in range(0, n, GRAM_ELEMENTS):
        block = torch.stack([f[i : i + GRAM_ELEMENTS] for f in flat]).double()
        total += (block @ block.T).cpu()
    return total


def check_model_count(recipe, method: str, low: int, high: int | None) -> None:
    """Raise MergeLabError unless the recipe has between low and high models besides its base."""
    from merge_lab.errors import MergeLabError

    others = [m for m in recipe.models if m.model != recipe.base_model]
    if len(others) < low or (high is not None and len(others) > high):
        wanted = f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        raise MergeLabError(
            f"{recipe.where('models')}: '{method}' takes {wanted} model(s) besides the base, got {len(others)}; "
            "change the list under `models:`."
        )


def _ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """Float values -> int64 keys in [0, 2**32) that order like the values (negatives included)."""
    bits = float_bits(values)
    keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    return keys.add_(1 << 31)


def _key_value(key: int) -> torch.Tensor:
    signed = key - (1 << 31)
    bits = signed ^ 0x7FFFFFFF if signed < 0 else signed
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


class OrderStatistics:
    """Exact order statistics (the floor(q (n - 1))-th smallest value, 0-based, for each quantile
    q) of a float32 tensor seen in row blocks: two passes of a radix select on order-preserving
    integer keys (pass 0 counts the high 16 bits, pass 1 the low 16 bits in the bins found),
    so no block is kept. Negative values are handled; NaNs are not."""

    def __init__(self, quantiles: list[float]) -> None:
        self.quantiles = quantiles
        self.n = 0
        self.high = torch.zeros(1 << 16, dtype=torch.int64)
        self.low: dict[int, torch.Tensor] = {}
        self.where: list[tuple[int, int]] = []  # (bin, rank inside it) per quantile
        self.values: list[torch.Tensor] = []  # float32 scalars, once pass 1 is finished

    def fold(self, pass_index: int, values: torch.Tensor) -> None:
        keys = _ordered_keys(values)
        if pass_index == 0:
            self.n += keys.numel()
            self.high += torch.bincount(keys >> 16, minlength=1 << 16).cpu()
            return
        high = keys >> 16
        for b, counts in self.low.items():
            inside = keys[high == b] & 0xFFFF
            if inside.numel():
                counts += torch.bincount(inside, minlength=1 << 16).cpu()

    def finish(self, pass_index: int) -> None:
        if not self.n:
            return
        if pass_index == 0:
            below = self.high.cumsum(0)
            for q in self.quantiles:
                rank = int(q * (self.n - 1))
                b = int(torch.searchsorted(below, rank, right=True))
                self.where.append((b, rank - (int(below[b - 1]) if b else 0)))
                self.low.setdefault(b, torch.zeros(1 << 16, dtype=torch.int64))
        else:
            for b, rank in self.where:
                low = int(torch.searchsorted(self.low[b].cumsum(0), rank, right=True))
                self.values.append(_key_value((b << 16) | low))


# -- helpers for mergekit's sparsifying methods (breadcrumbs, DELLA, SCE) and DARE's rescale


class RescaledParams(TaskArithmeticParams):
    rescale: bool = Field(
        False, description="scale each sparsified task vector back to the L1 norm it had before (mergekit's rescale)"
    )


class RankThreshold(TopKThreshold):
    """TopKThreshold for any rank: the k-th largest of a tensor's non-negative float32 values,
    with k = rank(n) chosen once pass 0 has counted the n values (k < 1: no value, `empty`)."""

    def __init__(self, rank: Callable[[int], int]) -> None:
        super().__init__(density=0.0)
        self.rank_of = rank
        self.empty = False

    def finish(self, pass_index: int) -> None:
        if pass_index == 0:
            if self.n:
                k = min(self.rank_of(self.n), self.n)
                self.empty = k < 1
                if not self.empty:
                    self.bin, self.rank = _select(self.high, k)
        elif not self.empty:
            super().finish(pass_index)


# mergekit's guard: a task vector whose L1 norm (before or after sparsifying) is below this is
# left unscaled.
RESCALE_EPS = 1e-7


class L1Rescale:
    """mergekit's `rescale`: the factor that gives a sparsified task vector back the L1 norm it had
    before, from float64 sums over row blocks."""

    def __init__(self) -> None:
        self.before = 0.0
        self.after = 0.0

    def add(self, delta: torch.Tensor, kept: torch.Tensor) -> None:
        """Fold one block: `delta` before sparsifying, `kept` after."""
        self.before += float(delta.abs().sum(dtype=torch.float64))
        self.after += float(kept.abs().sum(dtype=torch.float64))

    @property
    def factor(self) -> float:
        if self.before < RESCALE_EPS or self.after < RESCALE_EPS:
            return 1.0
        return self.before / self.after

    def rescale_(self, kept: torch.Tensor) -> torch.Tensor:
        """`kept` (a block of the sparsified task vector) times the factor, in kept's dtype: in
        bfloat16 / float16 the norms and their quotient are rounded to it first, as mergekit's
        rescale computes them in the tensor's dtype."""
        if kept.dtype in LOW_PRECISION:
            factor = l1_factor_rounded(self.before, self.after, kept.dtype, RESCALE_EPS)
            return kept if factor is None else kept.mul_(factor.to(kept.device))
        return kept if self.factor == 1.0 else kept.mul_(self.factor)


def generator_copy(generator: torch.Generator) -> torch.Generator:
    """A generator in the same state. A statistics pass draws from a copy of ctx.generator(i) the
    masks merge() will draw later (e.g. to know their L1 norm), leaving merge()'s stream untouched."""
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy
