"""Labelled fusion data, tokenised with the base's chat template so that the loss can be taken on
the response tokens only.

Data is either a JSONL file of {prompt, response, label} rows, or a list of blocks in the same
form as `merge-lab align` recipes' `data:` (a shipped source by split, a JSONL file, or a
registered suite's train split, with limit, label filter and templates), each with
`expert: LABEL` saying which expert its rows are for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from merge_lab.errors import MergeLabError
from merge_lab.training import chat

if TYPE_CHECKING:
    from merge_lab.datasets import sources as data


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


def load_blocks(blocks: list[dict], labels: list[str], where: str = "train.data",
                locate: Callable[..., str] | None = None) -> list[Example]:
    """Rows from align-style data blocks, each labelled with its block's `expert`. `locate(i, key)`
    names block i's key in errors (the recipe's line), else `where.i.key`."""
    from pydantic import ValidationError

    from merge_lab.training.align import AlignRecipe, training_rows

    def at(i: int, key: str | None = None) -> str:
        if locate is not None:
            return locate(i, key) if key else locate(i)
        return f"{where}.{i}" + (f".{key}" if key else "")

    out: list[Example] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict):
            raise MergeLabError(f"{at(i)}: a data block is a mapping (expert, then source, jsonl or suite, limit, ...).")
        block = dict(block)
        label = block.pop("expert", None)
        if label not in labels:
            raise MergeLabError(
                f"{at(i, 'expert')}: expert {label!r} is not one of the recipe's expert labels ({', '.join(labels)}); "
                "every block needs `expert: LABEL`."
            )
        try:
            spec = AlignRecipe.model_validate({"base_model": "-", "data": [block]})
        except ValidationError as e:
            err = e.errors()[0]
            key = err["loc"][-1] if isinstance(err["loc"][-1], str) else None
            raise MergeLabError(f"{at(i, key)}: {err['msg']} (got {err.get('input')!r}).") from None
        try:
            rows = training_rows(spec)
        except MergeLabError as e:
            raise MergeLabError(f"{at(i)}: {e}") from None
        out += [Example(r.prompt, r.response, label) for r in rows]
    if not out:
        raise MergeLabError(f"{where}: selects no rows.")
    return out


def load_examples(data: str | Path | list[dict], labels: list[str], where: str = "train.data",
                  locate: Callable[..., str] | None = None) -> list[Example]:
    """A JSONL path or a list of align-style blocks, as labelled examples."""
    if isinstance(data, list):
        return load_blocks(data, labels, where, locate)
    return load_jsonl(data, labels, where)


def suite_train_items(name: str, response_template: str | None, where: str) -> list[data.Example]:
    """A registered suite's own item selection (its sources, `keep` filter and order) on the
    'train' split: items its evaluation never sees, since splits go by content hash. Suites that
    score a reference response (likelihood, true/false, multiple choice) give it as the reply;
    the others (refusal rate, win rate) score only what the model writes to a prompt, so their
    items have no reply to learn: those need a `response_template` (e.g. "{refusal}")."""
    from merge_lab.datasets import sources as data
    from merge_lab.evaluation import suites

    cls = suites.SUITES.get(name, where)
    reference = issubclass(cls, (suites.LikelihoodSuite, suites.TrueFalseSuite, suites.MultipleChoiceSuite))
    if not reference and response_template is None:
        raise MergeLabError(
            f"{where}: suite '{name}' scores the {cls.metric} of the model's own answers, so its items carry no "
            "reference response to train on; give a response_template, e.g. \"{refusal}\" (a templated "
            "refusal) or \"{response}\" (the item's shipped reply, where it has one)."
        )
    suite = cls()
    suite.split = "train"  # evaluation refuses this split; here it is the point: never an evaluated item
    items = suite.load_items()
    leaked = [e.id for e in items if data.split_of(e) != "train"]
    if leaked:  # a suite that ignores the split (e.g. one reading its own file) would hand us its test items
        raise MergeLabError(
            f"{where}: suite '{name}' does not select its items by merge_lab.datasets.sources's splits ({len(leaked)} are "
            f"evaluation items, e.g. {leaked[0]}); it cannot give training rows. Use `source:` or `jsonl:` blocks."
        )
    return items


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
