"""A token-level mixture's score from what each member's memo keeps of its rows, not the rows.

A token ensemble scores a continuation under log sum_i w_i p_i: its summed log-prob needs only each
member's log-prob of the continuation's own tokens, and whether greedy decoding gives it (is every
continuation token the mixture's argmax?) can almost always be told from each member's TOP largest
log-probs per position: a token outside member i's top list has log-prob at most its TOP-th value.
So the members' own scoring (they are candidates too, scored first) leaves, per item, a
`TokenSummary`, and the ensemble runs no member again. Where the bounds cannot tell (near ties),
`mixed_from_summaries` says so and the caller computes the rows as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_lab.evaluation.memo import Scored

TOP = 8  # largest log-probs kept per position and member
# Log-prob margin the bounds must clear: float rounding of a logsumexp is far below it.
MARGIN = 1e-5


@dataclass(frozen=True)
class TokenSummary:
    """Of one member's log-prob rows over one continuation: the continuation tokens' log-probs
    [n], the TOP largest log-probs per position [n, TOP] and their token ids [n, TOP]."""

    target: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor
    width: int  # the rows' vocabulary size


def summarize(rows: torch.Tensor, continuation: list[int]) -> TokenSummary:
    """What the memo keeps of log-prob rows [n, vocab] predicting `continuation`."""
    target = rows.gather(1, torch.tensor(continuation)[:, None])[:, 0]
    top = rows.topk(min(TOP, rows.shape[-1]), dim=-1)
    return TokenSummary(target.clone(), top.values.clone(), top.indices.to(torch.int32), rows.shape[-1])


def mixed_from_summaries(parts: list[TokenSummary], log_weights: torch.Tensor, continuation: list[int]) -> Scored | None:
    """(summed log-prob, tokens, greedy?) under the weighted mixture of the members, as
    runtime.mix and runtime.scored give them from the rows; None when the bounds cannot tell
    whether a continuation token is the mixture's argmax."""
    lw = log_weights.view(-1, 1)
    mixed_target = torch.logsumexp(torch.stack([p.target for p in parts]) + lw, dim=0)  # [n]
    total = float(mixed_target.sum())
    greedy = mixture_greedy(parts, lw, mixed_target, torch.tensor(continuation))
    return None if greedy is None else (total, len(continuation), greedy)


def mixture_greedy(parts: list[TokenSummary], lw: torch.Tensor, mixed_target: torch.Tensor,
                   target: torch.Tensor) -> bool | None:
    """Whether every target token is the mixture's argmax: True when its mixed log-prob beats an
    upper bound of every other token's, False when some token's lower bound beats it, else None."""
    width = min(p.width for p in parts)
    candidates = torch.cat([p.top_ids for p in parts], dim=-1)  # [n, M*TOP]: any token that may win
    lows, highs = [], []
    for p in parts:
        hit = p.top_ids[:, None, :] == candidates[:, :, None]  # [n, M*TOP, TOP]
        known = hit.any(-1)
        value = torch.where(hit, p.top_values[:, None, :], torch.tensor(-torch.inf)).amax(-1)
        lows.append(torch.where(known, value, torch.tensor(-torch.inf)))
        highs.append(torch.where(known, value, p.top_values[:, -1:]))  # outside the top list: at most the TOP-th
    low = torch.logsumexp(torch.stack(lows) + lw[:, :, None], dim=0)
    high = torch.logsumexp(torch.stack(highs) + lw[:, :, None], dim=0)
    other = (candidates != target[:, None]) & (candidates < width)
    low, high = low.masked_fill(~other, -torch.inf), high.masked_fill(~other, -torch.inf)
    rest = torch.logsumexp(torch.stack([p.top_values[:, -1] for p in parts]) + lw, dim=0)  # any token in no list
    beaten = high.amax(-1).maximum(rest) < mixed_target - MARGIN
    if bool(beaten.all()):
        return True
    if bool((low.amax(-1) > mixed_target + MARGIN).any()):
        return False
    return None
