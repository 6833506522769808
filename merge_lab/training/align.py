"""LoRA supervised fine-tuning: how the demo makes its aligned experts, and how users align their own.

An align recipe names a base, the training rows (shipped sources by split, or the user's JSONL),
the LoRA shape and the schedule. Each row becomes a chat (the tokenizer's chat template) whose loss
counts only the response tokens. The result folder holds the LoRA adapter (`adapter/`), the
adapter merged into a full safetensors checkpoint (`merged/`, an input for weight merges and
H3 fusion), and `train_items.json`, the exact ids trained on, so evaluation can prove it never
scores a training item.

    base_model: smollm2
    label: harmless
    data:
      - {source: advbench, split: train, limit: 60, response_template: "{refusal}"}
      - {source: benign_requests, split: train, limit: 60}
      - {jsonl: my_rows.jsonl}
      - {suite: harmless_refusal, limit: 40, response_template: "{refusal}"}   # a suite's train split
    train: {steps: 60, batch_size: 8, lr: 8.0e-4, max_tokens: 160, seed: 0}

The `data:` blocks are merge_lab.training.blocks's (fusion recipes use the same ones). `align`
reads as three steps: `setup` (rows, tokens, model, optimizer), `train_loop`, `save`.

Under `accelerate launch` with N processes, `batch_size` stays the global batch: every process
draws the same seeded batches and trains on its own contiguous batch_size / N rows of each, and
its loss is weighted (merge_lab.training.shards) so that the gradient DDP averages is the
one-process gradient. Only the main process saves; the others wait for it and return.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field

from merge_lab.core.config import Where, load_yaml, parse_yaml
from merge_lab.core.distributed import launched, per_process_batch, process_device, record_rows
from merge_lab.core.progress import progress_bar
from merge_lab.core.writer import atomic_folder
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.training import chat
from merge_lab.training.blocks import DataSpec, training_rows
from merge_lab.training.expert_card import expert_card, loss_ends, stamp_merged
from merge_lab.training.shards import ReplyLoss, reply_token_losses, share_of_mean, trained_model, unsharded_note


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(["gate_proj", "up_proj", "down_proj"],
                                      description="module names to adapt (H3 fusion uses the FFN projections)")
    layers: int | list[int] | None = Field(
        None, description="adapt only these layer indices, or an int N for the last N layers (None: all). "
                          "Fewer layers, shorter backward pass: the CPU profiles use it")


class TrainSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(60, ge=1, description="optimizer steps (wins over epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the rows, when steps is null")
    batch_size: int = Field(8, ge=1)
    lr: float = Field(8e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    max_tokens: int = Field(160, ge=8, description="longest training sequence, prompt + reply")
    seed: int = 0
    device: str = Field("auto", description="auto (a GPU when present), cpu, cuda, cuda:1")


class AlignRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(description="local folder, 'smollm2' (shipped), a .gguf file, or a hub id (online)")
    label: str | None = Field(None, description="the objective this expert serves (helpful, harmless, honest)")
    data: list[DataSpec] = Field(min_length=1)
    system_prompt: str | None = Field(None, description="system message for every row (default: the template's)")
    lora: LoraSpec = Field(default_factory=LoraSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    save_merged: bool = Field(True, description="also save the adapter merged into a full checkpoint")
    name: str | None = None

    _where: Where = Where("<align recipe>")

    def where(self, *path: Any) -> str:
        """'align.yaml, line 4 (data.1)' for error messages."""
        return self._where(*path)

    def rows(self) -> list[Example]:
        """The rows this recipe trains on, templated, in a stable order (before the seeded shuffle)."""
        return training_rows(self.data, lambda *path: self.where("data", *path))


@dataclass
class AlignResult:
    path: Path
    adapter: Path
    merged: Path | None
    steps: int
    rows: int
    seconds: float
    first_loss: float
    last_loss: float
    processes: int = 1  # how many processes trained (accelerate launch)
    per_process_batch: int = 0  # rows each took of every global batch
    main: bool = True  # whether this is the process that wrote the output (the one that reports)


# ------------------------------------------------------------------ recipe and rows


def parse_align_recipe(text: str, source: str = "<align recipe>") -> AlignRecipe:
    recipe, where = parse_yaml(text, source, AlignRecipe, "align recipe")
    recipe._where = where
    return recipe


def load_align_recipe(path: str | Path) -> AlignRecipe:
    recipe, where = load_yaml(path, AlignRecipe, "align recipe")
    recipe._where = where
    return recipe


# ------------------------------------------------------------------ tokenising


def encode(tokenizer, row: Example, max_tokens: int, system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE on every prompt token, so only the reply is learned)."""
    return chat.training_row(tokenizer, row.prompt, row.response, max_tokens, system)


def batch_tensors(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, labels (IGNORE on padding) and attention mask of some encoded rows."""
    ids, mask = chat.right_padded([x for x, _ in encoded], pad_id)
    labels, _ = chat.right_padded([y for _, y in encoded], pad_id, fill=chat.IGNORE)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_grouped(indices: list[int], lengths: list[int], batch_size: int, rng: random.Random) -> list[int]:
    """One epoch in shuffled order, but with rows of similar length side by side inside windows of
    a few batches, so a batch pads to little more than its own longest row (CPU time is tokens)."""
    order = indices[:]
    rng.shuffle(order)
    window = batch_size * 8
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w: w + window], key=lambda i: lengths[i])
        batches += [chunk[b: b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return [i for b in batches for i in b]


def reply_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token loss over reply tokens (the output layer applied only at those positions);
    the same value as the model's own loss with -100 labels."""
    total, count = reply_token_losses(model, batch)
    return total / count


# ------------------------------------------------------------------ training: setup, loop, save


@dataclass
class AlignRun:
    """What `setup` builds once; the loop and the save only read it."""

    recipe: AlignRecipe
    base: Path
    device: torch.device
    tokenizer: Any
    pad_id: int
    rows: list[Example]
    encoded: list[tuple[list[int], list[int]]]
    keep: list[int]  # rows with a reply token left after truncation
    model: torch.nn.Module  # the base with LoRA, on `device`, in train mode
    params: list[torch.nn.Parameter]  # the LoRA weights
    optimizer: torch.optim.Optimizer
    steps: int
    accelerator: Any = None  # accelerate's, shared by the processes `accelerate launch` started
    objective: torch.nn.Module | None = None  # ReplyLoss(model), as prepared (DDP / FSDP on several processes)
    notes: list[str] = field(default_factory=list)  # said once, by the main process (a fixed device under launch)

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def per_process_batch(self) -> int:
        return per_process_batch(self.recipe.train.batch_size, self.processes)

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process


@dataclass
class Trained:
    """What the loop did: the loss of each step, the rows it drew, how long it took."""

    losses: list[float]
    seen: set[int]
    seconds: float


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine from 1 down to 0.1 of train.lr."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    done = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done))


def lora_model(recipe: AlignRecipe, base: Path, device: torch.device) -> torch.nn.Module:
    """The base (float32) with the recipe's LoRA on `device`; the LoRA init draws from torch's RNG."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    absent = [m for m in recipe.lora.target_modules if m not in present]
    if absent:
        raise MergeLabError(f"lora.target_modules: {absent} are not modules of {base}; it has e.g. {sorted(present)[:12]}.")
    layers = recipe.lora.layers
    if isinstance(layers, int):
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - layers), n))
    lora_cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                          target_modules=list(recipe.lora.target_modules), task_type="CAUSAL_LM",
                          layers_to_transform=layers, layers_pattern="layers" if layers is not None else None)
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5: noise for users
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, lora_cfg).to(device)


def setup(recipe: AlignRecipe) -> AlignRun:
    """Rows, tokens, the LoRA model and its optimizer: everything checked before a step is taken."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from merge_lab.core.bases import resolve_base

    cfg = recipe.train
    rows = recipe.rows()
    base = resolve_base(recipe.base_model)
    name, device_note = process_device(cfg.device, recipe.where("train", "device"))  # each launched process its own
    device = torch.device(name)
    world = launched(device.type == "cpu").num_processes
    per_process_batch(cfg.batch_size, world, recipe.where("train", "batch_size"))  # refused before the model loads
    accelerator = Accelerator(cpu=device.type == "cpu")

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    pad_id = chat.pad_id(tokenizer)
    encoded = [encode(tokenizer, r, cfg.max_tokens, recipe.system_prompt) for r in rows]
    keep = [i for i, (_, labels) in enumerate(encoded) if any(t != chat.IGNORE for t in labels)]
    if not keep:
        raise MergeLabError("no training row has a reply token left after truncation; raise train.max_tokens.")

    torch.manual_seed(cfg.seed)
    model = lora_model(recipe, base, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    objective = ReplyLoss(model)
    if world > 1:  # one process keeps the device the recipe names (accelerate would pick cuda:0)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        device = accelerator.device
    per_epoch = math.ceil(len(keep) / cfg.batch_size)
    steps = cfg.steps if cfg.steps is not None else max(1, math.ceil((cfg.epochs or 1) * per_epoch))
    return AlignRun(recipe, base, device, tokenizer, pad_id, rows, encoded, keep, model, params, optimizer, steps,
                    accelerator, objective, [device_note] if device_note else [])


def train_loop(run: AlignRun, *, progress: bool = True, console=None) -> Trained:
    """`run.steps` optimizer steps on length-grouped batches drawn epoch after epoch (seeded).
    Every process draws the same global batches and trains on its own slice of each; the losses
    are the global batch's, the same on every process."""
    cfg, optimizer, accelerator = run.recipe.train, run.optimizer, run.accelerator
    rank, world, per = accelerator.process_index, run.processes, run.per_process_batch
    objective = run.objective if run.objective is not None else ReplyLoss(run.model)
    rng = random.Random(cfg.seed)
    lengths = [len(ids) for ids, _ in run.encoded]
    order: list[int] = []
    seen: set[int] = set()
    losses: list[float] = []
    title = f"align {run.recipe.label or ''}"
    start = time.perf_counter()
    with progress_bar(console, progress and run.main) as bar:
        job = bar.add_task(title.strip(), total=run.steps)
        for step in range(run.steps):
            if len(order) < cfg.batch_size:
                order += length_grouped(run.keep, lengths, cfg.batch_size, rng)
            idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
            seen.update(idx)
            mine = idx[rank * per:(rank + 1) * per]
            record_rows(rank, world, step, mine)
            batch = {k: v.to(run.device) for k, v in batch_tensors([run.encoded[i] for i in mine], run.pad_id).items()}
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.warmup_steps, run.steps)
            loss_sum, tokens = objective(**batch)
            loss = share_of_mean(loss_sum, accelerator.reduce(tokens, "sum"), world)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(objective.parameters(), 1.0)  # FSDP clips through the wrapper
            optimizer.step()
            losses.append(float(accelerator.reduce(loss.detach(), "sum")) / world)
            bar.update(job, advance=1, description=f"{title} loss {losses[-1]:.3f}")
    trained = Trained(losses, seen, time.perf_counter() - start)
    if not all(math.isfinite(x) for x in losses):
        raise MergeLabError(f"training diverged (loss {losses[-1]}); lower train.lr (now {cfg.lr}).")
    return trained


def save(run: AlignRun, trained: Trained, out: Path) -> AlignResult:
    """adapter/, merged/ (when asked), train_items.json, align_log.json, the card and the recipe, all
    or nothing at `out`. One process calls it: under several, the main one, with the whole model."""
    recipe, model, tokenizer = run.recipe, run.model, run.tokenizer
    with atomic_folder(out, inputs=[Path(run.base)]) as tmp:  # never at, in or around the base
        model.eval()
        model.peft_config["default"].base_model_name_or_path = str(Path(run.base).resolve())
        model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp / "adapter"))
        if recipe.save_merged:
            merged = model.merge_and_unload().to("cpu")
            merged.save_pretrained(str(tmp / "merged"), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp / "merged"))
            stamp_merged(tmp / "merged", tmp / "adapter", recipe.label)
        rows = [run.rows[i] for i in sorted(trained.seen)]
        by_source: dict[str, list[int]] = {}
        for r in rows:
            by_source.setdefault(r.source, []).append(r.index)
        (tmp / "train_items.json").write_text(json.dumps({
            "label": recipe.label, "base_model": str(run.base), "count": len(rows),
            "ids": [r.id for r in rows], "by_source": by_source,
        }, indent=1) + "\n")
        (tmp / "align_log.json").write_text(json.dumps({
            "steps": run.steps, "rows": len(run.keep), "seconds": round(trained.seconds, 2), "device": str(run.device),
            "processes": run.processes, "per_process_batch": run.per_process_batch,
            "losses": [round(x, 5) for x in trained.losses],
        }, indent=1) + "\n")
        (tmp / "align_recipe.yaml").write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        (tmp / "README.md").write_text(expert_card(recipe, run.base, len(run.keep), run.steps, run.processes,
                                                   trained.losses))
    return result(run, trained, out)


def result(run: AlignRun, trained: Trained, out: Path) -> AlignResult:
    """What `align` returns, on every process (the paths are those the main process writes)."""
    first, last = loss_ends(trained.losses)
    return AlignResult(out, out / "adapter", out / "merged" if run.recipe.save_merged else None, run.steps,
                       len(run.keep), trained.seconds, first, last, run.processes, run.per_process_batch, run.main)


def align(
    recipe: AlignRecipe | str | Path,
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    console=None,
) -> AlignResult:
    """Train a LoRA expert from `recipe` into the folder `out` (built beside it, renamed at the end).
    Under `accelerate launch` every process calls it; only the main one writes `out`, and every
    process returns once it is complete (AlignResult.main says which one wrote)."""
    from rich.console import Console

    if not isinstance(recipe, AlignRecipe):
        recipe = load_align_recipe(recipe)
    out = Path(out)
    if out.exists() and not force:
        raise MergeLabError(f"{out}: already exists. Choose another output folder or pass --force to replace it.")
    run = setup(recipe)
    console = console or Console(stderr=True)
    trained = train_loop(run, progress=progress, console=console)
    for note in [*run.notes, unsharded_note(run.accelerator)]:
        if note and run.main:
            console.print(f"note: {note}", highlight=False)
    whole = trained_model(run.accelerator, run.objective, lambda: lora_model(recipe, run.base, torch.device("cpu")))
    done = save(replace(run, model=whole), trained, out) if run.main else result(run, trained, out)
    run.accelerator.wait_for_everyone()  # the output is complete before any process returns
    return done
