"""Candidates and scorers from a compare file's entries, all sharing the comparison's memo.

One scorer per judge checkpoint within a comparison: the win rate and every best-of-N candidate
that names the same judge share its loaded model and what it computed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from merge_lab.core.config import Where
from merge_lab.errors import MergeLabError
from merge_lab.evaluation import candidates as cands
from merge_lab.evaluation import trained
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.paths import checkpoint_folder, resolve
from merge_lab.evaluation.scorers import JudgeScorer, RewardScorer, Scorer
from merge_lab.evaluation.spec import CandidateSpec, CompareSpec


class CandidateFactory:
    """Builds the candidates of one comparison in file order of dependence (members first)."""

    def __init__(self, spec: CompareSpec, where: Where, root: Path, cache_root: Path, memo: Memo):
        self.spec, self.where, self.root, self.cache_root, self.memo = spec, where, root, cache_root, memo
        self.settings = spec.settings
        self.built: dict[str, cands.Candidate] = {}
        self.scorers: dict[str, Scorer] = {}

    def build_all(self) -> dict[str, cands.Candidate]:
        """Every candidate by name, in the file's order (best-of-N and merge_then_train last: they name others)."""
        entries = list(enumerate(self.spec.candidates))
        for i, c in sorted(entries, key=lambda e: e[1].best_of_n is not None or e[1].merge_then_train is not None):
            self.built[c.name] = self.build(c, i)
        return {c.name: self.built[c.name] for c in self.spec.candidates}

    def scorer(self, ref: str | dict | None, at: tuple) -> Scorer | None:
        """The judge: a candidate's or a checkpoint's log-likelihood, or {reward_model: FOLDER}."""
        if ref is None:
            return None
        if isinstance(ref, str) and ref in self.built:
            return JudgeScorer(self.built[ref])
        if isinstance(ref, dict):
            if set(ref) != {"reward_model"}:
                raise MergeLabError(f"{self.where(*at)}: judge {ref}: give a candidate name, a checkpoint folder "
                                    "or {reward_model: FOLDER}.")
            path, make = checkpoint_folder(self.root, ref["reward_model"]), "reward"
        else:
            path, make = checkpoint_folder(self.root, ref), "judge"
        key = f"{make}:{path}"
        if key not in self.scorers:
            self.scorers[key] = (RewardScorer(path, self.settings) if make == "reward"
                                 else JudgeScorer(cands.ModelCandidate("judge", path, self.settings, self.memo)))
        return self.scorers[key]

    def member(self, c: CandidateSpec, ref: str) -> cands.ModelCandidate:
        """A member of an ensemble or best-of-N: a checkpoint or recipe candidate, or a folder."""
        m = self.built.get(ref)
        if isinstance(m, cands.ModelCandidate):
            return m
        if m is not None:
            raise MergeLabError(f"candidate '{c.name}': member '{ref}' is itself an ensemble; list checkpoints or recipes.")
        p = checkpoint_folder(self.root, ref)
        if not p.exists():
            raise MergeLabError(f"candidate '{c.name}': member '{ref}' is neither a candidate name nor a folder.")
        return cands.ModelCandidate(ref, p, self.settings, self.memo)

    def build(self, c: CandidateSpec, index: int) -> cands.Candidate:
        at = ("candidates", index)
        settings, memo = self.settings, self.memo
        if c.checkpoint is not None:
            return cands.ModelCandidate(c.name, checkpoint_folder(self.root, c.checkpoint), settings, memo)
        if isinstance(c.recipe, dict):  # an inline recipe: written into the cache, keyed by its content
            text = yaml.safe_dump(c.recipe, sort_keys=False)
            recipe = self.cache_root / "recipes" / f"{c.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(text)
            return cands.RecipeCandidate(c.name, recipe, self.cache_root, settings, memo)
        if c.recipe is not None:
            recipe = resolve(self.root, c.recipe)
            if not recipe.is_file():
                raise MergeLabError(f"{self.where(*at, 'recipe')}: candidate '{c.name}': recipe {recipe} not found.")
            return cands.RecipeCandidate(c.name, recipe, self.cache_root, settings, memo)
        if c.multitask is not None:
            fuse = resolve(self.root, c.multitask.fuse) if c.multitask.fuse else None
            return trained.MultitaskCandidate(c.name, [resolve(self.root, p) for p in c.multitask.align], fuse,
                                              self.cache_root, settings, memo)
        if c.merge_then_train is not None:
            return trained.MergeThenTrainCandidate(c.name, [self.member(c, r) for r in c.merge_then_train.merges],
                                                   resolve(self.root, c.merge_then_train.fuse), self.cache_root,
                                                   settings, memo)
        if c.ensemble is not None:
            return cands.TokenEnsemble(c.name, [self.member(c, r) for r in c.ensemble], c.weights, settings, memo)
        if c.reward_model:
            scorer = self.scorer({"reward_model": c.reward_model}, (*at, "reward_model"))
        else:
            scorer = self.scorer(self.spec.judge, ("judge",))
        if scorer is None:
            raise MergeLabError(f"{self.where(*at)}: candidate '{c.name}': best-of-N needs a scorer: `judge:` in the "
                                "file or `reward_model:`.")
        return cands.BestOfN(c.name, [self.member(c, r) for r in c.best_of_n], scorer, settings, memo)
