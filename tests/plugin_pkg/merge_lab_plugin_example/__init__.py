"""An example plugin: the element-wise median of the models (robust to one outlier model)."""

from __future__ import annotations

import torch

from merge_lab import Strategy


class Median(Strategy):
    name = "median"
    summary = "element-wise median of the models (example plugin)"

    def merge(self, tensors, base, params, model_params, ctx) -> torch.Tensor:
        return torch.stack(tensors).median(dim=0).values
