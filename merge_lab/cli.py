"""The `merge-lab` command line: parses, calls one function, prints."""

from __future__ import annotations

import os

# Before torch loads: OpenMP threads that spin while they wait slow torch down several-fold when the
# cores are shared with other work (a 135M-parameter forward on 2 cores at load 6: 3.5 s spinning,
# 0.6 s passive). A value the user sets wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from merge_lab.core.output_folder import format_size
from merge_lab.errors import MergeLabError

app = typer.Typer(
    help=(
        "Merge and fuse language models.\n\n"
        "A merge is described by a YAML recipe (mergekit recipes work as they are):\n\n"
        "  merge_method: ties\n\n"
        "  base_model: ./base\n\n"
        "  models: [{model: ./math, parameters: {weight: 1, density: 0.5}}, {model: ./code}]\n\n"
        "Start with `merge-lab strategies`, then `merge-lab validate recipe.yaml`, then "
        "`merge-lab merge recipe.yaml -o out/`."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)
out_console = Console()
err_console = Console(stderr=True)


def friendly(fn):
    """Turn MergeLabError and Ctrl-C into a message and a non-zero exit, without a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MergeLabError as e:
            err_console.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]: nothing was written at the output path.")
            raise typer.Exit(130) from None

    return wrapper


def _import_frozen() -> None:
    """Import torch and the engine with the garbage collector off, then freeze what they made.

    Importing torch creates a few hundred thousand objects that the collector would otherwise
    scan over and over while it loads and once more at exit: about 0.7 s of the 2 s it costs."""
    import gc

    gc.disable()
    try:
        import merge_lab.merge.engine  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file (merge_lab or mergekit format)")]


@app.command()
@friendly
def merge(
    recipe: RecipeArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="output model folder (must not exist unless --force)")],
    force: Annotated[bool, typer.Option(help="replace an existing output folder (only once the merge succeeds)")] = False,
    shard_size: Annotated[str | None, typer.Option(help="largest output shard, e.g. 2GB (default: recipe's, 2GB)")] = None,
    device: Annotated[str, typer.Option(help="where the arithmetic runs: cpu, cuda, cuda:1")] = "cpu",
    hash_inputs: Annotated[bool, typer.Option(help="sha256 the inputs for the model card")] = True,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    allow_non_finite: Annotated[bool, typer.Option(
        "--allow-non-finite", help="merge inputs holding NaN / Inf instead of refusing them (the card counts them)"
    )] = False,
) -> None:
    """Merge the models of RECIPE into a new checkpoint folder OUT.

    Tensors are streamed one at a time from memory-mapped shards, so memory stays bounded by
    the largest tensor times the number of models. The output is written beside OUT and
    renamed into place at the end: an interrupted merge leaves nothing behind. An input holding
    NaN or Inf is refused unless the recipe sets `allow_non_finite: true` or --allow-non-finite.
    """
    _import_frozen()
    from merge_lab.merge.engine import run_plan
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.moe.mergekit_config import is_mergekit_moe_file

    if is_mergekit_moe_file(recipe):  # mergekit-moe's YAML: built as `merge-lab moe` builds it
        return moe_cmd(recipe, out, force=force, progress=progress, device=device)
    plan = make_plan(load_recipe(recipe))
    result = run_plan(
        plan, out, force=force, shard_size=shard_size, device=device, progress=progress,
        hash_inputs=hash_inputs, console=err_console, allow_non_finite=True if allow_non_finite else None,
    )
    table = Table(title="merge complete", show_header=False)
    table.add_row("output", str(result.path))
    table.add_row("strategy", plan.strategy)
    table.add_row("tensors", str(result.tensors))
    table.add_row("written", format_size(result.bytes_written))
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.non_finite:
        total = sum(result.non_finite.values())
        table.add_row("[yellow]non-finite inputs[/yellow]",
                      f"[yellow]{total} NaN / Inf value(s) in {len(result.non_finite)} tensor(s)[/yellow]")
    out_console.print(table)
    if result.non_finite:
        err_console.print(
            f"[bold yellow]warning:[/bold yellow] the inputs held {total} NaN / Inf value(s) in "
            f"{len(result.non_finite)} tensor(s), merged as they were (allow_non_finite); the output may hold "
            f"some too. The list is in {result.path / 'README.md'}.", highlight=False, soft_wrap=True,
        )


@app.command()
@friendly
def validate(recipe: RecipeArg) -> None:
    """Check RECIPE from configs and safetensors headers alone, before any tensor is read.

    Checks: keys and values, files exist, lie inside their model folders and are complete,
    safetensors headers, indexes and configs, architectures, tensor names, shapes, dtypes,
    vocabulary sizes, the shard size, and each parameter resolved for every tensor; with
    tokenizer keys, that their models are the recipe's, that every tokenizer parses (no remote
    code) and that its ids fit its model's embedding rows; for a `model+adapter` reference, that
    the adapter fits the model (targets, shapes, ranks). A mergekit-moe config is checked as
    `merge-lab moe` plans it.
    """
    from merge_lab.core.writer import parse_size
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.moe.mergekit_config import is_mergekit_moe_file
    from merge_lab.moe.mergekit_run import moe_plan

    # a mergekit-moe config is checked as `merge-lab moe` plans it (experts, adapters, layout)
    plan = moe_plan(recipe)[0] if is_mergekit_moe_file(recipe) else make_plan(load_recipe(recipe))
    parse_size(plan.recipe.shard_size)
    out_console.print(
        f"[green]ok[/green]: {plan.strategy} over {len(plan.inputs)} checkpoint(s), "
        f"{len(plan.tasks)} output tensors, {format_size(plan.output_bytes)} to write."
    )
    for note in plan.notes:
        out_console.print(f"note: {note}")


@app.command("plan")
@friendly
def plan_cmd(
    recipe: RecipeArg,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="where the output would go (checked like merge's; default: free disk here)")] = None,
) -> None:
    """Predict the merge's peak memory, output size and shards, and check the free disk (by merge's rule)."""
    from merge_lab.core.output_folder import check_target
    from merge_lab.core.writer import disk_space, parse_size
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe

    plan = make_plan(load_recipe(recipe))
    if out is not None:
        check_target(out, [*(c.path for c in plan.inputs), plan.side_files_from])
    # without --out: the free space of the working directory (an output folder made in it)
    _, free, enough = disk_space(out if out is not None else Path.cwd() / "out", plan.output_bytes)
    shard = parse_size(plan.recipe.shard_size)
    table = Table(title=f"plan: {plan.strategy}", show_header=False)
    table.add_row("input checkpoints", f"{len(plan.inputs)} ({format_size(plan.input_bytes)})")
    table.add_row("output tensors", str(len(plan.tasks)))
    table.add_row("output size", format_size(plan.output_bytes))
    table.add_row("output shards", str(max(1, -(-plan.output_bytes // shard))) + f" of at most {format_size(shard)}")
    table.add_row("predicted peak working memory", format_size(plan.predicted_peak_bytes()))
    table.add_row("free disk at output", format_size(free) + (" [green]enough[/green]" if enough else " [red]NOT enough[/red]"))
    out_console.print(table)
    for note in plan.notes:  # e.g. each `model+adapter` reference: which adapter, at which scale
        out_console.print(f"note: {note}")
    if not enough:
        raise typer.Exit(1)


@app.command()
@friendly
def strategies() -> None:
    """List every registered strategy (built-in and plugins) with its parameters."""
    from merge_lab.merge import interface as registry

    for name, cls in registry.available().items():
        table = Table(title=f"[bold]{name}[/bold] — {cls.summary}", title_justify="left", expand=False)
        table.add_column("parameter")
        table.add_column("scope")
        table.add_column("type")
        table.add_column("default")
        table.add_column("meaning")
        for key, (scope, field) in cls.param_fields().items():
            typ = getattr(field.annotation, "__name__", str(field.annotation))
            default = "required" if field.is_required() else repr(field.default)
            table.add_row(key, "per model" if scope == "model" else "merge-wide", typ, default, field.description or "")
        needs = []
        if cls.needs_base:
            needs.append("needs base_model")
        if cls.structural:
            needs.append("structural")
        if needs:
            table.caption = ", ".join(needs)
        out_console.print(table)


@app.command()
@friendly
def align(
    recipe: Annotated[Path, typer.Argument(help="align recipe YAML (base_model, data, lora, train)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder: adapter/, merged/, train_items.json, README.md")],
    force: Annotated[bool, typer.Option(help="replace an existing output folder")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """LoRA-fine-tune a base on RECIPE's rows (shipped sources or your JSONL) into an expert at OUT.

    Loss counts only the reply tokens of each chat. OUT gets the adapter, the adapter merged into a
    full checkpoint (an input for `merge` and `fuse`), and the ids of every item trained on. Several
    GPUs or processes: `accelerate launch -m merge_lab align ...` (the recipe's batch_size is the
    global batch; each process takes its share; the main process writes OUT).
    """
    from merge_lab.moe.pipeline import processes_text
    from merge_lab.training.align import align as run_align

    result = run_align(recipe, out, force=force, progress=progress, console=err_console)
    if not result.main:  # under accelerate launch the main process reports
        return
    table = Table(title="align complete", show_header=False)
    table.add_row("output", str(result.path))
    table.add_row("adapter", str(result.adapter))
    table.add_row("merged checkpoint", str(result.merged or "not saved"))
    table.add_row("rows / steps", f"{result.rows} / {result.steps}")
    table.add_row("processes", processes_text(result.processes, result.per_process_batch * result.processes))
    table.add_row("loss", f"{result.first_loss:.3f} -> {result.last_loss:.3f}")
    table.add_row("time", f"{result.seconds:.1f} s")
    out_console.print(table)


@app.command()
@friendly
def compare(
    spec: Annotated[Path, typer.Argument(help="compare YAML: candidates, suites, settings (see `merge-lab suites`)")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="report folder (default: the file's `output:`)")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar per candidate and suite")] = True,
) -> None:
    """Evaluate every candidate of SPEC on the same suites and write report.md, report.html, results.json.

    Candidates: checkpoints, recipes (merged on the fly into the cache), token-level ensembles and
    best-of-N. Results are cached per (candidate, suite, settings): adding a candidate evaluates only it.
    Several GPUs or processes: `accelerate launch -m merge_lab compare ...` (each process takes its share
    of every suite's batches; the main process writes the cache and the report).
    """
    from merge_lab.evaluation.compare import run_compare

    result = run_compare(spec, out, progress=progress, console=err_console)
    if not result.main:  # under accelerate launch the main process reports
        return
    table = Table(title="comparison", show_header=True)
    table.add_column("suite")
    table.add_column("best")
    table.add_column("gap to runner-up")
    for suite, best in result.results["best"].items():
        if "runner_up" not in best:
            gap = "–"
        elif best["diff"] == 0 and best["ci"] == [0, 0]:
            gap = f"tie with {best['runner_up']}"
        else:
            gap = f"{best['diff']:+.3f} vs {best['runner_up']} (p={best['p']:.3g}{', within noise' if not best['significant'] else ''})"
        table.add_row(suite, best["candidate"], gap)
    out_console.print(table)
    fresh = len(result.evaluated)
    out_console.print(f"evaluated {fresh} (candidate, suite) pair(s), the rest from the cache.")
    if result.processes > 1:
        out_console.print(f"processes: {result.processes}, each scored and generated its share of every suite's batches.")
    out_console.print(f"report: {result.output / 'report.html'}")


@app.command("suites")
@friendly
def suites_cmd() -> None:
    """List the registered evaluation suites (built-in and plugins) with their metric and data."""
    from merge_lab.evaluation import suites as registry

    table = Table(title="evaluation suites (also: lm_eval:TASK, or {name, path, kind} for your JSONL)")
    for col in ("suite", "objective", "metric", "better", "description"):
        table.add_column(col)
    for name, cls in registry.available().items():
        table.add_row(name, cls.objective, cls.metric, "higher" if cls.higher_is_better else "lower", cls.description)
    out_console.print(table)


@app.command()
@friendly
def fuse(
    recipe: Annotated[Path, typer.Argument(help="h3_moe recipe: base_model, labelled models, parameters, train")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output MoE folder (must not exist unless --force)")],
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its last checkpoint")] = False,
    force: Annotated[bool, typer.Option(help="replace an existing output folder (only once fusion succeeds)")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars (loss terms and routing accuracy)")] = True,
) -> None:
    """Build the H3 mixture of experts of RECIPE and, with its `train:` block, fusion-train it.

    Assembly streams base + experts (full checkpoints or LoRA adapters) into a Mixtral / Qwen-MoE
    checkpoint; training tunes routers (and expert LoRA or full experts) with LM + gating + drift
    losses; the result is exported in the hub layout `AutoModelForCausalLM` loads. Ctrl-C saves a
    checkpoint: run again with --resume. Several GPUs or processes: `accelerate launch -m merge_lab
    fuse ...` (the recipe's batch_size is the global batch; each process takes its share).
    """
    from merge_lab.moe.pipeline import fuse as run_fuse
    from merge_lab.moe.pipeline import processes_text

    try:
        result = run_fuse(recipe, out, resume=resume, force=force, progress=progress, console=err_console)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/yellow]: training state saved; nothing written at the output. "
                          "Run the same command with --resume to continue.")
        raise typer.Exit(130) from None
    if not result.main:  # under accelerate launch the main process reports
        return
    table = Table(title="fuse complete", show_header=False)
    table.add_row("output", str(result.path))
    table.add_row("training steps", str(result.steps_done))
    if result.steps_done:
        table.add_row("processes", processes_text(result.processes, result.per_process_batch * result.processes))
        table.add_row("routing accuracy", f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f}")
        table.add_row("last step", ", ".join(f"{k} {v:.4g}" for k, v in result.last_terms.items()))
    out_console.print(table)
    for note in result.notes:
        out_console.print(f"note: {note}")


@app.command("moe")
@friendly
def moe_cmd(
    config: Annotated[Path, typer.Argument(help="mergekit-moe YAML: base_model, experts with prompts, gate_mode, ...")],
    out: Annotated[Path, typer.Option("--out", "-o", help="output MoE folder (must not exist unless --force)")],
    force: Annotated[bool, typer.Option(help="replace an existing output folder (only once the build succeeds)")] = False,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    device: Annotated[str, typer.Option(help="where the arithmetic runs: cpu, cuda, cuda:1")] = "cpu",
    allow_all_same: Annotated[bool, typer.Option(
        "--i-understand-this-is-not-useful-without-training",
        help="allow every expert to be the same model (mergekit-moe's flag of that name)")] = False,
) -> None:
    """Build the mixture of experts a mergekit-moe CONFIG describes, with mergekit-moe's router gates.

    The gates are computed as mergekit-moe computes them (gate_mode: hidden, cheap_embed, random, ...),
    the experts stream through the merge engine into Mixtral (llama / mistral bases), Qwen2-MoE
    (qwen2, with `shared_experts`) or Qwen3-MoE (qwen3); `noise_scale` adds mergekit-moe's noise
    (its `--random-seed 0` draws). A `train:` block in CONFIG (the keys of `fuse`'s) then trains the routers with the H3
    gating loss, starting from those gates.
    """
    _import_frozen()
    from merge_lab.moe.mergekit_run import run_moe

    result = run_moe(config, out, force=force, progress=progress, device=device, allow_all_same=allow_all_same,
                     console=err_console)
    table = Table(title="moe complete", show_header=False)
    table.add_row("output", str(result.path))
    table.add_row("architecture", result.architecture)
    table.add_row("experts", str(result.experts))
    table.add_row("gate_mode", result.gate_mode)
    if result.tensors:
        table.add_row("tensors", str(result.tensors))
    if result.steps_done:
        table.add_row("training steps", str(result.steps_done))
        table.add_row("routing accuracy", f"{result.accuracy_before:.3f} -> {result.accuracy_after:.3f}")
    out_console.print(table)
    for note in result.notes:
        out_console.print(f"note: {note}")


@app.command("inspect-routing")
@friendly
def inspect_routing(
    model: Annotated[Path, typer.Argument(help="a fused MoE folder (made by `fuse` or `merge` with h3_moe)")],
    data: Annotated[Path, typer.Argument(help="JSONL of {prompt, response, label} rows")],
    plot: Annotated[Path | None, typer.Option(help="save a heatmap per label (PNG) here")] = None,
    max_examples: Annotated[int, typer.Option(help="route at most this many rows")] = 200,
) -> None:
    """How often each expert is chosen (in a token's top-k), per layer and per data label."""
    from merge_lab.moe.routing import inspect, plot_routing

    result = inspect(model, data, max_examples=max_examples)
    labels, share = result["labels"], result["share"]
    for k, label in enumerate(labels):
        table = Table(title=f"data labelled '{label}' ({result['tokens'].get(k, 0)} tokens): share routed to each expert")
        table.add_column("layer")
        for expert in labels:
            table.add_column(expert, justify="right")
        for layer in range(share.shape[1]):
            table.add_row(str(layer), *(f"{v:.2f}" for v in share[k, layer].tolist()))
        out_console.print(table)
    out_console.print(f"routing accuracy (labelled expert most probable, {result['examples']} rows): {result['accuracy']:.3f}")
    if plot is not None:
        out_console.print(f"plot: {plot_routing(result, plot)}")


@app.command()
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="demo folder: experts, merges, fused model, report")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="small sets and few steps: minutes on 2 CPU cores")] = False,
    thorough: Annotated[bool, typer.Option(help="suites large enough to separate a 0.05 gap: hours on 2 cores")] = False,
    fresh: Annotated[bool, typer.Option(help="redo every step instead of reusing those already done")] = False,
    base: Annotated[str | None, typer.Option(help="base model: a local folder, a .gguf, or a hub id (default: shipped SmolLM2-135M-Instruct)")] = None,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """Run the demo end to end: three aligned experts, two merges, H3 fusion and its ablations, the comparison
    report (with the baselines given the same training as the fusion).

    Every step is a recipe in merge_lab/demo/recipes/ that you can copy and run alone; the recipes as run
    (with the profile's numbers) are saved in OUT/recipes/. Steps already done are reused.
    """
    from merge_lab.demo.pipeline import run_demo

    if quick and thorough:
        raise typer.BadParameter("choose one of --quick and --thorough")
    profile = "quick" if quick else "thorough" if thorough else "default"
    result = run_demo(out, profile=profile, fresh=fresh, base=base, progress=progress, console=err_console)
    out_console.print(f"manifest: {result.manifest}")
    if result.report is not None:
        out_console.print(f"report: {result.report / 'report.html'}")
        out_console.print(f"[bold]open {result.report / 'report.html'} in a browser[/bold]")


def main() -> None:
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
