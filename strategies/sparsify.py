"""Which entries of a task vector a method keeps, found exactly over row blocks: top-k and rank
thresholds and order statistics by radix select on float bit patterns (no sort, no block kept),
DARE's random drop, and mergekit's L1 rescale of what is kept. The entries are float32, or
bfloat16 / float16 where a recipe computes in that dtype (ranked on their exact values).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merge_lab.strategies.low_precision import LOW_PRECISION, l1_factor_rounded


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
