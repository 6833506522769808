"""Fusion training on the assembled MoE: routers (and expert LoRA, or full experts) on labelled data.

Built on the checkpoint that assembly wrote, loaded by transformers as any user would load it;
router logits are captured with hooks; device placement goes through `accelerate`, so the same
code runs on CPU, one GPU, or several with `accelerate launch`. Batches are a pure function of
(seed, step), and checkpoints hold the trainable weights, the optimizer state and the RNG
states, so an interrupted run resumed with `--resume` ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from rich.progress import MofNCompleteColumn, TextColumn

from merge_lab.core.progress import progress_bar
from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import Recipe
from merge_lab.moe import losses
from merge_lab.moe.data import Encoded, collate, encode, load_examples, shared_prefix
from merge_lab.moe.layout import expert_labels
from merge_lab.moe.routing import capture_router_logits, routers
from merge_lab.training import chat

STATE_FILE = "state.pt"


class TrainConfig(BaseModel):
    """The recipe's `train:` block.

    gating_tokens: SmolLM2's chat template puts the same 24-token system block before every
    prompt (~40% of a 60-token example). Runs on SmolLM2-135M, 3 experts, router only, 30 steps,
    lr 1e-2, lambda 0.5, batch 8, max_length 96, routing accuracy on 42-48 training rows (all
    tokens / content tokens):
      trained demo experts, random init: before 0.33 / 0.33; all 0.86 / 0.98; content 0.93 / 0.98
      random LoRA experts, centroid init: before 0.58 / 0.79; all 0.48 / 0.98; content 0.54 / 0.83
    Both losses teach the router; what hid it was measuring over all tokens, so accuracy is now
    always measured on content tokens. Neither loss wins in both runs (one seed each), so `all`,
    the paper's definition, stays the default.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data: str | list[dict[str, Any]] = Field(
        description="JSONL of {prompt, response, label} rows, or align-style blocks each with `expert: LABEL` and "
                    "one of `source:` (a shipped set by split), `jsonl:` or `suite:` (a registered suite's items on "
                    "its train split, never the ones it evaluates; reference replies, or response_template)"
    )
    steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(8, ge=1, description="examples per step (per process)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(256, ge=8, description="tokens per example (prompt + response), longer are cut")
    trainable: Literal["router", "router+lora", "router+experts"] = Field(
        "router", description="what trains besides nothing else: routers only, + expert LoRA, + full experts"
    )
    train_attention: bool = Field(False, description="also train attention (frozen by default, as in the paper)")
    lora_r: int = Field(8, ge=1, description="rank of the expert LoRA (router+lora)")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r")
    gating_weight: float = Field(0.01, alias="lambda", ge=0, description="weight of the gating loss")
    drift_weight: float | dict[str, float] = Field(
        0.0, alias="gamma", description="weight of each expert's drift regulariser: one number or {label: gamma}"
    )
    load_balance: float = Field(0.0, ge=0, description="weight of the load-balancing loss (0: off)")
    gating_tokens: Literal["all", "content"] = Field(
        "all", description="tokens the gating loss averages over: all real tokens (the issue's and paper's "
                           "definition), or content: all but the prefix every example shares (the chat template's "
                           "system block, identical hidden states in every example). Routing accuracy is always "
                           "measured on the content tokens")
    seed: int = Field(0, description="seed of LoRA init, data order and dropout")
    eval_rows: int = Field(96, ge=0, description="routing accuracy before/after is measured on this many rows (0: off)")
    checkpoint_every: int = Field(0, ge=0, description="save a resumable checkpoint every N steps (0: only on Ctrl-C)")
    cpu: bool = Field(False, description="train on CPU even when a GPU is present")

    @model_validator(mode="after")
    def _gamma_non_negative(self) -> TrainConfig:
        values = self.drift_weight.values() if isinstance(self.drift_weight, dict) else [self.drift_weight]
        if any(v < 0 for v in values):
            raise ValueError("gamma must be >= 0")
        return self

    def gammas(self, labels: list[str]) -> list[float]:
        if isinstance(self.drift_weight, dict):
            return [float(self.drift_weight.get(lab, 0.0)) for lab in labels]
        return [float(self.drift_weight)] * len(labels)


def train_config(recipe: Recipe) -> TrainConfig:
    """Validate the recipe's `train:` block, with the recipe line of the offending key."""
    if recipe.train is None:
        raise MergeLabError(f"{recipe.source}: has no 'train:' block; add one (data, steps, ...) to fuse.")
    cfg = recipe.validate_block(TrainConfig, ("train",), "train block")
    labels = [m.label or Path(m.model).name for m in recipe.models]
    if isinstance(cfg.drift_weight, dict):
        unknown = [k for k in cfg.drift_weight if k not in labels]
        if unknown:
            raise MergeLabError(
                f"{recipe.where('train', 'gamma')}: label(s) {unknown} are not expert labels ({', '.join(labels)})."
            )
    return cfg


@dataclass
class TrainResult:
    model: torch.nn.Module  # plain transformers model, LoRA merged
    steps_done: int
    finished: bool
    history: list[dict[str, float]] = field(default_factory=list)
    accuracy_before: float = float("nan")
    accuracy_after: float = float("nan")


def _setup(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.nn.Module, list, list]:
    """Freeze what does not train; returns (model, expert tensors per layer, their initial values)."""
    for p in model.parameters():
        p.requires_grad_(False)
    expert_modules = [layer.mlp.experts for layer in model.model.layers]
    if cfg.trainable == "router+lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules=[], lora_dropout=0.0,
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, lcfg)
    for r in routers(model):
        r.weight.requires_grad_(True)
    expert_params: list[torch.Tensor] = []
    if cfg.trainable == "router+experts":
        for experts in expert_modules:
            for p in (experts.gate_up_proj, experts.down_proj):
                p.requires_grad_(True)
                expert_params.append(p)
    if cfg.train_attention:
        for name, p in model.named_parameters():
            if ".self_attn." in name and "lora_" not in name:
                p.requires_grad_(True)
    initial = [p.detach().clone() for p in expert_params]
    return model, expert_params, initial


def _drift_per_expert(model, cfg: TrainConfig, expert_params, initial, n_experts: int) -> torch.Tensor:
    """[experts]: ||theta_i - theta_i_initial||^2 over each expert's trainable weights."""
    if cfg.trainable == "router+experts":
        return torch.stack([
            losses.drift([p[i] for p in expert_params], [p0[i] for p0 in initial]) for i in range(n_experts)
        ])
    if cfg.trainable == "router+lora":
        from peft.tuners.lora.layer import ParamWrapper

        deltas = [m.get_delta_weight("default") for m in model.modules() if isinstance(m, ParamWrapper)]
        return torch.stack([losses.drift([d[i] for d in deltas], [None] * len(deltas)) for i in range(n_experts)])
    return torch.zeros(n_experts)


def _batch_indices(step: int, n: int, batch: int, seed: int, rank: int, world: int) -> list[int]:
    """Examples of one step: a seeded permutation per epoch, read as one stream; a pure function of step."""
    out = []
    start = (step * world + rank) * batch
    perms: dict[int, torch.Tensor] = {}
    for pos in range(start, start + batch):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perms[epoch][i]))
    return out


def _save_state(folder: Path, model, optimizer, step: int, history: list) -> None:
    trainable = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "step": step, "trainable": trainable, "optimizer": optimizer.state_dict(), "history": history,
        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(folder / STATE_FILE)


def _load_state(folder: Path, model, optimizer) -> tuple[int, list]:
    state = torch.load(folder / STATE_FILE, weights_only=False)
    missing = set(n for n, p in model.named_parameters() if p.requires_grad) ^ set(state["trainable"])
    if missing:
        raise MergeLabError(
            f"{folder / STATE_FILE}: the checkpoint's trainable weights differ from this recipe's "
            f"(e.g. {sorted(missing)[:2]}); the train block changed. Start again without --resume."
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"]), list(state["history"])


@torch.no_grad()
def routing_accuracy(model, encoded: list[Encoded], pad_id: int, device, batch: int = 16, skip: int = 0) -> float:
    """Share of examples whose mean routing probability is highest on their labelled expert
    (averaged over real tokens after the first `skip`)."""
    was_training = model.training
    model.eval()
    hits = 0
    for i in range(0, len(encoded), batch):
        b = {k: v.to(device) for k, v in collate(encoded[i:i + batch], pad_id).items()}
        with capture_router_logits(model) as captured:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        probs = losses.mean_routing_probs(captured, losses.skip_prefix(b["attention_mask"], skip))
        hits += int((probs.argmax(-1) == b["expert"]).sum())
    model.train(was_training)
    return hits / len(encoded)


def train(
    moe_dir: str | Path,
    cfg: TrainConfig,
    state_dir: str | Path,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    console=None,
) -> TrainResult:
    """Train the assembled MoE in `moe_dir`. `stop_after` ends early after that step with a saved
    checkpoint, as Ctrl-C does (a resumed run continues from it)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    moe_dir, state_dir = Path(moe_dir), Path(state_dir)
    from accelerate.utils import DistributedDataParallelKwargs

    # top-k routing leaves some experts without gradient in a step: DDP must allow unused parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=cfg.cpu, kwargs_handlers=[ddp])
    set_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(moe_dir))
    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32)
    labels = expert_labels(model.config.to_dict())
    pad_id = chat.pad_id(tokenizer)
    encoded = [encode(tokenizer, ex, labels, cfg.max_length) for ex in load_examples(cfg.data, labels, "train.data")]
    model, expert_params, initial = _setup(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    initial = [t.to(device) for t in initial]
    inner = accelerator.unwrap_model(model)
    gammas = torch.tensor(cfg.gammas(labels), device=device)
    top_k = routers(inner)[0].top_k

    start, history = 0, []
    if resume and (state_dir / STATE_FILE).exists():
        start, history = _load_state(state_dir, inner, optimizer)
    shared = shared_prefix(encoded)  # same hidden states in every example: no routing signal to measure
    skip = shared if cfg.gating_tokens == "content" else 0
    probe = encoded[:: max(1, -(-len(encoded) // cfg.eval_rows))] if cfg.eval_rows else []
    acc_before = routing_accuracy(inner, probe, pad_id, device, skip=shared) if start == 0 and probe else float("nan")

    step = start
    with progress_bar(console, progress and accelerator.is_main_process, MofNCompleteColumn(),
                      TextColumn("{task.fields[terms]}")) as bar:
        job = bar.add_task("fuse", total=cfg.steps, completed=start, terms="")
        try:
            while step < cfg.steps:
                idx = _batch_indices(step, len(encoded), cfg.batch_size, cfg.seed,
                                     accelerator.process_index, accelerator.num_processes)
                b = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
                with capture_router_logits(inner) as captured:
                    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                lm = losses.lm_loss(out.logits, b["labels"])
                probs = losses.mean_routing_probs(captured, losses.skip_prefix(b["attention_mask"], skip))
                gate = losses.gating_loss(probs, b["expert"])
                drift = _drift_per_expert(inner, cfg, expert_params, initial, len(labels)).to(device)
                loss = lm + cfg.gating_weight * gate + (gammas * drift).sum()
                balance = torch.zeros((), device=device)
                if cfg.load_balance > 0:
                    balance = losses.load_balance_loss(captured, b["attention_mask"], top_k)
                    loss = loss + cfg.load_balance * balance
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                terms = {"loss": loss.item(), "lm": lm.item(), "gate": gate.item(), "drift": drift.sum().item(),
                         "balance": balance.item(), "route_acc": losses.routing_accuracy(
                             losses.mean_routing_probs(captured, losses.skip_prefix(b["attention_mask"], shared)),
                             b["expert"]).item()}
                history.append(terms)
                bar.update(job, advance=1, terms=" ".join(f"{k} {v:.3g}" for k, v in terms.items()))
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and accelerator.is_main_process:
                    _save_state(state_dir, inner, optimizer, step, history)
                if stop_after is not None and step >= stop_after and step < cfg.steps:
                    if accelerator.is_main_process:
                        _save_state(state_dir, inner, optimizer, step, history)
                    return TrainResult(inner, step, False, history)
        except KeyboardInterrupt:
            if accelerator.is_main_process:
                _save_state(state_dir, inner, optimizer, step, history)
            raise
    acc_after = routing_accuracy(inner, probe, pad_id, device, skip=shared) if probe else float("nan")
    final = inner.merge_and_unload() if cfg.trainable == "router+lora" else inner
    return TrainResult(final, step, True, history, acc_before, acc_after)
