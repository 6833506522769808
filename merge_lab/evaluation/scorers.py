"""Scorers of (prompt, response) pairs, higher is better: the judge of the win rate and of best-of-N.

- `JudgeScorer`: mean per-token log-likelihood of the response under a judge candidate;
- `RewardScorer`: a sequence-classification reward model's score of the chat-formatted exchange.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from merge_lab.evaluation.fingerprint import fingerprint_folder
from merge_lab.evaluation.processes import map_batches
from merge_lab.evaluation.runtime import load_tokenizer
from merge_lab.evaluation.spec import Settings


class Judge(Protocol):
    """What a judge needs of a candidate (candidates.Candidate has it all)."""

    def fingerprint(self) -> str: ...
    def check(self) -> None: ...
    def format_prompt(self, prompt: str) -> str: ...
    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[tuple[float, int]]: ...
    def replacing(self, old, new) -> Judge: ...


class Scorer:
    """Scores (prompt, response) pairs; higher is better. Used by best-of-N and the win rate."""

    name = "scorer"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        pass

    def replacing(self, old, new) -> Scorer:
        """This scorer with candidate `old` replaced by `new` (itself when it uses no candidate)."""
        return self

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError


class JudgeScorer(Scorer):
    """Mean per-token log-likelihood of the response under a judge checkpoint (length-fair)."""

    name = "judge log-likelihood"

    def __init__(self, judge: Judge):
        self.judge = judge

    def fingerprint(self) -> str:
        return "judge:" + self.judge.fingerprint()

    def check(self) -> None:
        self.judge.check()

    def replacing(self, old, new) -> Scorer:
        judge = self.judge.replacing(old, new)
        return self if judge is self.judge else JudgeScorer(judge)

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        reqs = [(self.judge.format_prompt(p), r if r.strip() else " ") for p, r in zip(prompts, responses)]
        return [s / max(n, 1) for s, n in self.judge.loglikelihood(reqs)]


class RewardScorer(Scorer):
    """A sequence-classification reward model's score of the chat-formatted exchange."""

    name = "reward model"

    def __init__(self, path: str | Path, settings: Settings):
        self.path = Path(path)
        self.settings = settings
        self._model = None
        self._tok = None

    def fingerprint(self) -> str:
        return "reward:" + fingerprint_folder(self.path)

    def check(self) -> None:
        from merge_lab.core.checkpoint import Checkpoint

        _ = Checkpoint(self.path).tensors
        self._tok = load_tokenizer(self.path)

    def _load(self):
        from transformers import AutoModelForSequenceClassification

        if self._model is None:
            self._tok = self._tok or load_tokenizer(self.path)
            model = AutoModelForSequenceClassification.from_pretrained(str(self.path))
            self._model = model.to(self.settings.device).eval()
            self._model.config.pad_token_id = self._tok.pad_token_id
        return self._model

    def _encode(self, prompt: str, response: str) -> dict[str, torch.Tensor]:
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        text = (self._tok.apply_chat_template(msgs, tokenize=False) if getattr(self._tok, "chat_template", None)
                else f"{prompt}\n{response}")
        return self._tok(text, return_tensors="pt", truncation=True, max_length=self.settings.max_length)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """Each exchange scored alone (no padding), in batches of `batch_size` exchanges, longest
        first: under `accelerate launch` each process scores its share of the batches
        (processes.map_batches), so the scores do not depend on the number of processes."""
        model = self._load()
        encoded = [self._encode(p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: -encoded[i]["input_ids"].shape[1])
        size = max(1, self.settings.batch_size)
        batches = [order[s:s + size] for s in range(0, len(order), size)]

        def compute(idx: list[int]) -> list[float]:
            return [float(model(**{k: v.to(model.device) for k, v in encoded[i].items()}).logits[0, 0]) for i in idx]

        scored = map_batches(batches, compute)
        return [scored[i] for i in range(len(encoded))]
