"""The one interface suites see: log-likelihood and greedy generation over a candidate's models.

Subclasses (candidates.py) say which model folders make a candidate (`model_paths`) and how its
models combine (`mixes`, `_score_batch`, `_generate_batch`); batching, truncation, progress and
the cost counters are shared here. What its models computed goes to its `Memo` (memo.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import torch

from merge_lab.evaluation.cost import Counters
from merge_lab.evaluation.memo import Memo, Scored
from merge_lab.evaluation.processes import current, map_batches
from merge_lab.evaluation.runtime import LoadedModel, Pair, greedy_decode, load_tokenizer, mixed_scores, stop_ids
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

        def score(idx: list[int]) -> list[Scored]:
            nonlocal done
            batch = [enc[i] for i in idx]
            scores = self._score_batch(batch, pad)
            self.counters.score_tokens += sum(len(c) + len(t) for c, t in batch) * len(self._models)
            done += len(batch)
            self._report(done, len(enc))
            return scores

        # under `accelerate launch` each process scores its share of the batches (processes.py)
        for i, lp in map_batches(list(self._batches(len(enc), [len(c) + len(t) for c, t in enc])), score).items():
            out[i] = lp
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

        def answer(idx: list[int]) -> list[str]:
            nonlocal done
            texts = self._generate_batch([enc[i] for i in idx], [prompts[i] for i in idx])
            done += len(idx)
            self._report(done, len(enc))
            return texts

        # as wide as allowed, yet one batch per process at least (each process decodes its share)
        width = min(self.settings.generate_batch_size, -(-len(enc) // max(1, current().world)))
        batches = list(self._batches(len(enc), [len(e) for e in enc], width))
        for i, text in map_batches(batches, answer).items():  # each process its share, as in scoring
            out[i] = text
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

    def start_routing(self) -> None:
        """Forget which rows were evaluated: `routing_shares` counts from here."""
        for lm in self._models:
            lm.touched.clear()

    def routing_shares(self) -> list[list[float]] | None:
        """Per layer, the share of top-k routing slots each expert took over the tokens of every row
        scored or prompted since `start_routing` (each distinct row once, remembered ones too), summed
        over the processes (each ran its share). None unless one MoE model makes the candidate; every
        process calls it."""
        if not self.is_moe:
            return None
        lm = self._models[0]
        rows = [lm.memo.routes[k] for k in dict.fromkeys(lm.touched) if k in lm.memo.routes]
        lm.touched.clear()
        mine = torch.stack(rows).sum(0).tolist() if rows else None
        parts = [torch.tensor(p) for p in current().all_gather(mine) if p is not None]
        if not parts:
            return None
        counts = torch.stack(parts).sum(0)
        return (counts / counts.sum(-1, keepdim=True).clamp_min(1)).tolist()
