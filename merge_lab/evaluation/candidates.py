"""Everything a comparison evaluates, behind one interface: log-likelihood and greedy generation.

- `ModelCandidate`: any checkpoint folder (a source model, a merge, a fused MoE);
- `RecipeCandidate`: a recipe, merged on the fly into a cache folder keyed by its inputs;
- `TokenEnsemble`: weighted average of the members' next-token probabilities, for scoring and
  for generation (one KV cache per member);
- `BestOfN`: every member generates, a pluggable `Scorer` picks the best answer.

Suites only call `loglikelihood`, `generate` and `format_prompt`; they never learn which kind
of candidate they hold. Every candidate counts the tokens and seconds it spends, for the cost table.
What its models computed goes to its `Memo` (memo.py): give candidates one memo to share work.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from merge_lab.core.writer import atomic_folder
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.cost import Counters
from merge_lab.evaluation.fingerprint import combine, fingerprint_folder
from merge_lab.evaluation.memo import Memo, Scored
from merge_lab.evaluation.runtime import (
    LoadedModel,
    Pair,
    greedy_decode,
    load_tokenizer,
    mixed_scores,
    same_tokenizer,
    stop_ids,
)
from merge_lab.evaluation.scorers import Scorer
from merge_lab.evaluation.spec import Settings
from merge_lab.training import chat

LogProbs = tuple[float, int]  # summed log-probability of a continuation, its number of tokens


class Candidate:
    """The one interface suites see. Subclasses say which model folders make them (`model_paths`)."""

    kind = "candidate"
    mixes = False  # True: always mix members' distributions token by token (even one member)

    def __init__(self, name: str, settings: Settings, memo: Memo | None = None):
        self.name = name
        self.settings = settings
        self.memo = memo if memo is not None else Memo()
        self.counters = Counters()
        self._tok = None
        self._models: list[LoadedModel] = []
        self.log_weights = torch.zeros(1)
        self.on_progress = None  # callable(done, total): the comparison's progress bar

    # --- identity, checked before any long work
    def fingerprint(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks that the candidate will load (configs, headers, tokenizers)."""

    def describe(self) -> dict:
        """A JSON-able description for results.json."""
        return {"kind": self.kind, "fingerprint": self.fingerprint()}

    def replacing(self, old: Candidate, new: Candidate) -> Candidate:
        """This candidate with `old` replaced by `new` wherever it takes part (itself included):
        `self` when `old` plays no part, else a new candidate."""
        return new if self is old else self

    def tokenizer_path(self) -> Path:
        raise NotImplementedError

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path())
        return self._tok

    def model_paths(self) -> list[Path]:
        raise NotImplementedError

    # --- loaded models
    def load(self) -> None:
        if not self._models:
            dtype = getattr(torch, self.settings.dtype)
            self._models = [LoadedModel(p, self.settings.device, dtype, self.memo) for p in self.model_paths()]

    def unload(self) -> None:
        self._models = []

    @property
    def models(self) -> list[LoadedModel]:
        """The loaded models (empty until `load()`)."""
        return self._models

    @property
    def is_moe(self) -> bool:
        """One loaded model with experts: its routing shares are worth recording."""
        return len(self._models) == 1 and self._models[0].is_moe

    def params(self) -> tuple[int, int]:
        self.load()
        tot = [lm.params() for lm in self._models]
        return sum(t for t, _ in tot), sum(a for _, a in tot)

    # --- text in, text out
    def format_prompt(self, prompt: str) -> str:
        """The prompt as training formats it (training.chat): the same text the experts learned on."""
        return chat.prompt_text(self.tokenizer, prompt, template=self.settings.chat_template)

    def encode(self, context: str, continuation: str) -> Pair:
        """Context and continuation ids, cut by training's one truncation rule (chat.fit)."""
        tok = self.tokenizer
        ctx = chat.tokens(tok, context)
        if not ctx:
            ctx = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return chat.fit(ctx, chat.tokens(tok, continuation), self.settings.max_length)

    def _report(self, done: int, total: int) -> None:
        """Progress within one call (scoring or generating `total` requests)."""
        if self.on_progress is not None:
            self.on_progress(done, total)

    def _batches(self, n: int, lengths: list[int], size: int | None = None) -> Iterator[list[int]]:
        order = sorted(range(n), key=lambda i: -lengths[i])
        bs = max(1, size or self.settings.batch_size)
        for s in range(0, n, bs):
            yield order[s : s + bs]

    def _reused(self) -> float:
        return sum(lm.reused_seconds for lm in self._models)

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LogProbs]:
        """Summed log-probability of each continuation after its context (batched, longest first)."""
        return [(s, n) for s, n, _ in self.loglikelihood_full(requests)]

    def loglikelihood_full(self, requests: list[tuple[str, str]]) -> list[Scored]:
        """(summed log-prob, tokens, whether greedy decoding would produce the continuation)."""
        self.load()
        enc = [self.encode(c, t) for c, t in requests]
        out: list[Scored] = [(0.0, 0, False)] * len(enc)
        pad = self.tokenizer.pad_token_id
        start, reused = time.perf_counter(), self._reused()
        done = 0
        for idx in self._batches(len(enc), [len(c) + len(t) for c, t in enc]):
            batch = [enc[i] for i in idx]
            for i, lp in zip(idx, self._score_batch(batch, pad)):
                out[i] = lp
            self.counters.score_tokens += sum(len(c) + len(t) for c, t in batch) * len(self._models)
            done += len(batch)
            self._report(done, len(enc))
        self.counters.score_seconds += time.perf_counter() - start + self._reused() - reused
        return out

    def _score_batch(self, batch: list[Pair], pad: int) -> list[Scored]:
        if len(self._models) == 1 and not self.mixes:
            return self._models[0].score(batch, pad)
        return mixed_scores(self._models, self.log_weights, batch, pad)

    def generate(self, prompts: list[str], formatted: bool = False, stop: list[str] | None = None) -> list[str]:
        """Greedy answers to user prompts (chat-formatted here unless `formatted`), up to
        max_new_tokens, batched; each answer is cut at the first of the `stop` strings."""
        self.load()
        torch.manual_seed(self.settings.seed)
        tok = self.tokenizer
        room = self.settings.max_length - self.settings.max_new_tokens
        texts = prompts if formatted else [self.format_prompt(p) for p in prompts]
        enc = [(tok(t, add_special_tokens=False)["input_ids"] or [tok.eos_token_id])[-room:] for t in texts]
        out = [""] * len(enc)
        start, reused = time.perf_counter(), self._reused()
        done = 0
        for idx in self._batches(len(enc), [len(e) for e in enc], self.settings.generate_batch_size):
            for i, text in zip(idx, self._generate_batch([enc[i] for i in idx], [prompts[i] for i in idx])):
                out[i] = text
            done += len(idx)
            self._report(done, len(enc))
        self.counters.gen_seconds += time.perf_counter() - start + self._reused() - reused
        for s in stop or []:
            out = [o.split(s, 1)[0] if s else o for o in out]
        return out

    def _generate_batch(self, enc: list[list[int]], prompts: list[str]) -> list[str]:
        return self._greedy(self._models, self.log_weights, enc)

    def _greedy(self, models: list[LoadedModel], log_weights: torch.Tensor, prompts: list[list[int]]) -> list[str]:
        """Greedy decoding on the weighted mixture of `models`' next-token distributions; a single
        model's answers are remembered, so best-of-N reuses what its members generated alone."""
        tok = self.tokenizer
        args = (self.settings.max_new_tokens, tok.pad_token_id, stop_ids(tok))
        if len(models) > 1 or self.mixes:
            answers, made = greedy_decode(models, log_weights, prompts, *args)
        else:
            answers, made = models[0].greedy(prompts, *args)
        self.counters.gen_tokens += made
        return [tok.decode(ids, skip_special_tokens=True) for ids in answers]

    def routing(self, texts: list[str]) -> list[list[float]] | None:
        """Per layer, the share of routing slots each expert took on these texts (MoE only)."""
        self.load()
        if len(self._models) != 1:
            return None
        tok = self.tokenizer
        enc = [tok(t, add_special_tokens=False)["input_ids"][: self.settings.max_length] or [tok.eos_token_id] for t in texts]
        counts = 0
        for s in range(0, len(enc), max(1, self.settings.batch_size)):
            c = self._models[0].routing(enc[s : s + self.settings.batch_size], tok.pad_token_id)
            if c is None:
                return None
            counts = counts + c
        return (counts / counts.sum(-1, keepdim=True)).tolist() if enc else None


class ModelCandidate(Candidate):
    """A checkpoint folder: a source model, a merge, or a fused MoE."""

    kind = "checkpoint"

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
        per_member = [lm.score(batch, pad) for lm in self._models]
        out = []
        for j, (_, cont) in enumerate(batch):
            seq = torch.tensor([m[j][0] for m in per_member], dtype=torch.float64)
            mixed = float(torch.logsumexp(seq, 0) - torch.log(torch.tensor(float(len(seq)))))
            out.append((mixed, len(cont), any(m[j][2] for m in per_member)))
        return out

    def _generate_batch(self, enc: list[list[int]], prompts: list[str]) -> list[str]:
        answers = [self._greedy([lm], torch.zeros(1), enc) for lm in self._models]
        scores = [self.scorer.score(prompts, a) for a in answers]
        return [answers[max(range(len(answers)), key=lambda m: scores[m][i])][i] for i in range(len(enc))]


def describe(c: Candidate) -> dict:
    """A JSON-able description for results.json."""
    return json.loads(json.dumps(c.describe()))
