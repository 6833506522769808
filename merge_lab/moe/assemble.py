"""Assembly plan: base + N aligned experts -> one MoE checkpoint, streamed by the merge engine.

Every output tensor is a TensorTask whose op (merge.ops protocol) reads its inputs memory-mapped:
ExpertOp, an expert FFN tensor from the expert's checkpoint, or base + scale * B @ A from a LoRA
adapter; NonFfnOp, attention, embeddings, norms and head from the base (or the experts' average,
`non_ffn: average`); one router per layer (router_init: RandomRouterOp, or rows a CentroidInit or
GateInit step computes before the engine runs), and zeros for what the family adds (ConstantOp).
Tensors outside the FFN that an expert changed are measured while they stream by, and the
summary goes into the plan's notes (printed, and written to the model card).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.core.adapters import AdapterCheckpoint, is_adapter, lora_delta, open_model
from merge_lab.core.architecture import MLP_ROLES, Role, classify
from merge_lab.core.checkpoint import TORCH_DTYPE_BY_NAME, Checkpoint
from merge_lab.core.lora_applied import LoraAppliedCheckpoint, input_checkpoints
from merge_lab.core.references import ModelOpener
from merge_lab.errors import MergeLabError
from merge_lab.merge.ops import ConstantOp, Deferred, Input, TensorOp, TensorTask
from merge_lab.merge.plan import Plan, PlanContext
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.layout import moe_config, output_family
from merge_lab.moe.noise import NoisedTensor, NoiseInit, NoiseStream, add_noise, draw_key
from merge_lab.moe.router_init import CentroidInit, GateInit, RandomRouterOp, check_gates_config


class H3Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(2, ge=1, description="experts each token is routed to")
    router_init: Literal["random", "centroid", "gates"] = Field(
        "random", description="random; centroid: rows from the base's hidden states on each label's prompts; "
                              "gates: mergekit-moe's rows for the config named by router_gates"
    )
    non_ffn: Literal["base", "average"] = Field(
        "base", description="where attention, norms and embeddings come from: the base, or the experts' mean"
    )
    router_data: str | None = Field(
        None, description="JSONL of labelled prompts for centroid init (default: train.data, which may also be blocks)"
    )
    router_std: float = Field(0.02, gt=0, description="standard deviation of random router rows")
    router_gates: str | None = Field(
        None, description="mergekit-moe config (gate_mode, prompts) whose gates are the rows (router_init: gates)"
    )
    shared_expert: str | None = Field(
        None, description="Qwen2-MoE output only: model folder (a fine-tune of the base) whose FFN is every layer's "
                          "shared expert (mergekit-moe's shared_experts[0]; its gate row: the gates' config with "
                          "router_init: gates, else zeros); unset: a zero placeholder that adds nothing"
    )
    shared_residual_scale: float | None = Field(None, description="factor on the shared expert's down_proj")
    shared_noise_scale: float | None = Field(None, description="std of Gaussian noise on the shared expert's FFN")
    architecture: Literal["mixtral", "qwen2_moe", "qwen3_moe"] | None = Field(
        None, description="output layout (default: the base's: llama / mistral -> mixtral, qwen2 -> qwen2_moe, "
                          "qwen3 -> qwen3_moe); qwen2_moe from a llama / mistral base adds zero q/k/v biases, "
                          "as mergekit-moe's Qwen MoE does"
    )


class H3ModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    residual_scale: float | None = Field(
        None, description="factor on this expert's down_proj (mergekit-moe's residual_scale; default: none)"
    )
    noise_scale: float | None = Field(
        None, description="std of Gaussian noise added to this expert's FFN weights (mergekit-moe's noise_scale, "
                          "drawn as `mergekit-moe --random-seed SEED` draws it: merge_lab.moe.noise)"
    )


@dataclass(frozen=True, eq=False)
class Expert:
    """One expert's reading of a base tensor: which inputs to read and how they make the tensor."""

    label: str
    ckpt: Checkpoint

    @property
    def is_adapter(self) -> bool:
        return isinstance(self.ckpt, AdapterCheckpoint)

    def inputs(self, name: str) -> list[Input]:
        if not self.is_adapter:
            return [(self.ckpt, name)]
        pair = self.ckpt.pairs.get(name)
        return [(self.ckpt, pair.a), (self.ckpt, pair.b)] if pair else []

    def value(self, name: str, base: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
        if not self.is_adapter:
            return xs[0]
        if not xs:
            return base
        pair = self.ckpt.pairs[name]
        return base + lora_delta(xs[0], xs[1], pair.scale, pair.fan_in_fan_out)


@dataclass
class NonFfnReport:
    """How far each expert moved the tensors outside its FFN; kept as one note in the plan."""

    notes: list[str]
    index: int
    policy: str
    largest: dict[str, tuple[float, str]] = field(default_factory=dict)
    changed: dict[str, int] = field(default_factory=dict)

    def record(self, label: str, name: str, base: torch.Tensor, value: torch.Tensor) -> None:
        diff = (value - base).norm().item()
        if diff == 0.0:
            return
        rel = diff / max(base.norm().item(), 1e-12)
        self.changed[label] = self.changed.get(label, 0) + 1
        if rel > self.largest.get(label, (-1.0, ""))[0]:
            self.largest[label] = (rel, name)
        parts = [
            f"'{lab}' changed {self.changed[lab]} tensor(s), largest relative change {r:.2e} ({n})"
            for lab, (r, n) in self.largest.items()
        ]
        what = "taken from the base" if self.policy == "base" else "averaged over the experts"
        self.notes[self.index] = f"weights outside the FFN ({what}, non_ffn: {self.policy}): " + "; ".join(parts)


@dataclass(frozen=True, eq=False)
class ExpertOp(TensorOp):
    """One expert's copy of a base FFN tensor: its own, or the base's plus its LoRA delta, plus
    noise when `noise` is set (noise_scale), times `scale` when set (residual_scale on down_proj);
    both in the input dtype, before the output cast, as mergekit-moe does them."""

    expert: Expert
    base: Checkpoint
    name: str  # the base's tensor
    scale: float | None = None
    noise: tuple[NoiseStream, NoisedTensor, float] | None = None  # (stream, this tensor's draw, noise_scale)

    def arguments(self) -> tuple[Input, ...]:
        base = [(self.base, self.name)] if self.expert.is_adapter else []
        return (*base, *self.expert.inputs(self.name))

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        base, xs = (inputs[0], inputs[1:]) if self.expert.is_adapter else (None, inputs)
        value = self.expert.value(self.name, base, xs)
        if self.noise is not None:
            stream, draw, noise_scale = self.noise
            return add_noise(value, draw.output, draw.dtype, noise_scale, stream, self.scale)
        return value if self.scale is None else value * self.scale


@dataclass(frozen=True, eq=False)
class NonFfnOp(TensorOp):
    """A tensor outside the FFN: the base's, or the experts' mean; what each expert changed goes
    to the report (a shared accumulator, the op's one side effect)."""

    experts: tuple[Expert, ...]
    base: Checkpoint
    name: str
    policy: str  # non_ffn: base | average
    report: NonFfnReport

    def _per_expert(self) -> list[list[Input]]:
        floating = self.base.info(self.name).dtype.is_floating_point
        return [e.inputs(self.name) if floating else [] for e in self.experts]

    def arguments(self) -> tuple[Input, ...]:
        return ((self.base, self.name), *(i for ins in self._per_expert() for i in ins))

    def execute(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        base, rest = inputs[0], inputs[1:]
        values = []
        for expert, ins in zip(self.experts, self._per_expert()):
            xs, rest = rest[:len(ins)], rest[len(ins):]
            v = expert.value(self.name, base, xs)
            self.report.record(expert.label, self.name, base, v)
            values.append(v)
        if self.policy == "base" or not base.is_floating_point():
            return base
        return torch.stack(values).mean(0)


def h3_params(recipe: Recipe) -> H3Params:
    return recipe.validate_block(H3Params, ("parameters",), "h3_moe parameters")


def expert_labels(recipe: Recipe) -> list[str]:
    labels = [m.label or Path(m.model).name for m in recipe.models]
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if lab in seen:
            raise MergeLabError(
                f"{recipe.where('models', i, 'label')}: label '{lab}' is used by models {seen[lab]} and {i}; "
                "each expert needs its own label."
            )
        seen[lab] = i
    return labels


def _check_experts(base: Checkpoint, experts: list[Expert]) -> None:
    problems = []
    for e in experts:
        if e.is_adapter:
            e.ckpt.check_fits(base)
            continue
        if e.ckpt.model_type != base.model_type:
            problems.append(f"{e.ckpt.path} is a '{e.ckpt.model_type}' model but the base is '{base.model_type}'")
            continue
        missing = [n for n in base.tensors if n not in e.ckpt]
        extra = [n for n in e.ckpt.tensors if n not in base.tensors]
        if missing or extra:
            problems.append(
                f"{e.ckpt.path} has different tensors from the base (missing e.g. {missing[:1]}, extra e.g. {extra[:1]})"
            )
            continue
        for n, info in base.tensors.items():
            if e.ckpt.info(n).shape != info.shape:
                problems.append(f"tensor '{n}': shape {e.ckpt.info(n).shape} in {e.ckpt.path} but {info.shape} in the base")
                break
    if problems:
        raise MergeLabError(
            "the experts do not fit the base (they must all be fine-tunes of it):\n  " + "\n  ".join(problems)
        )


def open_expert(recipe: Recipe, ref: str, where: str, opened: Checkpoint | None = None) -> Checkpoint:
    """An expert's weights: a bare PEFT adapter folder (trained on the base) as an AdapterCheckpoint;
    anything else as merge recipes open references (`model+adapter`: core.lora_applied, the
    adapter applied while streaming), or `opened` when the planner has opened it so already."""
    path = recipe.resolve_path(ref)
    if is_adapter(path):
        return open_model(path)
    return opened if opened is not None else ModelOpener(recipe.resolve_path).open(ref, where)


def build_moe_plan(ctx: PlanContext, strategy_name: str) -> Plan:
    recipe = ctx.recipe
    params = h3_params(recipe)
    labels = expert_labels(recipe)
    base = ctx.base
    assert base is not None
    experts = [Expert(lab, open_expert(recipe, m.model, recipe.where("models", i, "model"), ctx.models[i]))
               for i, (lab, m) in enumerate(zip(labels, recipe.models))]
    _check_experts(base, experts)
    expert_params = [recipe.validate_block(H3ModelParams, ("models", i, "parameters"), "expert parameters")
                     for i in range(len(experts))]
    scales = [p.residual_scale for p in expert_params]
    n = len(experts)
    if params.top_k > n:
        raise MergeLabError(f"{recipe.where('parameters', 'top_k')}: top_k = {params.top_k} but there are only {n} experts.")
    family = params.architecture and output_family(base.model_type, params.architecture,
                                                   recipe.where("parameters", "architecture"))
    config, layout = moe_config(base.config, n, params.top_k, labels, str(base.path / "config.json"),
                                shared_expert=params.shared_expert is not None, family=family)
    shared: Expert | None = None
    if params.shared_expert is not None:
        if layout.family != "qwen2_moe":
            raise MergeLabError(f"{recipe.where('parameters', 'shared_expert')}: a shared expert needs a Qwen2-MoE "
                                f"output (a qwen2 base, or architecture: qwen2_moe); this base gives {layout.family}. "
                                "Remove shared_expert.")
        shared = Expert("shared expert", open_expert(recipe, params.shared_expert,
                                                     recipe.where("parameters", "shared_expert"),
                                                     base if recipe.is_base(params.shared_expert) else None))
        _check_experts(base, [shared])
    if recipe.output_dtype:
        config["torch_dtype"] = config["dtype"] = recipe.output_dtype
    hidden = int(base.config["hidden_size"])
    std = params.router_std

    centroid = False
    if params.router_init == "centroid":
        data = params.router_data or (recipe.train or {}).get("data")
        if not data:
            raise MergeLabError(
                f"{recipe.where('parameters', 'router_init')}: centroid init needs labelled prompts: set "
                "parameters.router_data (or train.data) to a JSONL file of {prompt, response, label} rows."
            )
        if isinstance(base, LoraAppliedCheckpoint):
            raise MergeLabError(f"{recipe.where('base_model')}: centroid router init runs the base folder's model, "
                                "without the adapter; use router_init: random or gates with a `base+adapter` base.")
        centroid = True
    gates = params.router_init == "gates"
    if gates:
        if not params.router_gates:
            raise MergeLabError(
                f"{recipe.where('parameters', 'router_init')}: router_init: gates takes its rows from a mergekit-moe "
                "config: set parameters.router_gates to that file (or run it with `merge-lab moe`)."
            )
        check_gates_config(Path(params.router_gates), base.path, n, recipe.where("parameters", "router_gates"))

    def out_dtype(dt: torch.dtype) -> torch.dtype:
        return TORCH_DTYPE_BY_NAME[recipe.output_dtype] if recipe.output_dtype and dt.is_floating_point else dt

    notes: list[str] = [""]
    report = NonFfnReport(notes, 0, params.non_ffn)
    notes[0] = (
        f"weights outside the FFN: {'from the base' if params.non_ffn == 'base' else 'the experts average'} "
        "(non_ffn); no expert changed any"
    )
    adapters = [e for e in experts if e.is_adapter]
    for e in adapters:
        touched = sorted({p for p in e.ckpt.pairs if classify(p).role not in MLP_ROLES})
        if touched:
            notes.append(f"adapter '{e.label}' also adapts {len(touched)} tensor(s) outside the FFN, e.g. {touched[0]}")

    router_dtype = out_dtype(next(i.dtype for i in base.tensors.values() if i.dtype.is_floating_point))
    stream = NoiseStream(recipe.seed)
    draws: dict[tuple[int, int, Role], NoisedTensor] = {}  # (layer, expert, role) -> its noise draw
    tasks: list[TensorTask] = []
    routers: dict[str, int] = {}  # router tensor -> its layer
    shared_gates: dict[str, int] = {}  # shared expert gate -> its layer (from the gates' config)

    def expert_task(e: Expert, slot: int, output: str, name: str, role: Role, layer: int,
                    scale: float | None, noise_scale: float | None) -> TensorTask:
        """One expert's FFN tensor; a noised one also takes its place in mergekit's draw order
        (`slot`: the expert's index, the shared expert after the routed ones)."""
        info, noise = base.info(name), None
        if noise_scale is not None:
            source = info.dtype if e.is_adapter else e.ckpt.info(name).dtype
            draws[(layer, slot, role)] = draw = NoisedTensor(output, info.shape, source)
            noise = (stream, draw, noise_scale)
        return TensorTask(output, info.shape, out_dtype(info.dtype), ExpertOp(e, base, name, scale, noise))

    for name, info in base.tensors.items():
        role = classify(name)
        if role.role in MLP_ROLES and role.layer is not None:
            down = role.role == Role.MLP_DOWN
            for k, e in enumerate(experts):
                tasks.append(expert_task(e, k, layout.expert_name(role.layer, k, role.role), name, role.role,
                                         role.layer, scales[k] if down else None, expert_params[k].noise_scale))
            if shared is not None:
                tasks.append(expert_task(shared, n, layout.shared_name(role.layer, role.role), name, role.role,
                                         role.layer, params.shared_residual_scale if down else None,
                                         params.shared_noise_scale))
            layer, router = role.layer, layout.router_name(role.layer)
            if router not in routers:
                routers[router] = layer
                op: TensorOp = (Deferred("centroid router init") if centroid
                                else Deferred("mergekit-moe gate init") if gates
                                else RandomRouterOp(n, hidden, std, recipe.seed, layer))
                tasks.append(TensorTask(router, (n, hidden), router_dtype, op))
                for extra, shape in layout.extra_tensors(layer, hidden, shared=shared is not None):
                    extra_op: TensorOp = ConstantOp(torch.zeros(shape))
                    if shared is not None and gates and extra == layout.shared_gate_name(layer):
                        shared_gates[extra] = layer
                        extra_op = Deferred("mergekit-moe gate init")
                    tasks.append(TensorTask(extra, shape, router_dtype, extra_op))
                for bias, shape in layout.attention_biases(layer, base.config, set(base.tensors)):
                    tasks.append(TensorTask(bias, shape, router_dtype, ConstantOp(torch.zeros(shape))))
            continue
        tasks.append(TensorTask(name, info.shape, out_dtype(info.dtype),
                                NonFfnOp(tuple(experts), base, name, params.non_ffn, report)))
    if not routers:
        raise MergeLabError(f"{base.path}: found no FFN (mlp gate/up/down) tensors to turn into experts.")
    opened = [base] + [e.ckpt for e in experts] + ([shared.ckpt] if shared is not None else [])
    notes += list(dict.fromkeys(c.summary for c in opened if isinstance(c, LoraAppliedCheckpoint)))
    inputs = input_checkpoints(opened)  # a LoRA-applied view reads its model's folder and its adapter's
    steps: list = [CentroidInit(base.path, recipe, tuple(labels), routers)] if centroid else []
    if gates:
        steps.append(GateInit(Path(str(params.router_gates)), recipe.seed, routers, router_dtype, notes, shared_gates))
    if draws:
        order = tuple(draws[d] for d in sorted(draws, key=lambda d: draw_key(layout.family, *d)))
        steps.append(NoiseInit(order, stream, Path(str(params.router_gates)) if gates else None))
    return Plan(recipe, strategy_name, tasks, config, base.path, inputs, notes, steps)
