"""Plan: every output tensor, its inputs, its resolved parameters and its computation.

Made from configs and safetensors headers only, so `merge-lab validate` and `merge-lab plan`
can check a recipe and predict memory and disk before a single tensor is read. Work that needs
tensors or a model before the merge (the MoE's centroid router rows) is a PlanStep, run by
`Plan.prepared()` when the engine starts.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from merge_lab.core.architecture import classify, is_vocab_tensor, num_layers
from merge_lab.core.checkpoint import TORCH_DTYPE_BY_NAME, Checkpoint
from merge_lab.core.lora_applied import LoraAppliedCheckpoint, input_checkpoints
from merge_lab.core.references import ModelOpener
from merge_lab.errors import MergeLabError
from merge_lab.merge import interface as registry
from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.merge.ops import ConstantOp, CopyOp, Deferred, MergeOp, TensorTask, predicted_peak_bytes
from merge_lab.merge.params import check_shape, gradient_position, resolve
from merge_lab.merge.recipe import Recipe
from merge_lab.merge.slices import layout, sliced_config


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


def _check_keys(recipe: Recipe, cls: type[Strategy]) -> None:
    model_keys = set(registry.recipe_keys(cls.ModelParams))
    all_keys = model_keys | set(registry.recipe_keys(cls.Params))
    problems = []

    def unknown(key: str, allowed: set[str], path: tuple) -> None:
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listed = ", ".join(sorted(allowed)) or "none"
        problems.append(f"{recipe.where(*path)}: '{cls.name}' has no parameter '{key}'.{hint} Its parameters: {listed}.")

    for key, value in recipe.parameters.items():
        if key not in all_keys:
            unknown(key, all_keys, ("parameters", key))
        elif why := check_shape(value):
            problems.append(f"{recipe.where('parameters', key)}: {why}")
    for i, entry in enumerate(recipe.models):
        for key, value in entry.parameters.items():
            if key not in model_keys:
                if key in all_keys:
                    problems.append(
                        f"{recipe.where('models', i, 'parameters', key)}: '{key}' is merge-wide for "
                        f"'{cls.name}'; set it under the top-level 'parameters:'."
                    )
                else:
                    unknown(key, model_keys, ("models", i, "parameters", key))
            elif why := check_shape(value):
                problems.append(f"{recipe.where('models', i, 'parameters', key)}: {why}")
    if problems:
        raise MergeLabError("invalid parameters:\n  " + "\n  ".join(problems))


def _validated(model: type[BaseModel], values: dict[str, Any], recipe: Recipe, tensor: str, path: tuple) -> BaseModel:
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return recipe.validate_block(model, path, f"parameters for tensor '{tensor}'", values)
    except MergeLabError as e:
        raise MergeLabError(str(e)) from None


def resolve_params(
    ctx: PlanContext, tensor: str, entries: list[int], t: float | None = None, inputs: tuple[str, ...] | None = None
) -> tuple[BaseModel, list[BaseModel]]:
    """Resolve the merge-wide and per-model parameters for one tensor. `t` is its gradient
    position (default: its layer among the reference's); `inputs`, each model's own name for the
    tensor (in a slice, the source's layer), is what per-model filters match, as in mergekit."""
    cls = type(ctx.strategy)
    recipe = ctx.recipe
    if t is None:
        t = gradient_position(classify(tensor).layer, num_layers(ctx.reference.config))
    global_keys = registry.recipe_keys(cls.Params)
    model_keys = registry.recipe_keys(cls.ModelParams)
    glob = {k: resolve(v, tensor, t) for k, v in recipe.parameters.items() if k in global_keys}
    params = _validated(cls.Params, glob, recipe, tensor, ("parameters",))
    defaults = {k: resolve(v, tensor, t) for k, v in recipe.parameters.items() if k in model_keys}
    model_params = []
    for i in entries:
        values = dict(defaults)
        for k, v in recipe.models[i].parameters.items():
            r = resolve(v, tensor if inputs is None else inputs[i], t)
            if r is not None:
                values[k] = r
        model_params.append(_validated(cls.ModelParams, values, recipe, tensor, ("models", i, "parameters")))
    if why := cls.check_params(params, model_params):  # rules across parameters (strategies' check_params)
        raise MergeLabError(f"{recipe.where('parameters')}: parameters for tensor '{tensor}': {why}")
    return params, model_params


def out_dtype(recipe: Recipe, source: torch.dtype) -> torch.dtype:
    if not source.is_floating_point:
        return source
    return TORCH_DTYPE_BY_NAME[recipe.output_dtype] if recipe.output_dtype else source


def tensorwise_plan(ctx: PlanContext) -> Plan:
    """The default planner: every tensor of the reference model is merged across the models."""
    recipe, strategy = ctx.recipe, ctx.strategy
    cls = type(strategy)
    ref = ctx.reference
    names = list(ref.tensors)
    # shape and presence checks, all problems at once
    problems: list[str] = []
    vocab_rows: dict[str, int] = {}
    base_mode = recipe.tokenizer_mode is not None and recipe.tokenizer_mode in ("base", recipe.base_model)
    for ckpt in ctx.models:
        if ckpt.model_type != ref.model_type:
            problems.append(
                f"{ckpt.path}: is a '{ckpt.model_type}' model but {ref.path} is '{ref.model_type}'; "
                "merge only fine-tunes of one base architecture."
            )
            continue
        missing = [n for n in names if n not in ckpt]
        if missing:
            problems.append(f"{ckpt.path}: lacks {len(missing)} tensor(s) of {ref.path}, e.g. '{missing[0]}'.")
            continue
        extra = [n for n in ckpt.tensors if n not in ref.tensors]
        if extra:
            problems.append(f"{ckpt.path}: has {len(extra)} tensor(s) that {ref.path} lacks, e.g. '{extra[0]}'.")
        for n in names:
            a, b = ref.info(n).shape, ckpt.info(n).shape
            if a == b:
                continue
            if is_vocab_tensor(n) and a[1:] == b[1:]:
                if base_mode and ctx.base is not None:
                    vocab_rows[n] = min(vocab_rows.get(n, a[0]), b[0], a[0])
                    continue
                problems.append(
                    f"tensor '{n}': {ckpt.path} has {b[0]} vocabulary rows, {ref.path} has {a[0]}. "
                    "Set `tokenizer: base` to merge the shared rows and take the rest from the base."
                )
            else:
                problems.append(f"tensor '{n}': shape {b} in {ckpt.path} but {a} in {ref.path}.")
    if problems:
        raise MergeLabError("the models do not fit together:\n  " + "\n  ".join(problems[:20]))

    entries = list(range(len(recipe.models)))
    if cls.uses_base and recipe.base_model is not None:
        entries = [i for i in entries if not recipe.is_base(recipe.models[i].model)]  # by identity, not spelling
    models = [ctx.models[i] for i in entries]
    refs = tuple(ctx.model_refs[i] for i in entries)
    with_base = ctx.base is not None and cls.uses_base
    tasks = []
    for n in names:
        info = ref.info(n)
        if not info.dtype.is_floating_point:
            tasks.append(TensorTask(n, info.shape, info.dtype, CopyOp((ref, n))))
            continue
        params, model_params = resolve_params(ctx, n, entries)
        op = MergeOp(
            strategy, params, tuple(model_params), TensorContext(n, classify(n), recipe.seed, refs),
            tuple((m, n) for m in models), (ctx.base, n) if with_base else None, vocab_rows.get(n),
        )
        tasks.append(TensorTask(n, info.shape, out_dtype(recipe, info.dtype), op))
    config = with_dtype(recipe, ref.config)
    notes = [f"vocabulary of '{n}': {r} shared rows merged, the rest from the base" for n, r in vocab_rows.items()]
    notes += adapter_notes([*([ctx.base] if ctx.base else []), *ctx.models])
    inputs = input_checkpoints([*ctx.models, *([ctx.base] if ctx.base else [])])
    return Plan(recipe, cls.name, tasks, config, side_files(recipe, ref), inputs, notes)


def adapter_notes(checkpoints: list[Checkpoint]) -> list[str]:
    """One note per `model+adapter` reference: which adapter, on which base, at which scale."""
    return [c.summary for c in checkpoints if isinstance(c, LoraAppliedCheckpoint)]


def with_dtype(recipe: Recipe, config: dict) -> dict:
    """A copy of `config` naming the recipe's output dtype, if it sets one."""
    config = dict(config)
    if recipe.output_dtype:  # transformers 5 reads `dtype`, older versions `torch_dtype`
        config["torch_dtype" if "torch_dtype" in config else "dtype"] = recipe.output_dtype
    return config


def side_files(recipe: Recipe, ref: Checkpoint) -> Path:
    """The folder whose tokenizer and generation config the output gets."""
    if recipe.tokenizer_mode not in (None, "base", recipe.base_model):
        return recipe.resolve_path(recipe.tokenizer_mode)
    return ref.path


def check_inputs(recipe: Recipe, cls: type[Strategy]) -> None:
    """The recipe's (or one slice view's) models against what the strategy takes, before any read."""
    n = len(recipe.models)
    if n < cls.min_models:
        raise MergeLabError(
            f"{recipe.where('models')}: '{cls.name}' needs at least {cls.min_models} model(s), got {n}."
        )
    if cls.max_models is not None and n > cls.max_models:
        raise MergeLabError(f"{recipe.where('models')}: '{cls.name}' takes at most {cls.max_models} models, got {n}.")
    if cls.needs_base and recipe.base_model is None:
        raise MergeLabError(
            f"{recipe.source}: '{cls.name}' needs 'base_model:' (the model the others were fine-tuned from)."
        )
    _check_keys(recipe, cls)
    cls.check_recipe(recipe)


def make_plan(recipe: Recipe) -> Plan:
    """Check the recipe against the registry and the checkpoints' headers and lay out the merge."""
    cls = registry.get(recipe.merge_method)
    if recipe.slices is not None:
        if cls.structural:
            raise MergeLabError(f"{recipe.where('slices')}: '{cls.name}' builds its own architecture from 'models:'; "
                                "it takes no 'slices:'.")
        return sliced_plan(recipe, cls)
    check_inputs(recipe, cls)
    strategy = cls()
    opener = ModelOpener(recipe.resolve_path)  # `model+adapter` references: the adapter applied while streaming
    base = opener.open(recipe.base_model, recipe.where("base_model")) if recipe.base_model else None
    models = [opener.open(m.model, recipe.where("models", i, "model")) for i, m in enumerate(recipe.models)]
    ctx = PlanContext(recipe, strategy, base, models, [m.model for m in recipe.models])
    if cls.structural:
        return strategy.build_plan(ctx)
    return tensorwise_plan(ctx)


def sliced_plan(recipe: Recipe, cls: type[Strategy]) -> Plan:
    """A `slices:` recipe (see merge.slices): each slice checked as its own `models:` recipe, each
    output tensor a merge of its sources' tensors at the slice's layers, with the slice's parameters.
    A base model takes part (for strategies that use one) as the source it is in each slice."""
    assert recipe.slices is not None
    views = [recipe.slice_view(k) for k in range(len(recipe.slices))]
    for view in views:
        check_inputs(view, cls)
    strategy = cls()
    opened: dict[Path, Checkpoint] = {}
    opener = ModelOpener(recipe.resolve_path)

    def open_model(ref: str, *key_path: object) -> Checkpoint:
        key = recipe.model_identity(ref)
        if key not in opened:
            opened[key] = opener.open(ref, recipe.where(*key_path))
        return opened[key]

    base = open_model(recipe.base_model, "base_model") if recipe.base_model else None
    sources = [[open_model(src.model, "slices", k, "sources", i, "model") for i, src in enumerate(s.sources)]
               for k, s in enumerate(recipe.slices)]
    ref = base if base is not None else sources[0][0]
    kinds = [
        f"{recipe.where('slices', k, 'sources', i)}: {c.path} is a '{c.model_type}' model but {ref.path} is "
        f"'{ref.model_type}'; merge only fine-tunes of one base architecture."
        for k, row in enumerate(sources) for i, c in enumerate(row) if c.model_type != ref.model_type
    ]
    if kinds:
        raise MergeLabError("the models do not fit together:\n  " + "\n  ".join(kinds))
    with_base = base is not None and cls.uses_base
    ctxs, entries, base_at = [], [], []
    for k, view in enumerate(views):
        ctxs.append(PlanContext(view, strategy, base, sources[k], [m.model for m in view.models]))
        at = [i for i, m in enumerate(view.models) if view.is_base(m.model)]
        if with_base and not at:
            raise MergeLabError(
                f"{recipe.where('slices', k, 'sources')}: '{cls.name}' merges against the base_model, which is not "
                f"among slice {k}'s sources; add it with the layer_range it should give, as in mergekit."
            )
        base_at.append(at[0] if with_base else None)
        entries.append([i for i in range(len(view.models)) if not (with_base and i in at)])
    tasks = []
    for row in layout(recipe, sources):
        k, ctx, first = row.slice, ctxs[row.slice], sources[row.slice][0]
        info = first.info(row.inputs[0])
        if not info.dtype.is_floating_point:
            tasks.append(TensorTask(row.output, info.shape, info.dtype, CopyOp((first, row.inputs[0]))))
            continue
        params, model_params = resolve_params(ctx, row.output, entries[k], row.t, row.inputs)
        b = base_at[k]
        op = MergeOp(
            strategy, params, tuple(model_params),
            TensorContext(row.output, classify(row.output), recipe.seed, tuple(ctx.model_refs[i] for i in entries[k])),
            tuple((sources[k][i], row.inputs[i]) for i in entries[k]),
            (sources[k][b], row.inputs[b]) if b is not None else None,
        )
        tasks.append(TensorTask(row.output, info.shape, out_dtype(recipe, info.dtype), op))
    config = with_dtype(recipe, sliced_config(recipe, sources, ref.config))
    layers = sum(s.length for s in recipe.slices)
    notes = [f"{len(recipe.slices)} slice(s) give {layers} output layer(s)", *adapter_notes(list(opened.values()))]
    return Plan(recipe, cls.name, tasks, config, side_files(recipe, ref), input_checkpoints(list(opened.values())), notes)
