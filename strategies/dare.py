"""DARE: drop and rescale task vectors, then combine linearly or with TIES' sign election.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024 (arXiv 2311.03099).

Semantics, per tensor: delta_i = theta_i - base; each entry is dropped with probability
1 - density_i and survivors are multiplied by 1/density_i (`rescale`, default true). The random
mask is drawn from a generator seeded by (recipe seed, tensor name, model reference), so the
result does not depend on execution order, threads or device count. Then:
- `dare_linear`: out = base + lambda * sum_i w_i delta_i (/ sum_i w_i with `normalize`);
- `dare_ties`: TIES' sign election and disjoint merge over the dropped deltas.

Intended difference from mergekit 0.1.5: mergekit rescales survivors so the delta keeps its L1
norm (a per-tensor factor close to 1/density); we use the paper's 1/density, which keeps each
entry's expectation. Masks also differ (mergekit draws from the global torch RNG).
"""

from __future__ import annotations

import torch
from pydantic import Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import SparseModel, TaskArithmeticParams, combine, dare_drop_, deltas_, weights_problem


class DareParams(TaskArithmeticParams):
    rescale: bool = Field(True, description="multiply kept entries by 1/density")


class _Dare(Strategy):
    Params = DareParams
    ModelParams = SparseModel
    needs_base = True
    uses_base = True
    identity_params = {"weight": 1.0, "density": 1.0}
    row_separable = True
    sign_consensus = False

    @classmethod
    def check_params(cls, params, model_params) -> str | None:
        return weights_problem([p.weight for p in model_params], params.normalize, cls.sign_consensus)

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        deltas = deltas_(tensors, base)
        for i, (d, p) in enumerate(zip(deltas, model_params)):
            dare_drop_(d, p.density, ctx.generator(i, d.device), params.rescale)
        weights = [p.weight for p in model_params]
        return combine(deltas, weights, base, params.lambda_, params.normalize, self.sign_consensus)


class DareLinear(_Dare):
    name = "dare_linear"
    summary = "random drop + rescale of task vectors, then weighted sum"


class DareTies(_Dare):
    name = "dare_ties"
    summary = "random drop + rescale of task vectors, then TIES sign election"
    sign_consensus = True
