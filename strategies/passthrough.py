"""Passthrough: one model's tensors, copied (optionally scaled).

With mergekit's `slices:` it stacks layer ranges into a new model (a "frankenmerge"): each
output slice takes one source's layers as they are, and a model may be stacked with itself.

Semantics (those of mergekit 0.1.5): exactly one input per tensor (one model, or one source per
slice); its per-model `scale`, when set, multiplies the tensor (e.g. `scale: 0` under a filter
zeroes some projections of a duplicated layer); unset, the tensor is copied bit for bit.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, Field

from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.strategies.common import PARAMS_CONFIG, ComputesInDtype


class PassthroughModel(BaseModel):
    model_config = PARAMS_CONFIG
    scale: float | None = Field(None, description="multiply the tensor by this (unset: copy it unchanged)")


class Passthrough(ComputesInDtype, Strategy):  # `scale` multiplies in the arithmetic dtype, as in mergekit
    name = "passthrough"
    summary = "copy one model's tensors; with slices:, stack layer ranges (frankenmerge)"
    ModelParams = PassthroughModel
    min_models = 1
    max_models = 1
    row_separable = True

    def merge(self, tensors, base, params, model_params, ctx: TensorContext) -> torch.Tensor:
        scale = model_params[0].scale
        return tensors[0] if scale is None else tensors[0].mul_(scale)
