"""`merge-lab moe config.yaml -o out/`: run a mergekit-moe config through h3_moe.

The config is read as mergekit-moe reads it (merge_lab.moe.mergekit_config), translated into an
h3_moe recipe whose routers are mergekit's gates (`router_init: gates`, rows computed by the
GateInit plan step, merge_lab.moe.gates), planned header-only (experts fit the base, output
architecture) and streamed by the same engine and writer as `merge`. An optional `train:` block
(our h3 training keys, merge_lab.moe.train_config.TrainConfig; mergekit-moe ignores it) trains those
routers with the H3 gating loss through `merge_lab.moe.pipeline.fuse`: prompt-averaged gates
become trained ones, and the summary says the routing accuracy before and after.

An expert's residual_scale multiplies its down_proj and its noise_scale adds Gaussian noise to its
FFN weights (ExpertOp; the noise is drawn as `mergekit-moe --random-seed 0` draws it, from the
recipe's seed, 0: merge_lab.moe.noise). Qwen MoE's one shared expert is h3_moe's `shared_expert`:
the shared model's FFN, gated by its own row; from a llama / mistral base the output is Qwen2-MoE
with zero q/k/v biases (h3_moe's `architecture: qwen2_moe`), as mergekit-moe writes it. Any
reference may be `model+adapter`: the adapter is applied while streaming (core.lora_applied), and
the gates are computed on the adapted base. DeepSeek MoE output is refused (remote code only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merge_lab.core.config import Where
from merge_lab.errors import MergeLabError
from merge_lab.merge.plan import Plan
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.layout import FAMILIES
from merge_lab.moe.mergekit_config import (
    H3_FAMILY,
    MergekitExtras,
    MergekitMoeConfig,
    base_model_type,
    load_moe_file,
    translate,
)


@dataclass
class MoeResult:
    path: Path | None  # None when training stopped early
    architecture: str  # mergekit's name for what was written (Mixtral, Qwen3 MoE, ...)
    gate_mode: str
    experts: int
    tensors: int = 0  # written by the engine (0 after training: the export writes them)
    steps_done: int = 0
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    notes: list[str] = field(default_factory=list)


def refuse_unsupported(config: MergekitMoeConfig, where: Where, extras: MergekitExtras) -> None:
    """What mergekit-moe would write that merge-lab will not: an error naming the key and line."""
    arch = extras.architecture or ""
    key = "architecture" if config.architecture else "base_model"
    if arch == "DeepSeek MoE":
        raise MergeLabError(
            f"{where(key)}: mergekit-moe's DeepSeek MoE output is model_type 'deepseek' (DeepseekForCausalLM), which "
            "transformers loads only with the remote code of deepseek-ai/deepseek-moe-16b-base (its native DeepSeek "
            "classes are V2 / V3, another attention layout), and merge-lab never runs remote code. Set "
            "architecture: mixtral (no shared expert) or architecture: qwen (Qwen2-MoE, exactly one shared expert)."
        )
    if arch not in H3_FAMILY:
        raise MergeLabError(f"{where(key)}: output architecture {arch} is not written by merge-lab moe; it writes "
                            "Mixtral, Qwen MoE and Qwen3 MoE. Set architecture: mixtral.")


def _recipe_where(where: Where, n_experts: int) -> Where:
    """The config's line map under the translated recipe's keys, so recipe errors point into the file."""
    lines: dict[tuple, int] = {}

    def copy(to: tuple, frm: tuple) -> None:
        line = where.line(*frm)
        if line is not None:
            lines[to] = line

    copy(("base_model",), ("base_model",))
    copy(("dtype",), ("dtype",))
    copy(("models",), ("experts",))
    copy(("parameters", "top_k"), ("experts_per_token",))
    copy(("parameters", "router_init"), ("gate_mode",))
    copy(("parameters", "architecture"), ("architecture",))
    copy(("parameters", "shared_expert"), ("shared_experts", 0, "source_model"))
    copy(("parameters", "shared_residual_scale"), ("shared_experts", 0, "residual_scale"))
    copy(("parameters", "shared_noise_scale"), ("shared_experts", 0, "noise_scale"))
    for i in range(n_experts):
        copy(("models", i), ("experts", i))
        copy(("models", i, "model"), ("experts", i, "source_model"))
        copy(("models", i, "parameters", "residual_scale"), ("experts", i, "residual_scale"))
        copy(("models", i, "parameters", "noise_scale"), ("experts", i, "noise_scale"))
    lines.update({k: v for k, v in where.lines.items() if k[:1] == ("train",)})
    return Where(where.source, lines)


def moe_recipe(path: str | Path, allow_all_same: bool = False) -> tuple[Recipe, MergekitExtras]:
    """The h3_moe recipe for a mergekit-moe config file (routers: its gates), and what translation kept aside."""
    path = Path(path)
    config, where, train = load_moe_file(path, allow_all_same=allow_all_same)
    data, extras = translate(config, where)
    refuse_unsupported(config, where, extras)
    family = H3_FAMILY[extras.architecture or ""]
    if family != FAMILIES.get(base_model_type(config, where)):  # Qwen MoE from a llama / mistral base
        data["parameters"]["architecture"] = family
    data["parameters"].update({"router_init": "gates", "router_gates": str(path)})
    for entry, e in zip(data["models"], config.experts):
        scales = {"residual_scale": e.residual_scale, "noise_scale": e.noise_scale}
        if any(v is not None for v in scales.values()):
            entry["parameters"] = {k: v for k, v in scales.items() if v is not None}
    if train is not None:
        data["train"] = train
    rwhere = _recipe_where(where, len(config.experts))
    recipe = Recipe.located(data, rwhere)  # the recipe's errors name the config's lines
    recipe.check_distinct_models()
    return recipe, extras


def moe_plan(path: str | Path, allow_all_same: bool = False) -> tuple[Plan, MergekitExtras]:
    """The header-only plan of a mergekit-moe config (what `merge-lab validate` checks): models,
    adapters (targets, shapes), output layout; no tensor read, no gate computed."""
    from merge_lab.merge.planner import make_plan

    recipe, extras = moe_recipe(path, allow_all_same)
    return make_plan(recipe), extras


def run_moe(path: str | Path, out: str | Path, *, force: bool = False, progress: bool = True,
            device: str = "cpu", allow_all_same: bool = False, console=None) -> MoeResult:
    """Build (and with `train:`, fusion-train) the MoE of a mergekit-moe config at `out`."""
    from merge_lab.merge.engine import run_plan
    from merge_lab.merge.planner import make_plan

    recipe, extras = moe_recipe(path, allow_all_same)
    info = MoeResult(None, extras.architecture or "", extras.gate_mode, extras.routed_experts)
    if recipe.train is None:
        plan = make_plan(recipe)  # header-only: experts fit the base, layout, dtypes
        result = run_plan(plan, out, force=force, device=device, progress=progress, console=console)
        info.path, info.tensors, info.notes = result.path, result.tensors, plan.notes
        return info
    from merge_lab.moe.pipeline import fuse

    fused = fuse(recipe, out, force=force, progress=progress, console=console)
    info.path, info.steps_done, info.notes = fused.path, fused.steps_done, fused.notes
    info.accuracy_before, info.accuracy_after = fused.accuracy_before, fused.accuracy_after
    return info
