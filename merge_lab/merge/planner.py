"""Plan: every output tensor, its inputs, its resolved parameters and its computation.

Made from configs and safetensors headers only, so `merge-lab validate` and `merge-lab plan`
can check a recipe and predict memory and disk before a single tensor is read. Work that needs
tensors or a model before the merge (the MoE's centroid router rows) is a PlanStep, run by
`Plan.prepared()` when the engine starts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from merge_lab.core.architecture import classify, is_vocab_tensor, num_layers
from merge_lab.core.checkpoint import TORCH_DTYPE_BY_NAME, Checkpoint
from merge_lab.core.lora_applied import LoraAppliedCheckpoint, input_checkpoints
from merge_lab.core.references import ModelOpener
from merge_lab.errors import MergeLabError
from merge_lab.merge import interface as registry
from merge_lab.merge.embeddings import vocabulary_rows
from merge_lab.merge.interface import Strategy, TensorContext
from merge_lab.merge.ops import CopyOp, MergeOp, TensorTask
from merge_lab.merge.params import check_shape, gradient_position, resolve
from merge_lab.merge.plan import Plan, PlanContext
from merge_lab.merge.recipe import Recipe
from merge_lab.merge.slices import layout, slice_vocabulary, sliced_config, sliced_vocabulary
from merge_lab.merge.tokenizer import OutputVocabulary, build_output_vocabulary, output_tokenizer


def check_keys(recipe: Recipe, cls: type[Strategy]) -> None:
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


def arithmetic_dtype(recipe: Recipe, stored: list[torch.dtype]) -> torch.dtype:
    """The dtype one tensor's merge computes in: the recipe's `compute_dtype`, else mergekit's
    (the inputs are cast to `dtype` when it is set, else merged in their stored dtypes promoted
    together: bfloat16 models compute in bfloat16, bfloat16 with float16 in float32).
    Strategies then compute in it or upcast, each as its mergekit counterpart does
    (Strategy.working_dtype)."""
    name = recipe.compute_dtype or recipe.dtype
    if name:
        return TORCH_DTYPE_BY_NAME[name]
    dtype = stored[0]
    for d in stored[1:]:
        dtype = torch.promote_types(dtype, d)
    return dtype


def merge_op(strategy: Strategy, params: BaseModel, model_params: list[BaseModel], context: TensorContext,
             models: tuple, base: tuple | None, recipe: Recipe) -> MergeOp:
    """A MergeOp computing in the recipe's arithmetic dtype for its inputs' stored dtypes."""
    inputs = models if base is None else (*models, base)
    arithmetic = arithmetic_dtype(recipe, [ckpt.info(name).dtype for ckpt, name in inputs])
    return MergeOp(strategy, params, tuple(model_params), context, models, base, arithmetic)


def arithmetic_note(recipe: Recipe, tasks: list[TensorTask]) -> list[str]:
    """A note for `validate` / `plan` when some tensors are computed in a 16-bit dtype."""
    low = sorted({str(t.op.working_dtype).removeprefix("torch.") for t in tasks
                  if isinstance(t.op, MergeOp) and t.op.working_dtype.itemsize < 4})
    if not low or recipe.compute_dtype:
        return []
    why = "the recipe's dtype" if recipe.dtype else "the models' stored dtype"
    return [f"arithmetic in {', '.join(low)} ({why}), as mergekit computes; `compute_dtype: float32` computes in float32"]


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
    vocab = output_vocabulary(ctx)
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
            if a == b or (vocab is not None and is_vocab_tensor(n) and a[1:] == b[1:]):
                continue
            if is_vocab_tensor(n) and a[1:] == b[1:]:
                problems.append(
                    f"tensor '{n}': {ckpt.path} has {b[0]} vocabulary rows, {ref.path} has {a[0]}. "
                    "Set `tokenizer: base` (or `union`, or a model; mergekit spells it `tokenizer_source`) to align the rows by token."
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
        inputs: tuple = tuple((m, n) for m in models)
        base_input = (ctx.base, n) if with_base else None
        shape = info.shape
        if vocab is not None and is_vocab_tensor(n):  # rows re-indexed to the output vocabulary
            rows = vocabulary_rows(recipe, vocab, n)
            inputs = tuple((rows.view(i), n) for i in entries)
            base_input = (rows.view(vocab.base_index), n) if with_base and vocab.base_index is not None else None
            shape = (vocab.rows, *info.shape[1:])
        op = merge_op(
            strategy, params, model_params, TensorContext(n, classify(n), recipe.seed, refs), inputs, base_input, recipe,
        )
        tasks.append(TensorTask(n, shape, out_dtype(recipe, info.dtype), op))
    config = with_dtype(recipe, ref.config)
    notes = arithmetic_note(recipe, tasks)
    if vocab is not None:
        config["vocab_size"] = vocab.rows
        notes.append(f"output vocabulary: {len(vocab.vocab)} tokens, {vocab.rows} rows; embedding rows aligned by token")
    notes += adapter_notes([*([ctx.base] if ctx.base else []), *ctx.models])
    opened = [*ctx.models, *([ctx.base] if ctx.base else [])]
    side = side_files(recipe, ref)
    return Plan(recipe, cls.name, tasks, config, side, input_checkpoints(opened), notes,
                tokenizer=output_tokenizer(recipe, vocab, side, opened))


def output_vocabulary(ctx: PlanContext) -> OutputVocabulary | None:
    """The output vocabulary when the recipe sets tokenizer keys: over the recipe's models and the
    base (added when it is not among them), as mergekit gathers vocabulary tensors."""
    recipe = ctx.recipe
    if recipe.tokenizer is None and recipe.tokenizer_source is None:
        return None
    members, refs = list(ctx.models), list(ctx.model_refs)
    base_index = None
    if ctx.base is not None:
        at = [i for i, r in enumerate(refs) if recipe.is_base(r)]
        if not at:
            members.append(ctx.base)
            refs.append(recipe.base_model or "")
        base_index = at[0] if at else len(members) - 1
    return build_output_vocabulary(recipe, members, refs, base_index)


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
    """The folder whose tokenizer and generation config the output gets (a union's: the reference's)."""
    if recipe.tokenizer_mode not in (None, "base", "union", recipe.base_model):
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
    check_keys(recipe, cls)
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
    if cls.structural and (recipe.tokenizer is not None or recipe.tokenizer_source is not None):
        key = "tokenizer" if recipe.tokenizer is not None else "tokenizer_source"
        raise MergeLabError(f"{recipe.where(key)}: '{cls.name}' takes its vocabulary from its base; it takes no '{key}:'.")
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
    vocab = sliced_vocabulary(recipe, base, sources)  # tokenizer keys: rows re-indexed per slice
    tasks = []
    for row in layout(recipe, sources, aligned_vocab=vocab is not None):
        k, ctx, first = row.slice, ctxs[row.slice], sources[row.slice][0]
        info = first.info(row.inputs[0])
        if not info.dtype.is_floating_point:
            tasks.append(TensorTask(row.output, info.shape, info.dtype, CopyOp((first, row.inputs[0]))))
            continue
        params, model_params = resolve_params(ctx, row.output, entries[k], row.t, row.inputs)
        b, shape = base_at[k], info.shape
        inputs: list = list(zip(sources[k], row.inputs))
        if vocab is not None and is_vocab_tensor(row.output):
            rows = vocabulary_rows(recipe, slice_vocabulary(vocab, sources[k]), row.output)
            inputs = [(rows.view(i), n) for i, n in enumerate(row.inputs)]
            shape = (vocab.rows, *info.shape[1:])
        op = merge_op(
            strategy, params, model_params,
            TensorContext(row.output, classify(row.output), recipe.seed, tuple(ctx.model_refs[i] for i in entries[k])),
            tuple(inputs[i] for i in entries[k]), inputs[b] if b is not None else None, recipe,
        )
        tasks.append(TensorTask(row.output, shape, out_dtype(recipe, info.dtype), op))
    config = with_dtype(recipe, sliced_config(recipe, sources, ref.config))
    layers = sum(s.length for s in recipe.slices)
    notes = [f"{len(recipe.slices)} slice(s) give {layers} output layer(s)", *arithmetic_note(recipe, tasks),
             *adapter_notes(list(opened.values()))]
    if vocab is not None:
        config["vocab_size"] = vocab.rows
        notes.append(f"output vocabulary: {len(vocab.vocab)} tokens, {vocab.rows} rows; embedding rows aligned by "
                     "token over each slice's sources")
    side = side_files(recipe, ref)
    return Plan(recipe, cls.name, tasks, config, side, input_checkpoints(list(opened.values())), notes,
                tokenizer=output_tokenizer(recipe, vocab, side, list(opened.values())))
