"""What loaded models already computed, owned by one comparison (or one test) and passed down.

Best-of-N reuses its members' work (members are evaluated as candidates of their own first), so
each member scores and generates once: the members and the best-of-N candidate share one Memo.
Entries are keyed by the model's identity (its folder's files and dtype) and the exact token ids.
Each entry keeps the seconds its computation took, so a reuse still costs what the work costs in
the cost table (best-of-N is not made to look cheaper than running its members).

A scored continuation also keeps a summary of its log-prob rows (mixture.TokenSummary: the
continuation tokens' log-probs and each position's largest ones), so a token ensemble of members
already scored runs none of them again.

Two comparisons share nothing unless they are given the same Memo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Scored = tuple[float, int, bool]  # summed log-prob of a continuation, its tokens, whether greedy gives it


@dataclass
class Memo:
    """Per model identity: continuations scored (with their rows' summary) and greedy answers,
    each with its seconds."""

    scores: dict[tuple, tuple[Scored, float]] = field(default_factory=dict)
    answers: dict[tuple, tuple[list[int], float]] = field(default_factory=dict)
    tokens: dict[tuple, Any] = field(default_factory=dict)  # same keys as scores: mixture.TokenSummary
    # an MoE's rows, under the keys of scores or answers: [layers, experts] top-k slot counts
    # over the row's tokens (the scored context and continuation, or the prompt)
    routes: dict[tuple, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores) + len(self.answers)
