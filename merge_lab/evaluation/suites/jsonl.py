"""Suites over a user's JSONL file: {name, path, kind[, objective]} in a compare file."""

from __future__ import annotations

from pathlib import Path

from merge_lab.core.hashing import file_sha256
from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.suites.base import OBJECTIVES, Suite
from merge_lab.evaluation.suites.choice import MultipleChoiceSuite
from merge_lab.evaluation.suites.likelihood import LikelihoodSuite
from merge_lab.evaluation.suites.refusal import RefusalSuite
from merge_lab.evaluation.suites.truefalse import TrueFalseSuite

JSONL_KINDS: dict[str, type[Suite]] = {
    "refusal": RefusalSuite, "overrefusal": RefusalSuite, "likelihood": LikelihoodSuite,
    "truefalse": TrueFalseSuite, "multiple_choice": MultipleChoiceSuite,
}


def jsonl_suite(name: str, path: str | Path, kind: str, objective: str = "custom", where: str = "", **kw) -> Suite:
    """A suite over a user's JSONL file (all of it: the user's file is evaluation data); `where`
    (a file and line) prefixes its errors."""
    at = f"{where}: " if where else ""
    if kind not in JSONL_KINDS:
        raise MergeLabError(f"{at}suite '{name}': unknown kind '{kind}'; use one of {', '.join(JSONL_KINDS)}.")
    if objective not in OBJECTIVES:
        raise MergeLabError(f"{at}suite '{name}': unknown objective '{objective}'; use one of {', '.join(OBJECTIVES)}.")
    examples = data.load_jsonl(path, source=name)
    base = JSONL_KINDS[kind]
    attrs = {"name": name, "objective": objective, "sources": (), "description": f"{kind} on {path}",
             "higher_is_better": kind != "overrefusal", "version": file_sha256(path)[:12],
             "load_items": lambda self: [e for e in examples if self.keep(e)]}
    if kind == "overrefusal":
        attrs["metric"] = "over-refusal rate"
    if kind == "multiple_choice":
        for e in examples:
            if not isinstance(e.meta.get("choices"), list) or not isinstance(e.label, int):
                raise MergeLabError(f"{path}: item {e.id} needs 'choices' (a list) and 'label' (the index of the answer).")
    cls = type(f"Jsonl_{name}", (base,), attrs)
    return cls(split=kw.get("split", "test"), limit=kw.get("limit"), seed=kw.get("seed", 0))
