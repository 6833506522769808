"""A compare file -> a ready `Comparison`: paths resolved, suites and candidates built, every check
a user can act on done before any model runs (unknown suites, candidates that do not load,
ensembles whose tokenizers differ, overlap between training data and suites).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from merge_lab.core.config import Where
from merge_lab.core.distributed import process_device
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.cache import ResultCache
from merge_lab.evaluation.factory import CandidateFactory
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.leakage import check_disjoint, discovered_training, trained_rows
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.paths import resolve
from merge_lab.evaluation.spec import CompareSpec, Settings, load_spec, references
from merge_lab.evaluation.suites import EvalContext, Suite, make_suite


@dataclass
class Comparison:
    """A ready-to-run comparison: everything resolved and checked. `memo` holds what its models
    computed; nothing is shared with another comparison unless it is given the same memo."""

    spec: CompareSpec
    root: Path
    output: Path
    settings: Settings
    suites: list[Suite]
    candidates: dict[str, Candidate]
    sources: list[str]
    ctx: EvalContext
    cache: ResultCache
    memo: Memo = field(default_factory=Memo)
    training_checked: list[str] = field(default_factory=list)
    evaluated: list[tuple[str, str]] = field(default_factory=list)
    selection_suites: list[Suite] = field(default_factory=list)  # the same suites on the selection split
    notes: list[str] = field(default_factory=list)  # for the console, not the report (a fixed device under launch)

    def replace(self, old: Candidate, new: Candidate) -> None:
        """Put `new` wherever `old` takes part: as a candidate, a member, the reference, the judge."""
        swapped = {id(c): c.replacing(old, new) for c in self.candidates.values()}
        self.candidates = {n: swapped[id(c)] for n, c in self.candidates.items()}
        ref = self.ctx.reference
        if ref is not None:
            self.ctx.reference = swapped[id(ref)] if id(ref) in swapped else ref.replacing(old, new)
        if self.ctx.judge is not None:
            self.ctx.judge = self.ctx.judge.replacing(old, new)


def _suites(spec: CompareSpec, where: Where, root: Path, split: str, limit: int | None,
            every: bool = False) -> list[Suite]:
    """The `suites:` entries on one split (a JSONL's path resolved like every other path); with
    `every`, `limit` holds for every suite, an entry's own limit (the test split's) set aside."""
    out = []
    for i, x in enumerate(spec.suites):
        if isinstance(x, dict) and "path" in x:
            x = dict(x, path=str(resolve(root, x["path"])))
        if isinstance(x, dict) and every:
            x = {k: v for k, v in x.items() if k != "limit"}
        out.append(make_suite(x, split=split, limit=limit, seed=spec.settings.seed, where=where, at=("suites", i)))
    return out


def prepare(path: str | Path, output: str | Path | None = None, memo: Memo | None = None) -> Comparison:
    """Parse and check a compare file: every error a user can fix is raised here, before work.
    `memo`: what models already computed, to share with another comparison (default: a new one)."""
    spec, where = load_spec(path)
    root = Path(path).parent.resolve()
    memo = memo if memo is not None else Memo()
    s = spec.settings
    s.device, device_note = process_device(s.device, where("settings", "device"))  # each launched process its own
    out = Path(output) if output is not None else resolve(root, spec.output) if spec.output else root / "report"
    cache = ResultCache(resolve(root, spec.cache_dir) if spec.cache_dir else out / "cache")

    suites = _suites(spec, where, root, s.split, s.limit)
    selection_suites = []
    if any(c.selects for c in spec.candidates):
        sel = spec.selection
        if sel.split == s.split:
            raise MergeLabError(
                f"{where('selection', 'split')}: selection.split is '{sel.split}', the split the report evaluates on; "
                "what is chosen there would flatter the chosen candidate. Use another split (validation)."
            )
        # selection.limit, when given, is every suite's size there; else each suite's own, as on the test split
        selection_suites = _suites(spec, where, root, sel.split, sel.limit or s.limit, every=bool(sel.limit))
        # selection_scores reads only the out-of-distribution suites when there are any: the others are not run
        if any(x.ood for x in selection_suites):
            selection_suites = [x for x in selection_suites if x.ood]
    names = [x.name for x in suites]
    if not names:
        raise MergeLabError(f"{where('suites')}: no suites; list some under `suites:` (`merge-lab suites` shows them).")
    if len(set(names)) != len(names):
        raise MergeLabError(f"{where('suites')}: suite listed twice: {sorted({n for n in names if names.count(n) > 1})}.")
    for x in suites:
        x.items()
    names = [c.name for c in spec.candidates]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise MergeLabError(f"{where('candidates', names.index(twice, names.index(twice) + 1))}: two candidates are "
                            f"named '{twice}'.")
    factory = CandidateFactory(spec, where, root, cache.root, memo)
    by_name = factory.build_all()
    sources = [c.name for c in spec.candidates if c.source]
    if not by_name:
        raise MergeLabError(f"{where('candidates')}: no candidates.")
    if spec.headline is not None and spec.headline not in by_name:
        raise MergeLabError(f"{where('headline')}: headline '{spec.headline}' is not a candidate; name one of "
                            f"{', '.join(by_name)}.")
    references(spec, where)  # the verdict's base, sources and comparators, checked before any model runs

    training = [*((where("training_data", i), e) for i, e in enumerate(spec.training_data)),
                *((f"found beside a candidate ({f})", str(f)) for f in discovered_training(by_name)),
                *((where("candidates", names.index(n)), rows) for n, rows in trained_rows(by_name))]
    checked = check_disjoint(root, training, suites + selection_suites)

    judge = factory.scorer(spec.judge, ("judge",))
    reference = None
    if spec.reference:
        if spec.reference not in by_name:
            raise MergeLabError(f"{where('reference')}: reference '{spec.reference}' is not a candidate; name one of "
                                f"{', '.join(by_name)}.")
        reference = by_name[spec.reference]
    for i, x in enumerate(suites):
        if "judge" in x.needs and judge is None:
            raise MergeLabError(f"{where('suites', i)}: suite '{x.name}' needs `judge:` (a candidate name or "
                                "checkpoint folder).")
        if "reference" in x.needs and reference is None:
            raise MergeLabError(f"{where('suites', i)}: suite '{x.name}' needs `reference:` (a candidate name).")

    for i, (name, c) in enumerate(by_name.items()):
        try:
            c.check()
        except MergeLabError as e:
            raise MergeLabError(f"{where('candidates', i)}: candidate '{name}' does not load: {e}") from None
    if judge is not None:
        try:
            judge.check()
        except MergeLabError as e:
            raise MergeLabError(f"{where('judge')}: the judge does not load: {e}") from None
    choosers = {c.name: c.choose for c in spec.candidates if c.choose}
    for i, c in enumerate(spec.candidates):
        if c.choose_as is not None and c.choose_as not in choosers:
            raise MergeLabError(f"{where('candidates', i, 'choose_as')}: '{c.choose_as}' is not a candidate with "
                                f"`choose:`; name one of {', '.join(choosers) or '(none: give one `choose:`)'}.")
        keys, key = (c.choose, "choose") if c.choose else (choosers.get(c.choose_as), "choose_as")
        if keys:
            folder = by_name[c.name].path
            config = json.loads((folder / "config.json").read_text())
            unknown = [k for k in keys if k not in config]
            if unknown:
                raise MergeLabError(f"{where('candidates', i, key)}: candidate '{c.name}': {key}: {unknown} not in "
                                    f"{folder}/config.json.")
    ctx = EvalContext(judge=judge, reference=reference)
    return Comparison(spec, root, out, s, suites, by_name, sources, ctx, cache, memo, training_checked=checked,
                      selection_suites=selection_suites, notes=[device_note] if device_note else [])
