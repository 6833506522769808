"""Router access on a loaded transformers MoE: capture each layer's router logits, force routing.

Works on the modules the installed transformers builds for Mixtral, Qwen2-MoE and Qwen3-MoE:
each decoder layer's `mlp.gate` is a top-k router whose forward returns (logits, weights,
indices) for the flattened tokens. Hooks keep us independent of `output_router_logits`, whose
return format changed across transformers versions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from merge_lab.moe import losses
from merge_lab.moe.data import Encoded, collate, encode, load_rows, shared_prefix
from merge_lab.moe.layout import expert_labels
from merge_lab.training import chat


def routers(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's router, in layer order (through a PEFT wrapper too)."""
    inner = model
    while not hasattr(inner, "layers"):
        for attr in ("base_model", "model"):
            if hasattr(inner, attr):
                inner = getattr(inner, attr)
                break
        else:
            raise ValueError("no decoder layers found in this model")
    return [layer.mlp.gate for layer in inner.layers]


@contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Yields a list that each forward fills with one [tokens, experts] logits tensor per layer."""
    captured: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda _m, _a, out: captured.append(out[0])) for r in routers(model)]
    try:
        yield captured
    finally:
        for h in hooks:
            h.remove()


def _forced(expert: int, module: nn.Module, _args, out):
    logits = torch.full_like(out[0], float("-inf"))
    logits[:, expert] = 0.0
    probs = torch.softmax(logits.float(), dim=-1)
    weights, index = torch.topk(probs, module.top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(out[1].dtype), index


@contextmanager
def forced_routing(model: nn.Module, expert: int) -> Iterator[None]:
    """Every token goes to `expert` with weight 1 (the other kept experts get weight exactly 0)."""
    hooks = [r.register_forward_hook(lambda m, a, o: _forced(expert, m, a, o)) for r in routers(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def routing_accuracy(model: nn.Module, encoded: list[Encoded], pad_id: int, device, batch: int = 16,
                     skip: int = 0, forward: nn.Module | None = None) -> float:
    """Share of examples whose mean routing probability is highest on their labelled expert
    (averaged over real tokens after the first `skip`). `forward`: the module to run instead of
    `model` itself, the wrapper FSDP gathers the weights through (the routers are `model`'s)."""
    forward = forward if forward is not None else model
    was_training = forward.training
    forward.eval()
    hits = 0
    for i in range(0, len(encoded), batch):
        b = {k: v.to(device) for k, v in collate(encoded[i:i + batch], pad_id).items()}
        with capture_router_logits(model) as captured:
            forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        probs = losses.mean_routing_probs(captured, losses.skip_prefix(b["attention_mask"], skip))
        hits += int((probs.argmax(-1) == b["expert"]).sum())
    forward.train(was_training)
    return hits / len(encoded)


def row_slot_counts(logits: list[torch.Tensor], mask: torch.Tensor, k: int) -> torch.Tensor:
    """[rows, layers, experts]: per row of a [rows, tokens] pass, how many of its real tokens'
    (mask 1) top-k router slots each expert took, from each layer's [rows * tokens, experts] logits."""
    rows, tokens = mask.shape
    real = mask.to(torch.float32)[..., None].cpu()
    per_layer = []
    for layer in logits:
        top = layer.detach().float().cpu().view(rows, tokens, -1).topk(k, dim=-1).indices
        hits = torch.zeros(rows, tokens, layer.shape[-1]).scatter_(2, top, 1.0)
        per_layer.append((hits * real).sum(1))
    return torch.stack(per_layer, dim=1)


@torch.no_grad()
def routing_counts(model: nn.Module, batches: list[dict[str, torch.Tensor]], labels: list[str]) -> dict:
    """How often each expert is in a token's top-k, per layer and per example label (real tokens)."""
    k = routers(model)[0].top_k
    counts = torch.zeros(len(labels), len(routers(model)), len(labels))
    tokens = torch.zeros(len(labels))
    for batch in batches:
        mask = batch["attention_mask"]
        with capture_router_logits(model) as captured:
            model(input_ids=batch["input_ids"], attention_mask=mask)
        counts.index_add_(0, batch["expert"], row_slot_counts(captured, mask, k))
        tokens.index_add_(0, batch["expert"], mask.sum(1).float())
    share = counts / tokens.clamp(min=1)[:, None, None]
    return {"labels": labels, "share": share, "tokens": {i: int(t) for i, t in enumerate(tokens)}}


def plot_routing(result: dict, path: str | Path) -> Path:
    """Heatmaps, one per label: layer x expert, the share of tokens routed there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, share = result["labels"], result["share"]
    fig, axes = plt.subplots(1, len(labels), figsize=(3 * len(labels) + 1, 3 + 0.15 * share.shape[1]), squeeze=False)
    for k, ax in enumerate(axes[0]):
        im = ax.imshow(share[k].numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"data: {labels[k]}")
        ax.set_xticks(range(len(labels)), labels, rotation=45)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="share of tokens (top-k)")
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def inspect(model_dir: str | Path, data: str | Path, max_examples: int = 200, max_length: int = 256,
            batch_size: int = 8) -> dict:
    """Route labelled data through a fused MoE: per-label, per-layer expert shares and routing accuracy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    labels = expert_labels(model.config.to_dict())
    pad = chat.pad_id(tokenizer)
    rows = load_rows(data, labels, lambda *key: "inspect-routing DATA")[:max_examples]
    encoded = [encode(tokenizer, ex, labels, max_length) for ex in rows]
    batches = [collate(encoded[i:i + batch_size], pad) for i in range(0, len(encoded), batch_size)]
    result = routing_counts(model, batches, labels)
    result["accuracy"] = routing_accuracy(model, encoded, pad, "cpu", batch_size, skip=shared_prefix(encoded))
    result["examples"] = len(encoded)
    return result
