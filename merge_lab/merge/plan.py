"""A merge plan and what its planners see: every output tensor with its inputs and computation
(Plan), work to run once before the engine (PlanStep), and the recipe with its opened
checkpoints (PlanContext). Made by merge.planner, run by merge.engine, written up by merge.card.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.merge.interface import Strategy
from merge_lab.merge.ops import ConstantOp, Deferred, TensorTask, predicted_peak_bytes
from merge_lab.merge.recipe import Recipe


class PlanStep(Protocol):
    """Work a plan needs done once, after planning and before the engine runs, that may read
    tensors or run a model (planning may do neither): it gives the values of Deferred outputs."""

    def run(self) -> dict[str, torch.Tensor]:
        """Output tensor name -> its value, for every Deferred output this step owns."""
        ...


@dataclass
class Plan:
    recipe: Recipe
    strategy: str
    tasks: list[TensorTask]
    config: dict  # the output config.json
    side_files_from: Path | None  # folder whose tokenizer / generation config are copied
    inputs: list[Checkpoint]
    notes: list[str] = field(default_factory=list)  # things the user should know (printed by validate)
    steps: list[PlanStep] = field(default_factory=list)  # run by prepared(), before the engine
    tokenizer: Any = None  # the tokenizer written to the output (merge.tokenizer); None: side files copied

    @property
    def output_bytes(self) -> int:
        return sum(t.numel * torch.empty((), dtype=t.dtype).element_size() for t in self.tasks)

    @property
    def input_bytes(self) -> int:
        return sum(c.nbytes for c in self.inputs)

    def predicted_peak_bytes(self, prefetch: int = 1, chunk_elements: int | None = None) -> int:
        """The engine's working memory for this plan (see ops.predicted_peak_bytes)."""
        return predicted_peak_bytes(self.tasks, prefetch, chunk_elements)

    def prepared(self) -> Plan:
        """This plan with its steps run and their Deferred outputs bound to the values computed
        (a copy; the notes list is shared, so what the engine adds to it shows in both)."""
        if not self.steps:
            return self
        values: dict[str, torch.Tensor] = {}
        for step in self.steps:
            values.update(step.run())
        tasks = []
        for t in self.tasks:
            if isinstance(t.op, Deferred):
                value = values.get(t.output)
                if value is None or tuple(value.shape) != t.shape:
                    got = "nothing" if value is None else f"shape {tuple(value.shape)}"
                    raise RuntimeError(f"internal: {t.op.step} gave {got} for '{t.output}' of shape {t.shape}")
                t = replace(t, op=ConstantOp(value))
            tasks.append(t)
        return replace(self, tasks=tasks, steps=[])


@dataclass
class PlanContext:
    """What a strategy's planner may use: the recipe and the opened checkpoints."""

    recipe: Recipe
    strategy: Strategy
    base: Checkpoint | None
    models: list[Checkpoint]
    model_refs: list[str]

    @property
    def reference(self) -> Checkpoint:
        return self.base if self.base is not None else self.models[0]
