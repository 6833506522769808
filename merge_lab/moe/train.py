"""Fusion training on the assembled MoE: routers (and expert LoRA, or full experts) on labelled data.

Built on the checkpoint that assembly wrote, loaded by transformers as any user would load it;
router logits are captured with hooks; device placement goes through `accelerate`, so the same
code runs on CPU, one GPU, or several with `accelerate launch`. Batches are a pure function of
(seed, step), and checkpoints (merge_lab.moe.state: safetensors and JSON, data only) hold the
trainable weights, the optimizer state and the RNG states, so an interrupted run resumed with
`--resume` ends with the same weights as an uninterrupted one.

Under `accelerate launch` with N processes, `batch_size` stays the global batch: each process
takes its own batch_size / N rows of it (`batch_indices`, a pure function of seed, step, rank and
N), and its loss terms are weighted (`shard_losses`) so that the gradient DDP averages equals the
one-process gradient on the whole batch. Only the main process measures routing accuracy and
writes checkpoints. Under FSDP the weights read whole are gathered: the accuracy probe runs on
every process through the FSDP wrapper, the drift of the expert LoRA gathers each LoRA matrix
inside autograd under FSDP2 (`whole`: so gamma > 0 trains, each process's chunk getting the
gradient DDP would give it; FSDP1 reads it one unit at a time, `units_whole`, and refuses gamma > 0),
and the export loads the gathered state dict (`whole_state`) into a fresh copy; checkpoints
gather the trainable shards and their optimizer moments on every process (the main one writes)
and a resume gives each process its shard back, under FSDP2 (merge_lab.moe.state); with
router+experts each process squares the rows of its own expert shards for the drift and only the
per-expert sums are gathered (`losses.expert_drift`). Under FSDP1 router+experts, gamma > 0 and
resume state are refused, naming DDP. DeepSpeed is refused
(not installed where this is tested). An FSDP config on CPU processes runs as DDP, with a note.

`train` reads as three steps: `setup` (model, frozen parts, optimizer, tokenised rows),
`train_loop` (one `train_step` per optimizer step, with checkpoints), then the LoRA merged back.
The recipe's train block and rows: merge_lab.moe.train_config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import MofNCompleteColumn, TextColumn

from merge_lab.core.distributed import batch_indices, launched, per_process_batch, record_rows
from merge_lab.core.progress import progress_bar
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.moe import losses
from merge_lab.moe.data import Encoded, collate, encode, load_rows, shared_prefix
from merge_lab.moe.layout import expert_labels as checkpoint_labels
from merge_lab.moe.routing import capture_router_logits, routers, routing_accuracy
from merge_lab.moe.sharding import refuse_unsupported_sharding
from merge_lab.moe.state import LEGACY, fingerprint, has_state, load_state, save_state
from merge_lab.moe.train_config import TrainConfig
from merge_lab.training import chat
from merge_lab.training.shards import (
    dtensor_shards,
    gathered_copy,
    shard_like,
    sharded,
    units_whole,
    unsharded_note,
    whole,
)


@dataclass
class TrainResult:
    model: torch.nn.Module  # plain transformers model, LoRA merged
    steps_done: int
    finished: bool
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")
    notes: list[str] = field(default_factory=list)
    processes: int = 1  # how many processes trained (accelerate launch)
    per_process_batch: int = 0  # rows each took of every global batch
    main: bool = True  # whether this is the process that writes (checkpoints, export, card)


def freeze_all_but_trainable(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.nn.Module, list, list]:
    """Freeze what does not train; returns (model, expert tensors per layer, their initial values)."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.trainable == "router+lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=[], lora_dropout=0.0,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, lcfg)
    for r in routers(model):
        r.weight.requires_grad_(True)
    expert_params = trainable_experts(model) if cfg.trainable == "router+experts" else []
    for p in expert_params:
        p.requires_grad_(True)
    if cfg.train_attention:
        for name, p in model.named_parameters():
            if ".self_attn." in name and "lora_" not in name:
                p.requires_grad_(True)
    initial = [p.detach().clone() for p in expert_params]
    return model, expert_params, initial


def trainable_experts(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every layer's stacked expert tensors (experts along dim 0), as `model` holds them now: after
    FSDP2 has prepared it, its shards."""
    return [p for layer in model.model.layers for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)]


def fresh_trainable(moe_dir: Path, cfg: TrainConfig) -> torch.nn.Module:
    """The assembled MoE untrained, with the trainable parts of `cfg` (the LoRA wrapper included):
    what a gathered state dict loads into."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    return freeze_all_but_trainable(model, cfg)[0]


def drift_per_expert(model, cfg: TrainConfig, expert_params, initial, n_experts: int) -> torch.Tensor:
    """[experts]: ||theta_i - theta_i_initial||^2 over each expert's trainable weights."""
    if cfg.trainable == "router+experts":
        return losses.expert_drift(expert_params, initial)
    if cfg.trainable == "router+lora":
        return lora_drift(list(model.modules()), n_experts)
    return torch.zeros(n_experts)


def lora_drift(modules: list[torch.nn.Module], n_experts: int) -> torch.Tensor:
    """[experts]: ||LoRA update||^2 of each expert over the expert LoRA among `modules`. The update
    of expert e is scaling * B_e A_e (peft's ParamWrapper.get_delta_weight; its norm does not depend
    on which of in / out comes first), from A and B whole: FSDP2 shards are gathered in autograd."""
    from peft.tuners.lora.layer import ParamWrapper

    total = torch.zeros(n_experts)
    for m in modules:
        if isinstance(m, ParamWrapper):
            a, b = whole(m.lora_A["default"].weight), whole(m.lora_B["default"].weight)
            a = a.reshape(m.num_experts, -1, a.shape[-1])  # experts x rank x in
            b = b.reshape(b.shape[0], -1, m.num_experts)  # out x rank x experts
            delta = torch.einsum("o r e, e r i -> e o i", b, a) * m.scaling["default"]
            total = total.to(delta.device) + (delta.float() ** 2).sum(dim=(1, 2))
    return total


# ------------------------------------------------------------------ the loss of one process's share

def shard_counts(labels: torch.Tensor, mask: torch.Tensor, router_logits: list[torch.Tensor], top_k: int,
                 balance: bool) -> torch.Tensor:
    """What the loss normalises by, counted on this process's rows (no gradient), to be summed over
    processes: [response tokens, real tokens, then with `balance` each layer's top-k slots per expert]."""
    head = [(labels[:, 1:] != -100).sum(), mask.sum()]
    out = torch.stack(head).float()
    if not balance:
        return out
    real = mask.reshape(-1).bool()
    chosen = []
    with torch.no_grad():
        for x in router_logits:
            x = x[real]
            chosen.append(torch.nn.functional.one_hot(x.topk(top_k, dim=-1).indices, x.shape[-1]).sum((0, 1)).float())
    return torch.cat([out, torch.cat(chosen).to(out.device)])


def shard_losses(logits: torch.Tensor, b: dict[str, torch.Tensor], router_logits: list[torch.Tensor],
                 gating_mask: torch.Tensor, top_k: int, balance: bool, totals: torch.Tensor,
                 global_rows: int, world: int) -> dict[str, torch.Tensor]:
    """lm, gate (and balance) of one process's rows, weighted so that their mean over the `world`
    processes, and so the gradient DDP averages, is the one-process value on the whole batch.

    `totals` is shard_counts summed over processes. The LM loss is a mean over the batch's response
    tokens and processes hold different counts: each takes its token-loss sum over the global
    count, times world. The gating loss is a mean over examples: its row mean, times world * rows /
    global_rows (1 with an even split). The load-balancing loss multiplies two global token means
    per layer: the top-k shares (no gradient) come from `totals`, the routing probabilities are
    this process's sum over the global token count, times world."""
    tokens, real = totals[0].clamp_min(1.0), totals[1].clamp_min(1.0)
    lm_sum = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                               ignore_index=-100, reduction="sum")
    out = {"lm": lm_sum / tokens * world}
    probs = losses.mean_routing_probs(router_logits, gating_mask)
    rows = b["expert"].shape[0]
    out["gate"] = losses.gating_loss(probs, b["expert"]) * (world * rows / global_rows)
    if balance:
        n_layers, n_exp = len(router_logits), router_logits[0].shape[-1]
        share = totals[2:].view(n_layers, n_exp) / (real * top_k)
        mask = b["attention_mask"].reshape(-1).bool()
        prob_sums = torch.stack([torch.softmax(x[mask].float(), dim=-1).sum(0) for x in router_logits])
        out["balance"] = n_exp * (share * prob_sums / real).sum() / n_layers * world
    return out


# ------------------------------------------------------------------ training: setup, loop, result


@dataclass
class FusionRun:
    """What `setup` builds once; the loop reads it (and steps `model` and `optimizer`)."""

    cfg: TrainConfig
    accelerator: Any
    model: torch.nn.Module  # as prepared by accelerate (a DDP wrapper on several processes)
    inner: torch.nn.Module  # the model itself
    optimizer: torch.optim.Optimizer
    device: torch.device
    labels: list[str]
    pad_id: int
    encoded: list[Encoded]
    expert_params: list[torch.Tensor]  # router+experts: the expert tensors, for the drift term
    initial: list[torch.Tensor]  # and their values before training
    gammas: torch.Tensor
    top_k: int
    shared: int  # tokens every example starts with: no routing signal there, so accuracy skips them
    owner: str  # the fingerprint a resume state must carry

    @property
    def sharded(self) -> bool:
        """Whether the weights are split over the processes (FSDP): whole-weight reads gather them."""
        return sharded(self.accelerator)

    @property
    def gating_skip(self) -> int:
        return self.shared if self.cfg.gating_tokens == "content" else 0

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def per_process_batch(self) -> int:
        return per_process_batch(self.cfg.batch_size, self.processes)

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes (a copy of it on one)."""
        return self.accelerator.reduce(t, "sum")

    def probe(self) -> list[Encoded]:
        """The rows routing accuracy is measured on before and after (every k-th, eval_rows of them)."""
        if not self.cfg.eval_rows:
            return []
        return self.encoded[:: max(1, -(-len(self.encoded) // self.cfg.eval_rows))]


def setup(moe_dir: Path, cfg: TrainConfig, rows: list[Example] | None = None, *, resume: bool = False,
          checkpoints: bool = False) -> FusionRun:
    """Load the assembled MoE, freeze all but what trains, tokenise the rows (cfg.data's unless
    given), build the optimizer; seeded, so the same call gives the same run."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # top-k routing leaves some experts without gradient in a step: DDP must allow unused parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    launched(cfg.cpu)
    accelerator = Accelerator(cpu=cfg.cpu, kwargs_handlers=[ddp])
    refuse_unsupported_sharding(accelerator, cfg, resume=resume, checkpoints=checkpoints)  # before the model loads
    per_process_batch(cfg.batch_size, accelerator.num_processes)  # refused before the model loads
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(moe_dir))
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    labels = checkpoint_labels(model.config.to_dict())
    pad_id = chat.pad_id(tokenizer)
    rows = rows if rows is not None else load_rows(cfg.data, labels)
    encoded = [encode(tokenizer, ex, labels, cfg.max_length) for ex in rows]
    model, expert_params, initial = freeze_all_but_trainable(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    inner = accelerator.unwrap_model(model)
    if expert_params:  # FSDP2 replaced them by shards: the drift reads those, against the same shards of the start
        expert_params = trainable_experts(inner)
        initial = [shard_like(t0, p) for t0, p in zip(initial, expert_params)]  # on each shard's device
    return FusionRun(
        cfg, accelerator, model, inner, optimizer, device, labels, pad_id, encoded, expert_params,
        [t.to(device) for t in initial], torch.tensor(cfg.gammas(labels), device=device), routers(inner)[0].top_k,
        shared_prefix(encoded), fingerprint(cfg.model_dump_json()),
    )


def train_step(run: FusionRun, step: int) -> dict[str, float]:
    """One optimizer step on this process's share of the batch of `step`; returns the loss terms
    and routing accuracy of the whole batch (the same on every process)."""
    cfg, accelerator = run.cfg, run.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    idx = batch_indices(step, len(run.encoded), cfg.batch_size, cfg.seed, rank, world)
    record_rows(rank, world, step, idx)
    reported = None
    if run.sharded and cfg.trainable == "router+lora" and not dtensor_shards(accelerator):  # gamma is 0 there
        with torch.no_grad():  # (refused otherwise): only reported, one unit at a time with its weights whole
            reported = sum(lora_drift(modules, len(run.labels)).to(run.device)
                           for modules in units_whole(accelerator, run.model))
    b = {k: v.to(run.device) for k, v in collate([run.encoded[i] for i in idx], run.pad_id).items()}
    with capture_router_logits(run.inner) as captured:
        out = run.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    balanced = cfg.load_balance > 0
    totals = run.reduce(shard_counts(b["labels"], b["attention_mask"], captured, run.top_k, balanced))
    gating_mask = losses.skip_prefix(b["attention_mask"], run.gating_skip)
    terms = shard_losses(out.logits, b, captured, gating_mask, run.top_k, balanced, totals, cfg.batch_size, world)
    with torch.set_grad_enabled(bool(run.gammas.any())):  # FSDP2 gathers the LoRA in autograd only to train it
        drift = (reported if reported is not None else
                 drift_per_expert(run.inner, cfg, run.expert_params, run.initial, len(run.labels))).to(run.device)
    balance = terms.get("balance", torch.zeros((), device=run.device))
    loss = terms["lm"] + cfg.gating_weight * terms["gate"] + (run.gammas * drift).sum() + cfg.load_balance * balance
    accelerator.backward(loss)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    accuracy = losses.routing_accuracy(
        losses.mean_routing_probs(captured, losses.skip_prefix(b["attention_mask"], run.shared)), b["expert"])
    report = run.reduce(torch.stack([loss, terms["lm"], terms["gate"], balance, accuracy]).detach()) / world
    values = dict(zip(("loss", "lm", "gate", "balance", "route_acc"), report.tolist()))
    return {"loss": values["loss"], "lm": values["lm"], "gate": values["gate"], "drift": drift.sum().item(),
            "balance": values["balance"], "route_acc": values["route_acc"]}


def train_loop(run: FusionRun, state_dir: Path, start: int, history: list[dict[str, float]], *,
               stop_after: int | None = None, progress: bool = True, console=None) -> int:
    """Steps from `start` to cfg.steps (or `stop_after`), appending to `history`; saves the resume
    state every checkpoint_every steps, at `stop_after` and on Ctrl-C. Returns the steps done."""
    cfg, accelerator = run.cfg, run.accelerator

    def checkpoint() -> None:
        if run.sharded or accelerator.is_main_process:  # sharded: every process gathers, the main one writes
            save_state(state_dir, run.inner, run.optimizer, step, history, run.owner, processes=run.processes,
                       write=accelerator.is_main_process)

    step = start
    with progress_bar(console, progress and accelerator.is_main_process, MofNCompleteColumn(),
                      TextColumn("{task.fields[terms]}")) as bar:
        job = bar.add_task("fuse", total=cfg.steps, completed=start, terms="")
        try:
            while step < cfg.steps:
                terms = train_step(run, step)
                step += 1
                history.append(terms)
                bar.update(job, advance=1, terms=" ".join(f"{k} {v:.3g}" for k, v in terms.items()))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint()
                if stop_after is not None and step >= stop_after and step < cfg.steps:
                    checkpoint()
                    return step
        except KeyboardInterrupt:
            if run.sharded:  # saving gathers the shards from every process, which an interrupt may have left mid-step
                raise MergeLabError(f"interrupted at step {step}: under {accelerator.distributed_type.value} fuse saves "
                                    "no state on an interrupt, so nothing was saved now or written; with "
                                    "train.checkpoint_every set, --resume continues from the last checkpoint (FSDP2), "
                                    "or launch it with DDP (--multi_gpu) to save on Ctrl-C too.") from None
            checkpoint()
            raise
    return step


def train(
    moe_dir: str | Path,
    cfg: TrainConfig,
    state_dir: str | Path,
    *,
    rows: list[Example] | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    console=None,
) -> TrainResult:
    """Train the assembled MoE in `moe_dir` on `rows` (default: cfg.data's). `stop_after` ends early
    after that step with a saved checkpoint, as Ctrl-C does (a resumed run continues from it)."""
    moe_dir, state_dir = Path(moe_dir), Path(state_dir)
    run = setup(moe_dir, cfg, rows, resume=resume, checkpoints=bool(cfg.checkpoint_every) or stop_after is not None)
    main = run.accelerator.is_main_process
    start, history = 0, []
    notes = [note] if (note := unsharded_note(run.accelerator)) else []
    if resume and has_state(state_dir):
        resumed = load_state(state_dir, run.inner, run.optimizer, run.owner, processes=run.processes)
        start, history = resumed.step, resumed.history
        if (state_dir / LEGACY).exists():
            notes.append(f"ignored {state_dir / LEGACY}: a torch.save file, which merge_lab never loads")
    # only the main process reports; under FSDP every process runs the probe's forwards with it
    probe = run.probe() if main or run.sharded else []
    forward = run.model if run.sharded else run.inner  # a DDP forward on one process would wait for the others
    acc_before = (routing_accuracy(run.inner, probe, run.pad_id, run.device, skip=run.shared, forward=forward)
                  if start == 0 and probe else float("nan"))
    step = train_loop(run, state_dir, start, history, stop_after=stop_after, progress=progress, console=console)
    shape = {"processes": run.processes, "per_process_batch": run.per_process_batch, "main": main}
    if step < cfg.steps:
        return TrainResult(run.inner, step, False, history, notes=notes, **shape)
    acc_after = (routing_accuracy(run.inner, probe, run.pad_id, run.device, skip=run.shared, forward=forward)
                 if probe else float("nan"))
    trained = (gathered_copy(run.accelerator, run.model, lambda: fresh_trainable(moe_dir, cfg)) if run.sharded
               else run.inner)
    if trained is None:  # under FSDP, a process that does not write: its shards went to the main one
        return TrainResult(run.inner, step, True, history, acc_before, acc_after, notes, **shape)
    final = trained.merge_and_unload() if cfg.trainable == "router+lora" else trained
    return TrainResult(final, step, True, history, acc_before, acc_after, notes, **shape)
