"""Labelled fusion data, tokenised with the base's chat template so that the loss can be taken on
the response tokens only.

Data is either a JSONL file of {prompt, response, label} rows, or a list of blocks in the same
form as `merge-lab align` recipes' `data:` (a shipped source by split, or a JSONL file, with
limit, label filter and templates), each with `expert: LABEL` saying which expert its rows are for.
"""

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


def load_blocks(blocks: list[dict], labels: list[str], where: str = "train.data") -> list[Example]:
    """Rows from align-style data blocks, each labelled with its block's `expert`."""
    from pydantic import ValidationError

    from merge_lab.align import AlignRecipe, training_rows

    out: list[Example] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise MergeLabError(f"{where}.{i}: a data block is a mapping (expert, source or jsonl, split, limit, ...).")
        block = dict(block)
        label = block.pop("expert", None)
        if label not in labels:
            raise MergeLabError(
                f"{where}.{i}: expert {label!r} is not one of the recipe's expert labels ({', '.join(labels)}); "
                "every block needs `expert: LABEL`."
            )
        try:
            spec = AlignRecipe.model_validate({"base_model": "-", "data": [block]})
        except ValidationError as e:
            err = e.errors()[0]
            raise MergeLabError(f"{where}.{i}.{err['loc'][-1]}: {err['msg']} (got {err.get('input')!r}).") from None
        try:
            rows = training_rows(spec)
        except MergeLabError as e:
            raise MergeLabError(f"{where}.{i}: {e}") from None
        out += [Example(r.prompt, r.response, label) for r in rows]
    if not out:
        raise MergeLabError(f"{where}: selects no rows.")
    return out


def load_examples(data: str | Path | list[dict], labels: list[str], where: str = "train.data") -> list[Example]:
    """A JSONL path or a list of align-style blocks, as labelled examples."""
    if isinstance(data, list):
        return load_blocks(data, labels, where)
    return load_jsonl(data, labels, where)


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
