"""mergekit-moe's `noise_scale`: Gaussian noise on an expert's FFN weights, drawn as mergekit draws it.

mergekit-moe 0.1.5 (`mergekit/moe/common.py`, `noise_and_scale`) adds
`torch.randn_like(tensor) * noise_scale` to every FFN tensor of an expert that sets it, in the
tensor's own (input) dtype, before `residual_scale` and before the output cast. The draws come
from torch's global RNG, one `randn_like` per tensor, in the order its writer visits them:

- after the gates (the `random` / `uniform_random` modes draw theirs from the same RNG first);
- layer by layer, expert by expert (routed experts in config order, then Qwen MoE's shared
  expert), and within an expert the projections in the writer's order: Mixtral gate, down, up;
  Qwen3 MoE gate, up, down; Qwen MoE down, gate, up (mergekit's qwen2 architecture file).

We reproduce that stream from a CPU generator seeded with the recipe's `seed`: the same numbers
as `mergekit-moe --random-seed SEED` (which seeds the global RNG through transformers' set_seed),
bit for bit. A plan step (NoiseInit) walks the order once before the engine runs and keeps each
noised tensor's generator state (5 KB); the expert's op then draws its noise from that state, so
the engine may compute tensors in any order. The walk costs one extra draw per noised tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from merge_lab.core.architecture import Role

# the projections of one expert in the order mergekit-moe's writer for each layout family visits them
DRAW_ORDER = {
    "mixtral": (Role.MLP_GATE, Role.MLP_DOWN, Role.MLP_UP),
    "qwen3_moe": (Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN),
    "qwen2_moe": (Role.MLP_DOWN, Role.MLP_GATE, Role.MLP_UP),
}


def draw_key(family: str, layer: int, expert: int, role: Role) -> tuple[int, int, int]:
    """Sort key of one expert tensor's draw: Mixtral and Qwen3 MoE write expert by expert, each
    expert's projections together; Qwen MoE writes projection by projection, all experts (the shared
    one last: give it the index after the routed experts) of each."""
    projection = DRAW_ORDER[family].index(role)
    return (layer, projection, expert) if family == "qwen2_moe" else (layer, expert, projection)


@dataclass(frozen=True)
class NoisedTensor:
    """One output tensor that gets noise: its name, shape and the dtype the noise is drawn in."""

    output: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class NoiseStream:
    """The generator state at each noised tensor's draw, filled by NoiseInit before the engine runs
    (read-only afterwards, so ops on any thread may draw from it)."""

    seed: int
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    def draw(self, output: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The standard normal noise mergekit's `randn_like` gives this tensor."""
        state = self.states.get(output)
        if state is None:
            raise RuntimeError(f"internal: no noise state for '{output}'; the engine runs plan.prepared()")
        g = torch.Generator()
        g.set_state(state)
        return torch.randn(shape, dtype=dtype, generator=g)


def add_noise(value: torch.Tensor, output: str, dtype: torch.dtype, noise_scale: float, stream: NoiseStream,
              residual_scale: float | None = None) -> torch.Tensor:
    """mergekit's noise_and_scale on one tensor, in the input `dtype`: value + noise * scale, then
    times residual_scale when given; back as float32 (exact: the values are `dtype` values)."""
    x = value.to(dtype)
    x = x + stream.draw(output, tuple(x.shape), dtype) * noise_scale
    if residual_scale is not None:
        x = x * residual_scale
    return x.float()


def gate_draw(gates_config: Path | None) -> tuple[str, tuple[int, int, int]] | None:
    """(gate_mode, shape) of the random gates mergekit draws before any noise, or None (prompt modes,
    or no mergekit-moe config: our own routers use their own generators)."""
    if gates_config is None:
        return None
    from merge_lab.moe.gates import gate_shape
    from merge_lab.moe.mergekit_config import base_path, gate_prompts, load_moe_file

    config, where, _ = load_moe_file(gates_config, allow_all_same=True)
    if config.gate_mode not in ("random", "uniform_random"):
        return None
    layers, hidden = gate_shape(base_path(config, where))
    return config.gate_mode, (layers, len(gate_prompts(config)), hidden)


@dataclass(frozen=True, eq=False)
class NoiseInit:
    """The plan step of noise_scale: walk mergekit-moe's draw order once and keep each noised
    tensor's generator state in `stream` (merge.planner.PlanStep; it binds no Deferred output)."""

    order: tuple[NoisedTensor, ...]
    stream: NoiseStream
    gates_config: Path | None = None  # the mergekit-moe config whose random gates come first

    def run(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.stream.seed)
        first = gate_draw(self.gates_config)
        if first is not None:  # the same calls as gates.random_gate_rows, to leave g where mergekit's RNG is
            mode, shape = first
            _ = torch.randn(shape, generator=g) if mode == "random" else torch.rand(shape, generator=g)
        for t in self.order:
            self.stream.states[t.output] = g.get_state()
            torch.randn(t.shape, dtype=t.dtype, generator=g)  # advance past this tensor's draw
        return {}

