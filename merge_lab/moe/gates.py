"""Router rows the way mergekit-moe computes them, for every `gate_mode`.

mergekit-moe (0.1.5, `mergekit/moe/router.py` and `scripts/moe.py`) writes one router row per
expert per layer. We reproduce its arithmetic here, so a mergekit-moe config gives the same
routers under `merge-lab moe` (tests/test_mergekit_moe.py checks it against mergekit's own code):

- Prompts are raw text, no chat template: the tokenizer's BOS *string* is prepended to each
  prompt, special tokens are not added again, and all of one expert's positive (or negative)
  prompts go in one batch, padded on the LEFT with pad = BOS (EOS when there is no BOS).
  Batch composition matters: padding shifts positions, so prompts are never re-batched.
- `hidden` (and its alias `hidden_last`): the base runs in bfloat16; per layer l the row uses
  `hidden_states[l]`, the residual stream entering decoder layer l (l = 0 is the embedding
  output; the final normed state is dropped). The LAST position is taken (a real token, thanks
  to the left padding) and averaged over the batch's prompts.
- `hidden_avg`: as `hidden`, but the mean over ALL positions, pads included (mergekit divides
  the sum by the padded length; it does not use the attention mask).
- `cheap_embed`: the base's `model.embed_tokens.weight` rows of the prompt tokens, in float32,
  summed over real (mask = 1) tokens and prompts, normalised to unit length; the same row for
  every layer.
- `base+adapter`: the hidden modes load the base and put the adapted tensors in (the LoRA-applied
  view's, as a merged copy holds them), cheap_embed reads the adapted embedding: the rows
  mergekit-moe gives on mergekit's merged copy of the reference.
- For all prompt modes: row = f(positive) - f(negative) (when there are negative prompts), then
  normalised to unit L2 length (norm clamped at 1e-8).
- `random`: `torch.randn(layers, experts, hidden)`, standard normal (std 1, not nn.Linear's
  init). `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)), nn.Linear's default init, drawn as
  `torch.rand(...) * 2 * scale - scale`. mergekit draws from torch's global, unseeded RNG; we draw
  from a CPU generator seeded with `seed`, which is the same stream as mergekit's after
  `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.lora_applied import LoraAppliedCheckpoint
from merge_lab.errors import MergeLabError

GateMode = Literal["hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random"]
GATE_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPT_MODES: tuple[str, ...] = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
EMBED_NAME = "model.embed_tokens.weight"


@dataclass(frozen=True)
class ExpertPrompts:
    """One expert's prompts: the router row points towards `positive` and away from `negative`."""

    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)


def _base_config(base: Path) -> dict:
    import json

    path = base / "config.json"
    if not path.is_file():
        raise MergeLabError(f"{base}: base model not found (no config.json); base_model must be a local model folder.")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    for key in ("num_hidden_layers", "hidden_size"):
        if key not in cfg:
            raise MergeLabError(f"{path}: no '{key}'; cannot size the routers.")
    return cfg


def gate_shape(base: Path) -> tuple[int, int]:
    """(layers, hidden size) of the base: the routers' shape per expert, from its config.json."""
    cfg = _base_config(base)
    return int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])


def random_gate_rows(layers: int, experts: int, hidden: int, mode: str, seed: int) -> torch.Tensor:
    """mergekit's `random` / `uniform_random` rows [layers, experts, hidden], from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((layers, experts, hidden), generator=g)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden)
        return torch.rand((layers, experts, hidden), generator=g) * 2 * scale - scale
    raise MergeLabError(f"gate_mode '{mode}' is not a random mode (random, uniform_random).")


def mergekit_tokenizer(base: str | Path) -> Any:
    """The base's tokenizer set up as mergekit-moe does: left padding, pad = BOS (else EOS)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def tokenize_prompts(prompts: Sequence[str], tokenizer: Any) -> dict[str, torch.Tensor]:
    """One left-padded batch: BOS text + prompt, no special tokens added by the tokenizer."""
    enc = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _cheap_embed(embed: torch.Tensor, batch: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    ids = batch["input_ids"]
    if int(ids.max()) >= embed.shape[0]:
        raise MergeLabError(
            f"a prompt's token id {int(ids.max())} is outside the base's embedding ({embed.shape[0]} rows); "
            "the base's tokenizer does not match its weights."
        )
    h = embed.float()[ids]  # = one_hot(ids) @ embed, exactly
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(layers, 1)


def _hidden(model: Any, batch: dict[str, torch.Tensor], average: bool) -> torch.Tensor:
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # [layers, batch, seq, hidden]: each layer's input
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def gate_rows(
    base_path: str | Path,
    experts_prompts: Sequence[ExpertPrompts],
    mode: str = "hidden",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | None = None,
    tokenizer: Any = None,
    weights: Checkpoint | None = None,
) -> torch.Tensor:
    """Router rows [layers, experts, hidden] for mergekit's `mode`, one expert per `experts_prompts` entry.

    `dtype` is what the base runs in for the hidden modes (mergekit: bfloat16; the rows come back in
    it); `device` defaults to CUDA when available. `seed` only matters for the random modes.
    For mergekit's Qwen MoE shared expert, append its prompts last: mergekit computes its
    shared-expert gate in the same call and splits the trailing rows off. `weights` is the base's
    checkpoint as the prompt modes read it (default: the folder's; a LoRA-applied view for
    `base+adapter`, whose adapted tensors replace the loaded model's).
    """
    base = Path(base_path)
    if mode not in GATE_MODES:
        raise MergeLabError(f"unknown gate_mode '{mode}'; one of: {', '.join(GATE_MODES)}.")
    if not experts_prompts:
        raise MergeLabError("gate_rows: no experts given.")
    layers, hidden = gate_shape(base)
    if mode in ("random", "uniform_random"):
        return random_gate_rows(layers, len(experts_prompts), hidden, mode, seed)
    for i, e in enumerate(experts_prompts):
        if not e.positive:
            raise MergeLabError(f"gate_mode '{mode}': expert {i} has no positive prompts to compute its router row from.")
    tok = tokenizer if tokenizer is not None else mergekit_tokenizer(base)

    if mode == "cheap_embed":
        ckpt = weights if weights is not None else Checkpoint(base)
        if EMBED_NAME not in ckpt:
            raise MergeLabError(f"{base}: no '{EMBED_NAME}' tensor, which gate_mode 'cheap_embed' reads.")
        embed = ckpt.get(EMBED_NAME)

        def rows_of(prompts: list[str]) -> torch.Tensor:
            return _cheap_embed(embed, tokenize_prompts(prompts, tok), layers)
    else:
        from transformers import AutoModelForCausalLM

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
        if weights is not None:
            apply_adapted(model, weights)
        model = model.to(dev).eval()

        def rows_of(prompts: list[str]) -> torch.Tensor:
            return _hidden(model, tokenize_prompts(prompts, tok), average=mode == "hidden_avg").cpu()

    out = []
    for e in experts_prompts:
        rows = rows_of(list(e.positive))
        if e.negative:
            rows = rows - rows_of(list(e.negative))
        out.append(rows / rows.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(out, dim=0).permute(1, 0, 2).contiguous()


def apply_adapted(model: Any, weights: Checkpoint) -> None:
    """Put the tensors a LoRA-applied view changes (core.lora_applied: W + scale * B @ A, rounded
    to the base's dtype, as a merged copy holds them) into `model`, loaded from the bare base;
    nothing when `weights` is a plain checkpoint."""
    if not isinstance(weights, LoraAppliedCheckpoint):
        return
    adapter = weights.adapter
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted({*adapter.pairs, *adapter.saved, *adapter.biases}):
            if name not in params:
                raise MergeLabError(f"{adapter.path}: adapts '{name}', which the base's transformers model has no "
                                    "parameter for; the gates cannot be computed on the adapted base.")
            params[name].copy_(weights.get(name).to(params[name].dtype))


def degenerate_layers(rows: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose rows are near-dependent (condition number > threshold; mergekit warns on these):
    the prompts are too alike for the router to tell those experts apart."""
    return [i for i in range(rows.shape[0]) if float(torch.linalg.cond(rows[i].float())) > threshold]
