"""Labelled fusion data: each expert's rows, tokenised with the chat format (merge_lab.training.chat)
so that the loss is taken on the reply only.

A fusion recipe's `train.data` is a list of training blocks (merge_lab.training.blocks.ExpertBlock:
the blocks of align recipes, each with `expert: LABEL`), or a JSONL file of {prompt, response,
label} rows: shorthand for one jsonl block whose rows each name their expert. Rows are
`merge_lab.datasets.sources.Example`s whose `label` is the expert label.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.training import chat
from merge_lab.training.blocks import ExpertBlock, Locate, RowCheck, block_items, plain_keys, templated


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]  # True on response tokens
    label: int


def as_blocks(data: str | Path | list) -> list:
    """`train.data` as blocks: a JSONL path is one jsonl block whose rows name their expert."""
    return [{"jsonl": str(data)}] if isinstance(data, (str, Path)) else data


def expert_label_check(labels: list[str]) -> RowCheck:
    """A JSONL row's `label` must name one of the experts."""

    def check(row: dict) -> str | None:
        label = row.get("label")
        if not isinstance(label, str):
            return f"needs a string 'label' naming its expert (one of {', '.join(labels)})."
        if label not in labels:
            return (f"label '{label}' is not one of the recipe's expert labels ({', '.join(labels)}). "
                    "Fix the row or add a model with that label.")
        return None

    return check


def load_rows(data: str | Path | list[ExpertBlock], labels: list[str],
              at: Locate = plain_keys("train.data")) -> list[Example]:
    """Each block's templated rows, labelled with its expert: the one reader of fusion data (training,
    centroid router init, inspect-routing). `at(i, key)` names block i's key in errors."""
    rows: list[Example] = []
    for i, block in enumerate(as_blocks(data)):
        if not isinstance(block, ExpertBlock):
            block = ExpertBlock(**block)  # a bare path, or blocks built in code: recipes come validated
        if block.expert is not None and block.expert not in labels:
            raise MergeLabError(
                f"{at(i, 'expert')}: expert {block.expert!r} is not one of the recipe's expert labels "
                f"({', '.join(labels)})."
            )
        check = expert_label_check(labels) if block.expert is None else None
        items = block_items(block, at(i), check)
        block_rows = templated(block, items, f"{at(i)} ({block.describe()})")
        rows += block_rows if block.expert is None else [replace(r, label=block.expert) for r in block_rows]
    return rows


def encode(tokenizer, ex: Example, labels: list[str], max_length: int) -> Encoded:
    """The chat format of training (training.chat); the loss mask covers the reply and its end marker."""
    ids, targets = chat.training_row(tokenizer, ex.prompt, ex.response, max_length)
    return Encoded(ids, [t != chat.IGNORE for t in targets], labels.index(ex.label))


def encode_prompt(tokenizer, prompt: str, max_length: int) -> list[int]:
    """A prompt as the fused model will see it before its reply (router initialisation)."""
    return chat.fit(chat.tokens(tokenizer, chat.prompt_text(tokenizer, prompt)), [], max_length)[0]


def shared_prefix(encoded: list[Encoded]) -> int:
    """Tokens at the start of every example's prompt (the chat template's system block, a fixed
    instruction). The model is causal, so their hidden states are identical in every example and
    say nothing about its label: `gating_tokens: content` leaves them out of the gating loss."""
    prompts = [e.ids[: e.loss_mask.index(True) if True in e.loss_mask else len(e.ids)] for e in encoded]
    if not prompts:
        return 0
    n = min(min(len(p) for p in prompts), min(len(e.ids) for e in encoded) - 1)  # keep a token of each
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return n


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (IGNORE off the response), expert."""
    ids, attn = chat.right_padded([e.ids for e in batch], pad_id)
    target, _ = chat.right_padded([[t if m else chat.IGNORE for t, m in zip(e.ids, e.loss_mask)] for e in batch],
                                  pad_id, fill=chat.IGNORE)
    return {"input_ids": ids, "attention_mask": attn, "labels": target,
            "expert": torch.tensor([e.label for e in batch], dtype=torch.long)}
