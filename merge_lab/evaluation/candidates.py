"""Everything a comparison evaluates, behind one interface: log-likelihood and greedy generation.

- `ModelCandidate`: any checkpoint folder (a source model, a merge, a fused MoE);
- `RecipeCandidate`: a recipe, merged on the fly into a cache folder keyed by its inputs;
- `TokenEnsemble`: weighted average of the members' next-token probabilities, for scoring and
  for generation (one KV cache per member);
- `BestOfN`: every member generates, a pluggable `Scorer` picks the best answer.

Suites only call `loglikelihood`, `generate` and `format_prompt`; they never learn which kind
of candidate they hold. Every candidate counts the tokens and seconds it spends, for the cost table.
The interface itself is in interface.py. What a candidate's models computed goes to its `Memo`
(memo.py): give candidates one memo to share work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from merge_lab.core.writer import atomic_folder
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.fingerprint import combine, fingerprint_folder
from merge_lab.evaluation.interface import Candidate, LogProbs
from merge_lab.evaluation.memo import Memo, Scored
from merge_lab.evaluation.runtime import Pair, same_tokenizer
from merge_lab.evaluation.scorers import Scorer
from merge_lab.evaluation.spec import Settings

__all__ = ["BestOfN", "Candidate", "LogProbs", "ModelCandidate", "RecipeCandidate", "TokenEnsemble",
           "check_shared_tokenizer", "describe", "variant_folder"]


class ModelCandidate(Candidate):
    """A checkpoint folder: a source model, a merge, or a fused MoE."""

    kind = "checkpoint"
    # whether every process of a launched comparison makes the folder together (a trained
    # baseline: align is data-parallel) rather than the main one alone, first (a merged recipe)
    made_by_all_processes = False

    def __init__(self, name: str, path: str | Path, settings: Settings, memo: Memo | None = None):
        super().__init__(name, settings, memo)
        self.path = Path(path)

    def check(self) -> None:
        from merge_lab.core.checkpoint import Checkpoint

        ckpt = Checkpoint(self.path)
        _ = ckpt.config, ckpt.tensors
        try:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(self.path))
        except Exception as e:
            raise MergeLabError(f"candidate '{self.name}': {self.path}/config.json does not load ({e}).") from None
        try:
            AutoModelForCausalLM._model_mapping[type(config)]
        except KeyError:
            raise MergeLabError(
                f"candidate '{self.name}': {self.path} is a '{config.model_type}' model, which transformers cannot "
                "load as a causal language model."
            ) from None
        _ = self.tokenizer

    def fingerprint(self) -> str:
        return fingerprint_folder(self.path)

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path)}

    def tokenizer_path(self) -> Path:
        return self.path

    def model_paths(self) -> list[Path]:
        return [self.path]

    def variant(self, overrides: dict[str, Any], root: Path) -> ModelCandidate:
        """The same candidate with config.json values replaced (e.g. num_experts_per_tok): a new
        candidate over a folder under `root/variants` that links every other file of this one."""
        return ModelCandidate(self.name, variant_folder(self.path, overrides, root), self.settings, self.memo)


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


class RecipeCandidate(ModelCandidate):
    """A recipe, merged on first use into `cache/merges/<hash of recipe and inputs>`."""

    kind = "recipe"

    def __init__(self, name: str, recipe: str | Path, cache_dir: Path, settings: Settings, memo: Memo | None = None):
        self.recipe_path = Path(recipe)
        self.cache_dir = cache_dir
        self._fp: str | None = None
        super().__init__(name, cache_dir, settings, memo)

    def check(self) -> None:
        from merge_lab.merge.planner import make_plan
        from merge_lab.merge.recipe import load_recipe

        plan = make_plan(load_recipe(self.recipe_path))
        inputs = sorted({str(Path(getattr(x, "path", x))) for x in plan.inputs})
        h = hashlib.sha256(self.recipe_path.read_bytes())
        for p in inputs:
            h.update(fingerprint_folder(Path(p)).encode())
        self._fp = h.hexdigest()[:16]
        self.path = self.cache_dir / "merges" / f"{self.recipe_path.stem}-{self._fp}"
        self._token_source = Path(inputs[0]) if not (self.path / "config.json").exists() else self.path

    def fingerprint(self) -> str:
        if self._fp is None:
            self.check()
        return self._fp

    def describe(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint(), "recipe": str(self.recipe_path)}

    def tokenizer_path(self) -> Path:
        if self._fp is None:
            self.check()
        return self.path if (self.path / "tokenizer_config.json").exists() else self._token_source

    def model_paths(self) -> list[Path]:
        self.fingerprint()
        if not (self.path / "config.json").exists():
            from merge_lab.merge.engine import merge

            merge(self.recipe_path, self.path, progress=False, hash_inputs=False)
        return [self.path]


def check_shared_tokenizer(name: str, members: list[Candidate]) -> None:
    first = members[0].tokenizer
    for m in members[1:]:
        if not same_tokenizer(first, m.tokenizer):
            raise MergeLabError(
                f"ensemble '{name}': members '{members[0].name}' and '{m.name}' have different tokenizers "
                f"({len(first.get_vocab())} vs {len(m.tokenizer.get_vocab())} tokens, or different ids). "
                "Output-level ensembles need one shared vocabulary; use fine-tunes of the same base."
            )


class TokenEnsemble(Candidate):
    """Weighted average of the members' next-token probabilities (members share one tokenizer).
    Its memo is its first member's unless one is given."""

    kind = "token_ensemble"
    mixes = True

    def __init__(self, name: str, members: list[ModelCandidate], weights: list[float] | None, settings: Settings,
                 memo: Memo | None = None):
        if not members:
            raise MergeLabError(f"ensemble '{name}' has no members.")
        super().__init__(name, settings, memo if memo is not None else members[0].memo)
        given = weights or [1.0] * len(members)
        if len(given) != len(members) or any(w <= 0 for w in given):
            raise MergeLabError(f"ensemble '{name}': give one positive weight per member ({len(members)}).")
        self.given_weights = weights
        self.members = members
        self.weights = [w / sum(given) for w in given]
        self.log_weights = torch.log(torch.tensor(self.weights, dtype=torch.float32))

    def check(self) -> None:
        for m in self.members:
            m.check()
        check_shared_tokenizer(self.name, self.members)

    def fingerprint(self) -> str:
        return combine("token_ensemble", (f"{m.fingerprint()}:{w:.6f}" for m, w in zip(self.members, self.weights)))

    def describe(self) -> dict:
        return {**super().describe(), "members": [m.name for m in self.members], "weights": self.weights}

    def replacing(self, old: Candidate, new: Candidate) -> Candidate:
        if self is old:
            return new
        members = [m.replacing(old, new) for m in self.members]
        if all(a is b for a, b in zip(members, self.members)):
            return self
        return TokenEnsemble(self.name, members, self.given_weights, self.settings, self.memo)

    def tokenizer_path(self) -> Path:
        return self.members[0].tokenizer_path()

    def model_paths(self) -> list[Path]:
        return [p for m in self.members for p in m.model_paths()]


class BestOfN(Candidate):
    """Each member generates; the scorer keeps the best answer. For likelihood suites it scores a
    continuation by the sequence-level mixture log(mean_i p_i(continuation)) of its members.
    Its memo is its first member's unless one is given: members that share it are not run again."""

    kind = "best_of_n"

    def __init__(self, name: str, members: list[ModelCandidate], scorer: Scorer, settings: Settings,
                 memo: Memo | None = None):
        if len(members) < 2:
            raise MergeLabError(f"best-of-N '{name}' needs at least two members.")
        super().__init__(name, settings, memo if memo is not None else members[0].memo)
        self.members = members
        self.scorer = scorer

    def check(self) -> None:
        for m in self.members:
            m.check()
        check_shared_tokenizer(self.name, self.members)
        self.scorer.check()

    def fingerprint(self) -> str:
        return combine("best_of_n", [*(m.fingerprint() for m in self.members), self.scorer.fingerprint()])

    def describe(self) -> dict:
        return {**super().describe(), "members": [m.name for m in self.members], "scorer": self.scorer.name}

    def replacing(self, old: Candidate, new: Candidate) -> Candidate:
        if self is old:
            return new
        members = [m.replacing(old, new) for m in self.members]
        scorer = self.scorer.replacing(old, new)
        if scorer is self.scorer and all(a is b for a, b in zip(members, self.members)):
            return self
        return BestOfN(self.name, members, scorer, self.settings, self.memo)

    def tokenizer_path(self) -> Path:
        return self.members[0].tokenizer_path()

    def model_paths(self) -> list[Path]:
        return [p for m in self.members for p in m.model_paths()]

    def _score_batch(self, batch: list[Pair], pad: int) -> list[Scored]:
        per_member = [lm.score(batch, pad) for lm in self.models]
        out = []
        for j, (_, cont) in enumerate(batch):
            seq = torch.tensor([m[j][0] for m in per_member], dtype=torch.float64)
            mixed = float(torch.logsumexp(seq, 0) - torch.log(torch.tensor(float(len(seq)))))
            out.append((mixed, len(cont), any(m[j][2] for m in per_member)))
        return out

    def _generate_batch(self, enc: list[list[int]], prompts: list[str]) -> list[str]:
        answers = [self._greedy([lm], torch.zeros(1), enc) for lm in self.models]
        scores = [self.scorer.score(prompts, a) for a in answers]
        return [answers[max(range(len(answers)), key=lambda m: scores[m][i])][i] for i in range(len(enc))]


def describe(c: Candidate) -> dict:
    """A JSON-able description for results.json."""
    return json.loads(json.dumps(c.describe()))
