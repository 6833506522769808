"""The one chat format: how a prompt and a reply become text and tokens, in training and in scoring.

Align (expert fine-tuning), fusion training, router initialisation and the comparison all go
through these functions, so a model is scored on exactly the prompt format it was trained on:
- with a chat template: the tokenizer's own rendering (a user turn, the generation prompt; the
  reply is the assistant turn as the template closes it);
- without one: the prompt, a newline, then the reply and the end-of-sequence token (a system
  message, when given, comes first with a blank line).

One truncation rule for every long row (`fit`): keep the prompt's end and the reply's start; each
keeps at least half of the window when both are long, and whichever is short leaves the rest to
the other. (Cutting a prompt's start keeps the question next to the reply; cutting the reply's end
keeps the words a score or a loss is about next to their context.)
"""

from __future__ import annotations

import torch

IGNORE = -100  # label of tokens the loss does not count


def has_template(tokenizer, template: bool = True) -> bool:
    return template and bool(getattr(tokenizer, "chat_template", None))


def _messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def prompt_text(tokenizer, prompt: str, system: str | None = None, template: bool = True) -> str:
    """The text a reply follows. Without a template, an empty prompt (a statement scored on its
    own) gives an empty text."""
    if has_template(tokenizer, template):
        return tokenizer.apply_chat_template(_messages(prompt, system), tokenize=False, add_generation_prompt=True)
    if not prompt and not system:
        return ""
    return (f"{system}\n\n" if system else "") + f"{prompt}\n"


def reply_text(tokenizer, prompt: str, reply: str, system: str | None = None, template: bool = True) -> str:
    """The reply as the chat closes it (the assistant turn's end marker, or eos), to train on."""
    head = prompt_text(tokenizer, prompt, system, template)
    if has_template(tokenizer, template):
        msgs = _messages(prompt, system) + [{"role": "assistant", "content": reply}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        if full.startswith(head):
            return full[len(head):]
    return reply + (tokenizer.eos_token or "")


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def fit(head: list[int], reply: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """The one truncation rule (module docstring): (head's end, reply's start) within max_tokens."""
    if len(head) + len(reply) <= max_tokens:
        return head, reply
    keep_reply = min(len(reply), max(max_tokens // 2, max_tokens - len(head)))
    keep_head = max_tokens - keep_reply
    return (head[-keep_head:] if keep_head > 0 else []), reply[:keep_reply]


def encode(tokenizer, prompt: str, reply: str, max_tokens: int, system: str | None = None,
           template: bool = True, close: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids), fitted. `close`: the reply carries the turn's end marker (training);
    without it the reply is the bare text (scoring a reference answer)."""
    head = tokens(tokenizer, prompt_text(tokenizer, prompt, system, template))
    body = reply_text(tokenizer, prompt, reply, system, template) if close else reply
    return fit(head, tokens(tokenizer, body), max_tokens)


def training_row(tokenizer, prompt: str, reply: str, max_tokens: int,
                 system: str | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels): the loss counts only the reply tokens (labels IGNORE elsewhere)."""
    head, body = encode(tokenizer, prompt, reply, max_tokens, system)
    return head + body, [IGNORE] * len(head) + body


def pad_id(tokenizer) -> int:
    """The id rows are padded with: the pad token, else eos, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def right_padded(rows: list[list[int]], pad: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of rows padded on the right with `fill` (default `pad`): training batches."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, position ids) of rows padded on the left: every row ends at the last
    position, where continuation scores and the next generated token are read."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def common_prefix(rows: list[list[int]], limit: int) -> int:
    """How many leading tokens every row shares (a chat template's system turn), at most `limit`."""
    if not rows:
        return 0
    first, n = rows[0], min(limit, *(len(r) for r in rows))
    for r in rows[1:]:
        i = 0
        while i < n and r[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)
