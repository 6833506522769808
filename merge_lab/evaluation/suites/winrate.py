"""Win rate of greedy answers against the reference candidate's, under the judge."""

from __future__ import annotations

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.suites.base import EvalContext, Suite


class WinRateSuite(Suite):
    """Win rate against the reference candidate's answers under the judge (ties count half)."""

    metric = "win rate vs reference"
    needs = frozenset({"judge", "reference"})

    def greedy_prompts(self) -> list[str]:
        return [e.prompt for e in self.items()]

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> list[dict]:
        if ctx.judge is None:
            raise MergeLabError(f"suite '{self.name}' needs `judge:` (a checkpoint) in the compare file.")
        items = self.items()
        prompts = self.greedy_prompts()
        ref = ctx.reference_answers(items)
        mine = ref if candidate is ctx.reference else candidate.generate(prompts)
        a, b = ctx.judge.score(prompts, mine), ctx.judge.score(prompts, ref)
        return [{"id": e.id, "score": 1.0 if x > y else 0.5 if x == y else 0.0, "answer": m[:300]}
                for e, x, y, m in zip(items, a, b, mine)]


class HelpfulWinRate(WinRateSuite):
    name = "helpful_winrate"
    objective = "helpful"
    description = "win rate of greedy answers to benign requests against the reference candidate, under the judge"
    sources = ("benign_requests", "refusal_pairs")

    def keep(self, example: Example) -> bool:
        return example.label in ("answer", "benign", "off_topic")


BUILTIN = [HelpfulWinRate]
