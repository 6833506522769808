"""A base checkpoint with a PEFT LoRA adapter applied, read as if it were the merged model.

mergekit 0.1.5 turns a `base+adapter` reference into a full copy on disk (PEFT's
merge_and_unload, saved into its LoRA cache) before merging. Here the adapter is applied while
streaming instead: each adapted tensor is W' = W + scale * B @ A, computed per read (a whole
tensor, or only its rows [start, stop): B's rows, or A's columns for a transposed pair) in
float32 and rounded to W's dtype, which is what a merged copy in the base's dtype holds. With
DoRA, each row of W + delta is then scaled to the adapter's magnitude for it (row-wise, so row
blocks stream alike). Tensors the adapter saves whole (modules_to_save) replace the base's,
cast to its dtype as PEFT loads them. Nothing merged is written anywhere.

Everything the view can check without reading a tensor (every adapter tensor maps to a base
tensor of a fitting shape, ranks agree with adapter_config.json) is checked when it is made, so
`merge-lab validate` sees it; NaN / Inf in the adapter is refused when its tensors are read.

Working memory: reading an adapted block also holds its delta (one block of float32) and A in
float32 (r x in), beyond what ops.predicted_peak_bytes counts for an input.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import torch

from merge_lab.core.adapters import ADAPTER_WEIGHTS, AdapterCheckpoint, LoraPair
from merge_lab.core.checkpoint import Checkpoint, TensorInfo
from merge_lab.errors import MergeLabError


class LoraAppliedCheckpoint(Checkpoint):
    """`base` with `adapter` applied: the same tensor names, shapes and dtypes as the base.

    Its `path` is the base's (side files such as the tokenizer come from there); `parts` are the
    two folders actually read, for the model card's hashes and the output-folder checks."""

    def __init__(self, base: Checkpoint, adapter: AdapterCheckpoint):
        super().__init__(base.path)
        self.base, self.adapter = base, adapter
        adapter.check_fits(base)

    def __repr__(self) -> str:
        return f"LoraAppliedCheckpoint({str(self.base.path)!r}, {str(self.adapter.path)!r})"

    @property
    def parts(self) -> list[Checkpoint]:
        return [self.base, self.adapter]

    @cached_property
    def config(self) -> dict:
        return self.base.config

    @property
    def model_type(self) -> str:
        return self.base.model_type

    @cached_property
    def index(self) -> dict[str, str] | None:
        return self.base.index

    @cached_property
    def shards(self) -> dict[str, Path]:
        return self.base.shards

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.base.tensors

    @property
    def summary(self) -> str:
        """One line for the plan's notes and the model card."""
        scales = sorted({round(p.scale, 6) for p in self.adapter.pairs.values()})
        shown = ", ".join(f"{s:g}" for s in scales[:4]) + (", ..." if len(scales) > 4 else "")
        whole = f"; {len(self.adapter.saved)} tensor(s) replaced whole (modules_to_save)" if self.adapter.saved else ""
        whole += f"; {len(self.adapter.biases)} LoRA bias(es)" if self.adapter.biases else ""
        return (f"LoRA adapter {self.adapter.path} applied to {self.base.path} while streaming: "
                f"{len(self.adapter.pairs)} tensor(s) adapted at scale {shown or '-'}{whole}")

    def _adapter_part(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """An adapter tensor (or its rows) as float32, refused if it holds NaN / Inf."""
        x = self.adapter.read(name, rows, torch.float32)
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise MergeLabError(
                f"{self.adapter.path / ADAPTER_WEIGHTS}: tensor '{name}' holds {bad} NaN / Inf value(s); an adapter "
                "applied with it would spread them through the whole weight. Use an adapter saved before training diverged."
            )
        return x

    def delta(self, pair: LoraPair, rows: tuple[int, int] | None) -> torch.Tensor:
        """scale * B @ A in the target's orientation, float32, only the target's `rows` when given."""
        if pair.fan_in_fan_out:  # target [in, out]: its rows are A's columns
            a = self._adapter_part(pair.a)
            if rows is not None:
                a = a[:, rows[0]:rows[1]]
            return (a.T @ self._adapter_part(pair.b).T).mul_(pair.scale)
        return (self._adapter_part(pair.b, rows) @ self._adapter_part(pair.a)).mul_(pair.scale)

    def read(
        self,
        name: str,
        rows: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """As Checkpoint.read, of the tensor with the adapter applied."""
        pair, saved, bias = self.adapter.pairs.get(name), self.adapter.saved.get(name), self.adapter.biases.get(name)
        if pair is None and saved is None and bias is None:
            return self.base.read(name, rows, dtype, out)
        stored = self.base.info(name).dtype
        want = dtype if dtype is not None else stored
        if out is not None and out.dtype != want:
            raise MergeLabError(f"internal: read of '{name}' into a buffer of {out.dtype}, not {want}")
        into = out if want == torch.float32 else None  # the engine's float32 buffer: no extra copy
        if saved is not None:  # as PEFT loads it: into the base's tensor, in its dtype
            value = self._adapter_part(saved, rows).to(stored).float()
            if into is not None:
                value = into.reshape(-1)[: value.numel()].view(value.shape).copy_(value)
        else:
            value = self.base.read(name, rows, torch.float32, out=into)
        if pair is not None:
            value.add_(self.delta(pair, rows))
            if pair.magnitude is not None:  # DoRA (PEFT's merge): each row rescaled to its magnitude
                magnitude = self._adapter_part(pair.magnitude, rows)
                value.mul_((magnitude / torch.linalg.norm(value, dim=1)).unsqueeze(1))
        if bias is not None:  # lora_bias: the base's bias + scale * lora_B.bias
            value.add_(self._adapter_part(bias.b, rows).mul_(bias.scale))
        if into is not None:
            return value.copy_(value.to(stored)) if stored != torch.float32 else value
        value = value.to(stored).to(want)
        if out is None:
            return value
        return out.reshape(-1)[: value.numel()].view(value.shape).copy_(value)

    def get(self, name: str) -> torch.Tensor:
        if name in self.adapter.pairs or name in self.adapter.saved or name in self.adapter.biases:
            return self.read(name)
        return self.base.get(name)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.adapter.nbytes

    def file_hashes(self) -> dict[str, str]:
        """The base's files and the adapter's, the adapter's named by their folder."""
        return {**self.base.file_hashes(),
                **{f"{self.adapter.path}/{n}": h for n, h in self.adapter.file_hashes().items()}}

    def close(self) -> None:
        self.base.close()
        self.adapter.close()


def input_checkpoints(checkpoints: list[Checkpoint]) -> list[Checkpoint]:
    """The folders a plan reads: a LoRA-applied view stands for its base and its adapter, and a
    folder opened once (the base of a view that is also the recipe's base_model) is listed once."""
    out: list[Checkpoint] = []
    for c in checkpoints:
        for part in c.parts if isinstance(c, LoraAppliedCheckpoint) else [c]:
            if all(part is not o for o in out):
                out.append(part)
    return out
