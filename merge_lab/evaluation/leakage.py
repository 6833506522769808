"""Proof that no suite item was trained on: `training_data:` entries, the train_items.json that
`merge-lab align` writes beside an expert, and the rows of the candidates the comparison trains
itself (multitask, merge_then_train), checked disjoint from every suite by id and by text."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.paths import resolve
from merge_lab.evaluation.suites import Suite


def training_items(root: Path, entry: str | dict) -> list[data.Example | str]:
    """Training items from 'source[:split]', {source, split, limit}, {path: JSONL}, or a
    train_items.json written by `merge-lab align` (or the folder that holds one)."""
    if isinstance(entry, str):
        p = resolve(root, entry)
        if p.is_dir() or p.suffix == ".json":
            return trained_ids(p)
        if p.suffix == ".jsonl":
            return data.load_jsonl(p)
        source, _, split = entry.partition(":")
        return data.select(source, split or "train")
    if "path" in entry:
        p = resolve(root, entry["path"])
        return trained_ids(p) if p.is_dir() or p.suffix == ".json" else data.load_jsonl(p)
    if "source" in entry:
        return data.select(entry["source"], entry.get("split", "train"), entry.get("limit"))
    raise MergeLabError(f"training_data entry {entry}: give 'source[:split]', {{source, split}}, a JSONL or a train_items.json.")


def trained_ids(path: Path) -> list[str]:
    """The ids in an align run's train_items.json ({"ids": [...]} or a plain list)."""
    file = path / "train_items.json" if path.is_dir() else path
    if not file.is_file():
        raise MergeLabError(f"{file}: not found; give the train_items.json that `merge-lab align` wrote.")
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise MergeLabError(f"{file}: not valid JSON ({e.msg}).") from None
    ids = doc.get("ids") if isinstance(doc, dict) else doc
    if not isinstance(ids, list):
        raise MergeLabError(f"{file}: expected a list of ids or {{\"ids\": [...]}}.")
    return [str(i) for i in ids]


def discovered_training(candidates: dict[str, Candidate]) -> list[Path]:
    """train_items.json files beside checkpoint candidates (an align output's merged/ folder)."""
    found = []
    for c in candidates.values():
        if c.kind == "checkpoint":
            for folder in (c.path, c.path.parent):
                f = folder / "train_items.json"
                if f.is_file() and f not in found:
                    found.append(f)
    return found


@dataclass(frozen=True)
class TrainingRows:
    """The rows a candidate that the comparison trains itself will train on (trained.py)."""

    candidate: str
    rows: list[data.Example]

    def __str__(self) -> str:
        return f"the {len(self.rows)} rows candidate '{self.candidate}' trains on"


def trained_rows(candidates: dict[str, Candidate]) -> list[tuple[str, TrainingRows]]:
    """(name, rows) of each candidate trained by the comparison, known before it is trained."""
    return [(n, TrainingRows(n, c.training_rows())) for n, c in candidates.items() if hasattr(c, "training_rows")]


def check_disjoint(root: Path, entries: list[tuple[str, str | dict | TrainingRows]], suites: list[Suite]) -> list[str]:
    """Every (place, entry)'s items disjoint from every suite's, else an error naming the place (a
    compare file's line, or the train_items.json found), the entry and the suite; the entries checked."""
    checked = []
    for place, entry in entries:
        try:
            train = entry.rows if isinstance(entry, TrainingRows) else training_items(root, entry)
        except MergeLabError as e:
            raise MergeLabError(f"{place}: {e}") from None
        for x in suites:
            try:
                data.check_disjoint(train, x.items())
            except MergeLabError as e:
                raise MergeLabError(f"{place}: training data {entry} overlaps suite '{x.name}': {e}") from None
        checked.append(str(entry))
    return checked
