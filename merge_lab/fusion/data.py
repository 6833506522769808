"""Labelled fusion data: JSONL rows of (prompt, response, label), tokenised with the base's chat
template so that the loss can be taken on the response tokens only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.errors import MergeLabError


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    label: str


@dataclass
class Encoded:
    ids: list[int]
    loss_mask: list[bool]  # True on response tokens
    label: int


def load_jsonl(path: str | Path, labels: list[str], where: str = "") -> list[Example]:
    """Read and check every row; a label the recipe does not name is an error (with its line)."""
    path = Path(path)
    if not path.exists():
        raise MergeLabError(f"{where + ': ' if where else ''}{path}: data file not found.")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MergeLabError(f"{path}, line {n}: not valid JSON ({e}).") from e
        missing = [k for k in ("prompt", "response", "label") if not isinstance(row.get(k), str)]
        if missing:
            raise MergeLabError(f"{path}, line {n}: needs string field(s) {missing} (prompt, response, label).")
        if row["label"] not in labels:
            raise MergeLabError(
                f"{path}, line {n}: label '{row['label']}' is not one of the recipe's expert labels "
                f"({', '.join(labels)}). Fix the row or add a model with that label."
            )
        rows.append(Example(row["prompt"], row["response"], row["label"]))
    if not rows:
        raise MergeLabError(f"{path}: no rows.")
    return rows


def _prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return prompt + "\n"


def encode(tokenizer, ex: Example, labels: list[str], max_length: int) -> Encoded:
    """Chat-formatted prompt + response (+ eos); the loss mask covers the response and eos."""
    prompt = tokenizer(_prompt_text(tokenizer, ex.prompt), add_special_tokens=False)["input_ids"]
    response = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response = response + [tokenizer.eos_token_id]
    ids = (prompt + response)[:max_length]
    mask = ([False] * len(prompt) + [True] * len(response))[:max_length]
    return Encoded(ids, mask, labels.index(ex.label))


def encode_prompt(tokenizer, prompt: str, max_length: int) -> list[int]:
    return tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"][:max_length]


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids, attention_mask, labels (-100 off the response), expert."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    target = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        attn[i, :n] = 1
        t = torch.tensor(e.ids)
        t[~torch.tensor(e.loss_mask)] = -100
        target[i, :n] = t
    return {"input_ids": ids, "attention_mask": attn, "labels": target,
            "expert": torch.tensor([e.label for e in batch], dtype=torch.long)}
