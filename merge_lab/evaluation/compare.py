"""`merge-lab compare compare.yaml`: every candidate on the same suites, then the report.

    output: runs/compare            # where report.md, report.html, results.json go
    settings: {limit: 100, split: test, seed: 0, max_new_tokens: 48, batch_size: 8}
    suites: [harmless_refusal, harmless_overrefusal, honest_truefalse, helpful_likelihood,
             capability_commonsenseqa, {name: mine, path: my.jsonl, kind: likelihood}]
    judge: base                     # candidate name or checkpoint folder (win rate, best-of-N)
    reference: base                 # candidate the win rate compares against
    training_data: [advbench:train, {path: my_train.jsonl}]   # proven disjoint from every suite
    candidates:
      - {name: base, checkpoint: ./base, source: true}
      - {name: ties, recipe: ties.yaml}                  # or the recipe inline: {merge_method: ties, ...}
      - {name: ens, ensemble: [base, ties], weights: [0.5, 0.5]}
      - {name: bon, best_of_n: [base, ties]}             # scorer: the judge, or reward_model: ./rm
      - {name: moe, checkpoint: ./moe, choose: {num_experts_per_tok: [1, 2]}}
    selection: {split: validation, limit: 24}   # where `choose:` values are tried (never the test split)

`choose:` tries config.json values of a checkpoint candidate on the selection split and keeps the
best on the mean of the objectives; the report says what was tried, what won, and on which items.

Relative paths count from the working directory (as in recipes), falling back to the compare
file's folder. Everything that can be wrong in the file (unknown suites, candidates that do not load, ensembles
whose tokenizers differ, overlap between training data and suites) is reported before any model
runs. Results are cached per (candidate, suite, settings) under `cache_dir` (default:
OUTPUT/cache), so adding a candidate evaluates only that one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from rich.console import Console

from merge_lab.core.progress import progress_bar
from merge_lab.core.writer import atomic_folder
from merge_lab.datasets import sources as data
from merge_lab.errors import MergeLabError
from merge_lab.evaluation import candidates as cands
from merge_lab.evaluation.cache import ResultCache
from merge_lab.evaluation.cost import PeakMemory, summarize
from merge_lab.evaluation.metrics import bootstrap_ci, oracle, paired_test
from merge_lab.evaluation.suites import EvalContext, Suite, make_suite


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint: str | None = None
    recipe: str | dict[str, Any] | None = None
    ensemble: list[str] | None = None
    weights: list[float] | None = None
    best_of_n: list[str] | None = None
    reward_model: str | None = None
    source: bool = False
    group: str | None = None  # e.g. merge, ensemble: the headline is compared with each group's best
    choose: dict[str, list[Any]] | None = None  # config.json values tried on the selection split

    @model_validator(mode="after")
    def _one_kind(self) -> CandidateSpec:
        kinds = [k for k in ("checkpoint", "recipe", "ensemble", "best_of_n") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"candidate '{self.name}': give exactly one of checkpoint, recipe, ensemble, best_of_n")
        if self.choose is not None and (self.checkpoint is None or not self.choose or not all(self.choose.values())):
            raise ValueError(f"candidate '{self.name}': `choose:` needs a checkpoint candidate and a non-empty "
                             "list of values per config key, e.g. {num_experts_per_tok: [1, 2]}")
        return self


class Selection(BaseModel):
    """Where `choose:` values are compared: a split other than the evaluation split."""

    model_config = ConfigDict(extra="forbid")
    split: str = "validation"
    limit: int | None = None  # items per suite (default: settings.limit)


class CompareSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str | None = None
    cache_dir: str | None = None
    settings: cands.Settings = cands.Settings()
    suites: list[str | dict[str, Any]]
    candidates: list[CandidateSpec]
    judge: str | dict[str, str] | None = None
    reference: str | None = None
    training_data: list[str | dict[str, Any]] = []
    headline: str | None = None  # the candidate whose verdict leads the report (e.g. the fused model)
    notes: list[str] = []  # plain statements printed first in the report (what the candidates are)
    selection: Selection = Selection()


def load_spec(path: str | Path) -> tuple[CompareSpec, Path]:
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"{path}: compare file not found.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MergeLabError(f"{path}: not valid YAML ({e}).") from None
    try:
        return CompareSpec.model_validate(raw), path.parent.resolve()
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
        raise MergeLabError(f"{path}: {msgs}.") from None


@dataclass
class Comparison:
    """A ready-to-run comparison: everything resolved and checked."""

    spec: CompareSpec
    root: Path
    output: Path
    settings: cands.Settings
    suites: list[Suite]
    candidates: dict[str, cands.Candidate]
    sources: list[str]
    ctx: EvalContext
    cache: ResultCache
    training_checked: list[str] = field(default_factory=list)
    evaluated: list[tuple[str, str]] = field(default_factory=list)
    selection_suites: list[Suite] = field(default_factory=list)  # the same suites on the selection split


def _resolve(root: Path, p: str) -> Path:
    """Relative paths count from the working directory, as in recipes; one that does not exist
    there but does beside the compare file is taken from there."""
    q = Path(p).expanduser()
    if q.is_absolute() or q.exists() or not (root / q).exists():
        return q
    return root / q


def _checkpoint(root: Path, ref: str) -> Path:
    """A checkpoint folder; 'smollm2' names the shipped SmolLM2-135M-Instruct (converted once)."""
    p = _resolve(root, ref)
    if not p.exists():
        from merge_lab.core import bases as assets

        if ref.lower() in assets.SMOLLM2_ALIASES:
            return assets.smollm2_base()
    return p


def _training_items(root: Path, entry: str | dict) -> list[data.Example | str]:
    """Training items from 'source[:split]', {source, split, limit}, {path: JSONL}, or a
    train_items.json written by `merge-lab align` (or the folder that holds one)."""
    if isinstance(entry, str):
        p = _resolve(root, entry)
        if p.is_dir() or p.suffix == ".json":
            return trained_ids(p)
        if p.suffix == ".jsonl":
            return data.load_jsonl(p)
        source, _, split = entry.partition(":")
        return data.select(source, split or "train")
    if "path" in entry:
        p = _resolve(root, entry["path"])
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


def _discovered_training(candidates: dict[str, cands.Candidate]) -> list[Path]:
    """train_items.json files beside checkpoint candidates (an align output's merged/ folder)."""
    found = []
    for c in candidates.values():
        if isinstance(c, cands.ModelCandidate) and not isinstance(c, cands.RecipeCandidate):
            for folder in (c.path, c.path.parent):
                f = folder / "train_items.json"
                if f.is_file() and f not in found:
                    found.append(f)
    return found


def prepare(path: str | Path, output: str | Path | None = None) -> Comparison:
    """Parse and check a compare file: every error a user can fix is raised here, before work."""
    spec, root = load_spec(path)
    s = spec.settings
    settings = s
    if s.dtype not in ("float32", "bfloat16", "float16"):
        raise MergeLabError(f"settings.dtype '{s.dtype}': use float32, bfloat16 or float16.")
    out = Path(output) if output is not None else _resolve(root, spec.output) if spec.output else root / "report"
    cache = ResultCache(_resolve(root, spec.cache_dir) if spec.cache_dir else out / "cache")

    entries = [dict(x, path=str(_resolve(root, x["path"]))) if isinstance(x, dict) and "path" in x else x
               for x in spec.suites]
    suites = [make_suite(x, split=s.split, limit=s.limit, seed=s.seed) for x in entries]
    selection_suites = []
    if any(c.choose for c in spec.candidates):
        sel = spec.selection
        if sel.split == s.split:
            raise MergeLabError(
                f"{path}: selection.split is '{sel.split}', the split the report evaluates on; values chosen there "
                "would flatter the chosen candidate. Use another split (validation)."
            )
        selection_suites = [make_suite(x, split=sel.split, limit=sel.limit or s.limit, seed=s.seed) for x in entries]
    names = [x.name for x in suites]
    if not names:
        raise MergeLabError(f"{path}: no suites; list some under `suites:` (`merge-lab suites` shows them).")
    if len(set(names)) != len(names):
        raise MergeLabError(f"suite listed twice: {sorted({n for n in names if names.count(n) > 1})}.")
    for x in suites:
        x.items()
    names = [c.name for c in spec.candidates]
    if len(set(names)) != len(names):
        raise MergeLabError(f"two candidates are named '{next(n for n in names if names.count(n) > 1)}'.")
    built: dict[str, cands.Candidate] = {}
    for c in sorted(spec.candidates, key=lambda c: c.best_of_n is not None):  # best-of-N may name any judge
        built[c.name] = _build(c, built, root, cache, settings, spec)
    by_name = {n: built[n] for n in names}
    sources = [c.name for c in spec.candidates if c.source]
    if not by_name:
        raise MergeLabError(f"{path}: no candidates.")
    if spec.headline is not None and spec.headline not in by_name:
        raise MergeLabError(f"headline '{spec.headline}' is not a candidate; name one of {', '.join(by_name)}.")

    checked = []
    for entry in [*spec.training_data, *map(str, _discovered_training(by_name))]:
        train = _training_items(root, entry)
        for x in suites + selection_suites:
            try:
                data.check_disjoint(train, x.items())
            except MergeLabError as e:
                raise MergeLabError(f"training data {entry} overlaps suite '{x.name}': {e}") from None
        checked.append(str(entry))

    judge = _scorer(spec.judge, by_name, root, settings)
    reference = None
    if spec.reference:
        if spec.reference not in by_name:
            raise MergeLabError(f"reference '{spec.reference}' is not a candidate; name one of {', '.join(by_name)}.")
        reference = by_name[spec.reference]
    for x in suites:
        if "judge" in x.needs and judge is None:
            raise MergeLabError(f"suite '{x.name}' needs `judge:` (a candidate name or checkpoint folder).")
        if "reference" in x.needs and reference is None:
            raise MergeLabError(f"suite '{x.name}' needs `reference:` (a candidate name).")

    for name, c in by_name.items():
        try:
            c.check()
        except MergeLabError as e:
            raise MergeLabError(f"candidate '{name}' does not load: {e}") from None
    if judge is not None:
        try:
            judge.check()
        except MergeLabError as e:
            raise MergeLabError(f"the judge does not load: {e}") from None
    for c in spec.candidates:
        if c.choose:
            config = json.loads((by_name[c.name].path / "config.json").read_text())
            unknown = [k for k in c.choose if k not in config]
            if unknown:
                raise MergeLabError(f"candidate '{c.name}': choose: {unknown} not in {by_name[c.name].path}/config.json.")
    ctx = EvalContext(judge=judge, reference=reference)
    return Comparison(spec, root, out, settings, suites, by_name, sources, ctx, cache, training_checked=checked,
                      selection_suites=selection_suites)


_JUDGES: dict[tuple[str, str], cands.Scorer] = {}


def _scorer(ref: str | dict | None, known: dict, root: Path, settings: cands.Settings) -> cands.Scorer | None:
    """The judge: a candidate's or a checkpoint's log-likelihood, or {reward_model: FOLDER}.
    One per checkpoint, shared by the win rate and every best-of-N candidate."""
    if ref is None:
        return None
    if isinstance(ref, str) and ref in known:
        return cands.JudgeScorer(known[ref])
    if isinstance(ref, dict):
        if set(ref) != {"reward_model"}:
            raise MergeLabError(f"judge {ref}: give a candidate name, a checkpoint folder or {{reward_model: FOLDER}}.")
        path, make = _checkpoint(root, ref["reward_model"]), "reward"
    else:
        path, make = _checkpoint(root, ref), "judge"
    key = (f"{make}:{path}", repr(settings))
    if key not in _JUDGES:
        if len(_JUDGES) > 4:  # keep only recent judges loaded
            _JUDGES.clear()
        _JUDGES[key] = (cands.RewardScorer(path, settings) if make == "reward"
                        else cands.JudgeScorer(cands.ModelCandidate("judge", path, settings)))
    return _JUDGES[key]


def _build(c: CandidateSpec, known: dict, root: Path, cache: ResultCache, settings, spec: CompareSpec) -> cands.Candidate:
    def member(ref: str) -> cands.ModelCandidate:
        m = known.get(ref)
        if isinstance(m, cands.ModelCandidate):
            return m
        if m is not None:
            raise MergeLabError(f"candidate '{c.name}': member '{ref}' is itself an ensemble; list checkpoints or recipes.")
        p = _checkpoint(root, ref)
        if not p.exists():
            raise MergeLabError(f"candidate '{c.name}': member '{ref}' is neither a candidate name nor a folder.")
        return cands.ModelCandidate(ref, p, settings)

    if c.checkpoint is not None:
        return cands.ModelCandidate(c.name, _checkpoint(root, c.checkpoint), settings)
    if isinstance(c.recipe, dict):  # an inline recipe: written into the cache, keyed by its content
        text = yaml.safe_dump(c.recipe, sort_keys=False)
        recipe = cache.root / "recipes" / f"{c.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(text)
        return cands.RecipeCandidate(c.name, recipe, cache.root, settings)
    if c.recipe is not None:
        recipe = _resolve(root, c.recipe)
        if not recipe.is_file():
            raise MergeLabError(f"candidate '{c.name}': recipe {recipe} not found.")
        return cands.RecipeCandidate(c.name, recipe, cache.root, settings)
    if c.ensemble is not None:
        return cands.TokenEnsemble(c.name, [member(r) for r in c.ensemble], c.weights, settings)
    scorer = _scorer({"reward_model": c.reward_model} if c.reward_model else spec.judge, known, root, settings)
    if scorer is None:
        raise MergeLabError(f"candidate '{c.name}': best-of-N needs a scorer: `judge:` in the file or `reward_model:`.")
    return cands.BestOfN(c.name, [member(r) for r in c.best_of_n], scorer, settings)


# ------------------------------------------------------------------ running


def evaluate(comp: Comparison, progress: bool = True, console: Console | None = None,
             routing: bool = True) -> dict[str, dict[str, dict]]:
    """Fill (candidate, suite) -> cache entry, evaluating only what the cache lacks (`routing`:
    also record an MoE's expert use, which the report plots; selection does without)."""
    console = console or Console(stderr=True)
    settings_key = comp.settings.key()
    entries: dict[str, dict[str, dict]] = {}
    _reference_from_cache(comp, settings_key)
    with progress_bar(console, progress, eta=False) as bar:
        for name, cand in comp.candidates.items():
            entries[name] = {}
            todo = []
            for suite in comp.suites:
                key = comp.cache.key(cand.fingerprint(), suite.fingerprint(comp.ctx), settings_key)
                hit = comp.cache.get(key)
                if hit is not None:
                    entries[name][suite.name] = hit
                    bar.add_task(f"{name} · {suite.name} (cached)", total=1, completed=1)
                else:
                    todo.append((suite, key, bar.add_task(f"{name} · {suite.name}", total=None, start=False)))
            if not todo:
                continue
            with PeakMemory(comp.settings.device) as mem:
                cand.load()
                params = cand.params()
                fresh = []
                for suite, key, task in todo:
                    bar.start_task(task)
                    cand.on_progress = lambda done, total, task=task: bar.update(task, completed=done, total=total)
                    torch.manual_seed(comp.settings.seed)
                    before = cand.counters.as_dict()
                    t0 = time.perf_counter()
                    records = suite.evaluate(cand, comp.ctx)
                    after = cand.counters.as_dict()
                    entry = {
                        "candidate": name, "suite": suite.name, "records": records,
                        "seconds": time.perf_counter() - t0, "params": list(params),
                        "counters": {k: after[k] - before[k] for k in after},
                        "routing": cand.routing(suite.routing_texts(cand)) if routing and _is_moe(cand) else None,
                        "peak_memory_bytes": mem.peak_bytes,
                    }
                    comp.cache.put(key, entry)  # at once: an interrupted run resumes from here
                    fresh.append((key, entry))
                    comp.evaluated.append((name, suite.name))
                    bar.update(task, completed=len(records), total=len(records))
                cand.on_progress = None
            for key, entry in fresh:  # the peak over the whole candidate run, for every entry
                entry["peak_memory_bytes"] = mem.peak_bytes
                comp.cache.put(key, entry)
                entries[name][entry["suite"]] = entry
            if comp.ctx.reference is not cand and not _is_judge(comp, cand):
                cand.unload()
    _reference_to_cache(comp, settings_key)
    return entries


def _is_moe(c: cands.Candidate) -> bool:
    return len(c._lms) == 1 and c._lms[0].is_moe


def _is_judge(comp: Comparison, c: cands.Candidate) -> bool:
    return comp.ctx.judge is not None and getattr(comp.ctx.judge, "judge", None) is c


def _reference_key(comp: Comparison, settings_key: dict) -> str | None:
    if comp.ctx.reference is None:
        return None
    return comp.cache.key(comp.ctx.reference.fingerprint(), "reference-answers", settings_key)


def _reference_from_cache(comp: Comparison, settings_key: dict) -> None:
    key = _reference_key(comp, settings_key)
    hit = comp.cache.get(key) if key else None
    if hit:
        comp.ctx._reference_answers.update(hit["answers"])


def _reference_to_cache(comp: Comparison, settings_key: dict) -> None:
    key = _reference_key(comp, settings_key)
    if key and comp.ctx._reference_answers:
        comp.cache.put(key, {"answers": comp.ctx._reference_answers})


# ------------------------------------------------------------------ choosing values on the selection split


def variant_folder(src: Path, overrides: dict[str, Any], root: Path) -> Path:
    """A checkpoint folder that differs from `src` only in config.json: links to every other file."""
    config = json.loads((src / "config.json").read_text())
    config.update(overrides)
    text = json.dumps(config, indent=2, sort_keys=True)
    folder = root / "variants" / f"{src.name}-{hashlib.sha256((str(src.resolve()) + text).encode()).hexdigest()[:12]}"
    if not (folder / "config.json").exists():
        with atomic_folder(folder) as tmp:
            for f in src.iterdir():
                if f.is_file() and f.name != "config.json":
                    (tmp / f.name).symlink_to(f.resolve())
            (tmp / "config.json").write_text(text)
    return folder


def select(comp: Comparison, progress: bool = True, console: Console | None = None) -> dict[str, dict]:
    """For each candidate with `choose:`, evaluate every combination of its values on the selection
    split's suites, keep the best on the mean of the objectives (as the headline ranks), and point the
    candidate (and the ensembles that share it) at that variant. Returns what was tried, for the report."""
    import itertools

    chosen: dict[str, dict] = {}
    for spec in comp.spec.candidates:
        if not spec.choose:
            continue
        cand = comp.candidates[spec.name]
        keys = list(spec.choose)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.choose[k] for k in keys))]
        variants = {
            f"{spec.name} ({', '.join(f'{k}={v}' for k, v in combo.items())})":
                cands.ModelCandidate(spec.name, variant_folder(cand.path, combo, comp.cache.root), comp.settings)
            for combo in combos
        }
        sub = Comparison(comp.spec, comp.root, comp.output, comp.settings, comp.selection_suites, variants, [],
                         comp.ctx, comp.cache)
        objectives = aggregate(sub, evaluate(sub, progress, console, routing=False), full=False)["objectives"]
        picked = [o for o in H3_OBJECTIVES if o in objectives] or list(objectives)
        means = {n: sum(objectives[o][n] for o in picked) / len(picked) for n in variants}
        best = max(variants, key=lambda n: means[n])  # first listed wins a tie
        cand.path, cand._tok, cand._lms = variants[best].path, None, []
        chosen[spec.name] = {
            "split": comp.spec.selection.split,
            "n": {x.name: len(x.items()) for x in comp.selection_suites},
            "ids": {x.name: [e.id for e in x.items()] for x in comp.selection_suites},
            "objectives": picked,
            "tried": [{"values": combo, "mean": means[n]} for combo, n in zip(combos, variants)],
            "chosen": combos[list(variants).index(best)],
        }
    return chosen


# ------------------------------------------------------------------ aggregation


def _norm(values: dict[str, float], higher: bool) -> dict[str, float]:
    lo, hi = min(values.values()), max(values.values())
    if hi - lo < 1e-12:
        return dict.fromkeys(values, 1.0)
    return {k: ((v - lo) / (hi - lo) if higher else (hi - v) / (hi - lo)) for k, v in values.items()}


H3_OBJECTIVES = ("helpful", "harmless", "honest")


def headline(spec: CompareSpec, objectives: dict[str, dict[str, float]]) -> dict:
    """The headline candidate's mean over the objectives (the three H3 ones when present) against
    the best source model and the best of each candidate group."""
    chosen = [o for o in H3_OBJECTIVES if o in objectives] or list(objectives)
    mean = {n: sum(objectives[o][n] for o in chosen) / len(chosen) for n in objectives[chosen[0]]}
    rivals: dict[str, list[str]] = {}
    for c in spec.candidates:
        if c.name == spec.headline:
            continue
        if c.source:
            rivals.setdefault("best source model", []).append(c.name)
        if c.group:
            rivals.setdefault(f"best {c.group}", []).append(c.name)
    against = []
    for what, names in rivals.items():
        best = max(names, key=lambda n: mean[n])
        against.append({"what": what, "candidate": best, "mean": mean[best], "beats": mean[spec.headline] > mean[best]})
    return {"candidate": spec.headline, "objectives": chosen, "mean": mean[spec.headline], "against": against}


def aggregate(comp: Comparison, entries: dict[str, dict[str, dict]], full: bool = True) -> dict:
    """results.json: settings, suites, candidates with cost, estimates, paired tests, oracle, best
    (`full=False`: estimates and objectives only, as selection needs)."""
    n_boot, seed = comp.settings.bootstrap, comp.settings.seed
    names = list(comp.candidates)
    out: dict[str, Any] = {
        "settings": comp.settings.model_dump(), "sources": comp.sources,
        "refusal_classifier": "keyword/prefix match on the first 200 characters of greedy answers",
        "training_checked": comp.training_checked,
        "suites": {}, "candidates": {}, "results": {}, "paired": {}, "oracle": {}, "best": {},
        "objectives": {}, "per_example": {},
    }
    for suite in comp.suites:
        info = suite.info()
        ids = [r["id"] for r in entries[names[0]][suite.name]["records"]]
        info.update(split=suite.split, n=len(ids))
        out["suites"][suite.name] = info
        per: dict[str, list[float]] = {}
        for n in names:
            recs = {r["id"]: r for r in entries[n][suite.name]["records"]}
            per[n] = [float(recs[i]["score"]) for i in ids]
            out["per_example"].setdefault(suite.name, {})[n] = [recs[i] for i in ids]
        higher = suite.higher_is_better
        est = {n: bootstrap_ci(per[n], n_boot, seed) for n in names}
        out["results"][suite.name] = {n: e.as_dict() for n, e in est.items()}
        out["oracle"][suite.name] = bootstrap_ci(oracle(per, higher), n_boot, seed).as_dict()
        if not full:
            continue
        ranked = sorted(names, key=lambda n: est[n].value, reverse=higher)
        best = {"candidate": ranked[0]}
        if len(ranked) > 1:
            t = paired_test(per[ranked[0]], per[ranked[1]], n_boot, seed)
            best.update(runner_up=ranked[1], **t.as_dict(), significant=t.p < 0.05)
        out["best"][suite.name] = best
        if comp.sources:
            src = sorted(comp.sources, key=lambda n: est[n].value, reverse=higher)[0]
            out["paired"][suite.name] = {
                "reference": src,
                **{n: paired_test(per[n], per[src], n_boot, seed).as_dict() for n in names if n != src},
            }
    norm = {s: _norm({n: out["results"][s][n]["value"] for n in names}, out["suites"][s]["higher_is_better"])
            for s in out["suites"]}
    for obj in dict.fromkeys(out["suites"][s]["objective"] for s in out["suites"]):
        members = [s for s in out["suites"] if out["suites"][s]["objective"] == obj]
        out["objectives"][obj] = {n: sum(norm[s][n] for s in members) / len(members) for n in names}
    if not full:
        return out
    out["notes"] = list(comp.spec.notes)
    if comp.spec.headline:
        out["headline"] = headline(comp.spec, out["objectives"])
    for n, c in comp.candidates.items():
        es = list(entries[n].values())
        counters = {k: sum(e["counters"][k] for e in es) for k in es[0]["counters"]}
        desc = cands.describe(c)
        desc.update(
            source=n in comp.sources,
            cost=summarize(tuple(es[0]["params"]), counters, max(e.get("peak_memory_bytes", 0) for e in es)),
            quality=sum(norm[s][n] for s in norm) / len(norm),
            routing={e["suite"]: e["routing"] for e in es if e.get("routing")},
            cached=all((n, s.name) not in comp.evaluated for s in comp.suites),
        )
        out["candidates"][n] = desc
    return out


@dataclass
class CompareResult:
    output: Path
    results: dict
    evaluated: list[tuple[str, str]]
    files: list[Path]


def run_compare(path: str | Path, output: str | Path | None = None, progress: bool = True,
                console: Console | None = None) -> CompareResult:
    """Check, evaluate (cache first), aggregate and write report.md, report.html, results.json."""
    from merge_lab.report import write_report

    comp = prepare(path, output)
    chosen = select(comp, progress=progress, console=console)
    entries = evaluate(comp, progress=progress, console=console)
    results = aggregate(comp, entries)
    results["selection"] = chosen
    files = write_report(results, comp.output)
    return CompareResult(comp.output, results, comp.evaluated, files)
