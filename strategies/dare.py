"""DARE: drop and rescale task vectors, then combine linearly or with TIES' sign election.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024 (arXiv 2311.03099).

Semantics (those of mergekit 0.1.5), per tensor: delta_i = theta_i - base; each entry is kept
with probability density_i (a Bernoulli mask; density >= 1 keeps the delta as it is, <= 0 drops
it all). With `rescale` (default true) the kept entries are multiplied by one factor per tensor,
||delta_i||_1 / ||kept_i||_1, which gives the task vector back its L1 norm (mergekit's
rescale; left unscaled when either norm is below 1e-7); `rescale: false` keeps them as they
are. Then:
- `dare_linear`: out = base + lambda * sum_i w_i delta_i (/ sum_i w_i with `normalize`);
- `dare_ties`: TIES' sign election and disjoint merge over the weighted dropped deltas.

The paper multiplies survivors by 1/density, which keeps each entry's expectation; the L1 factor
is close to it on large tensors (its expectation over masks is about 1/density). We follow
mergekit so that its recipes give its numbers: the mask is the same distribution, the factor the
same function of it. The masks themselves differ: ours are drawn from a generator seeded by
(recipe seed, tensor name, model reference), so results do not depend on execution order,
threads or device count; mergekit draws from the global torch RNG.

The L1 factor needs the whole tensor's mask, so it is a statistic (Strategy.stats_passes): one
pass over row blocks draws the masks from copies of the generators merge() will use
(common.generator_copy) and sums both norms in float64; the drop is then elementwise, and the
engine streams every tensor in row blocks.
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import (
    ComputesInDtype,
    RescaledParams,
    SparseModel,
    generator_copy,
    merge_sparsified,
    weights_problem,
)
from merge_lab.strategies.sparsify import L1Rescale, dare_drop_


class DareParams(RescaledParams):
    rescale: bool = Field(
        True,
        description="scale each dropped task vector back to its L1 norm before the drop (mergekit's rescale); "
        "false keeps the survivors as they are",
    )


def drops(p: SparseModel) -> bool:
    """Whether this model's task vector is randomly dropped (not kept or zeroed whole)."""
    return 0.0 < p.density < 1.0


class DropNorms(L1Rescale):
    """One model's L1 norms before and after its drop, the mask drawn from `generator`, a copy."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator


class _Dare(ComputesInDtype, Strategy):  # in the arithmetic dtype, rounded as mergekit's (common.combine)
    Params = DareParams
    ModelParams = SparseModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}
    row_separable = True  # given the L1 norms
    sign_consensus = False

    def stats_passes(self, params, model_params, dtype) -> int:
        return 1 if params.rescale and any(drops(p) for p in model_params) else 0

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        if stats is None:
            stats = [
                DropNorms(generator_copy(ctx.generator(i, base.device))) if drops(p) else None
                for i, p in enumerate(model_params)
            ]
        for t, p, norms in zip(tensors, model_params, stats):
            if norms is not None:
                delta = t - base
                norms.add(delta, dare_drop_(delta.clone(), p.density, norms.generator, rescale=False))
        return stats

    @classmethod
    def check_params(cls, params, model_params) -> str | None:
        return weights_problem([p.weight for p in model_params], params.normalize, cls.sign_consensus)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        stats = ctx.stats if ctx.stats is not None else self.tensor_stats(tensors, base, params, model_params, ctx)

        def drop_(i: int, delta: torch.Tensor) -> None:
            dare_drop_(delta, model_params[i].density, ctx.generator(i, delta.device), rescale=False)

        return merge_sparsified(tensors, base, params, model_params, drop_, self.sign_consensus, stats or ())


class DareLinear(_Dare):
    name = "dare_linear"
    summary = "random drop of task vectors, rescaled to their L1 norm, then weighted sum"


class DareTies(_Dare):
    name = "dare_ties"
    summary = "random drop of task vectors, rescaled to their L1 norm, then TIES sign election"
    sign_consensus = True
