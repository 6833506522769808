"""One loaded model at inference: batched continuation log-probs, a KV-cached greedy stepper, the
routing of an MoE's rows (counted in those same passes), and greedy decoding on a weighted mixture
of several models.

A `LoadedModel` remembers what it computed in the `Memo` it is given (see memo.py), keyed by its
identity: the stat of its folder's files and its dtype.

Savings that change no result (tests/test_shared_prefix.py and tests/test_ensemble_reuse.py check
them against plain forwards and the full rows); each has a switch on LoadedModel, on by default, so
that benchmarks/compare_speed.py times the old path in the same run:
- the token prefix every row of a batch shares (a chat template's system turn) runs once, on one
  row, and its KV cache is repeated over the batch (`LoadedModel.run`; `share_prefix`);
- an MoE's routing shares are counted from the router logits of the passes that score and prompt
  its rows (`LoadedModel.run`), not from a pass of their own;
- greedy decoding drops a row from the batch (and from every KV cache) once it has stopped, instead
  of feeding it pads to the end (`decode_batch`; `drop_stopped`); its batches are as wide as the
  memory allows (decoding_memory.py);
- a token mixture scores from its members' remembered row summaries (`mixed_scores`, mixture.py;
  `reuse_summaries`), and remembers its greedy answers as a single model does (`greedy_decode`).
"""

from __future__ import annotations

import inspect
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from merge_lab.core.hashing import folder_state
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.decoding_memory import fitting_rows
from merge_lab.evaluation.memo import Memo, Scored
from merge_lab.evaluation.mixture import TokenSummary, mixed_from_summaries, summarize
from merge_lab.moe.routing import capture_router_logits, routers, row_slot_counts
from merge_lab.training import chat

Pair = tuple[list[int], list[int]]  # context ids, continuation ids
# Below this many shared tokens a separate forward pass for the prefix costs about what it saves.
MIN_SHARED_PREFIX = 4


def load_tokenizer(path: Path):
    """The tokenizer of a model folder, with a pad token (the eos when it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise MergeLabError(
            f"{path}: the tokenizer does not load ({type(e).__name__}: {e}). A candidate needs its "
            "tokenizer files (tokenizer.json / tokenizer_config.json) in the model folder."
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def stop_ids(tok) -> set[int]:
    """Token ids that end a greedy answer: eos and the chat template's end of turn."""
    ids = {tok.eos_token_id}
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end is not None:
        ids.add(end)
    return {i for i in ids if i is not None}


class LoadedModel:
    """One loaded causal LM: batched continuation log-probs and a KV-cached next-token stepper."""

    def __init__(self, path: Path, device: str, dtype: torch.dtype, memo: Memo):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is per candidate and suite
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        except Exception as e:
            raise MergeLabError(f"{path}: the model does not load in transformers ({type(e).__name__}: {e}).") from None
        self.device = device
        self.memo = memo
        self.identity = (folder_state(path), str(dtype))
        self.reused_seconds = 0.0  # seconds of remembered work this object handed out again
        self.is_moe = any("experts" in n for n, _ in self.model.named_parameters())
        # MoE only: [layers, experts] top-k slot counts of the rows the last passes ran, by row ids
        # (`run`), moved into the memo by the caller; and the memo keys used since `touched` was
        # last cleared (the rows a suite evaluated: interface.Candidate.routing_shares)
        self.routed: dict[tuple[int, ...], torch.Tensor] = {}
        self.touched: list[tuple] = []
        self.counts_routes = self.is_moe and has_routers(self.model)
        # the savings' switches (module docstring); off: the old path
        self.share_prefix = True  # a batch's shared prefix runs once (`run`)
        self.drop_stopped = True  # greedy decoding drops stopped rows from the batch (`decode_batch`)
        self.reuse_summaries = True  # a token mixture scores from the memo's summaries (`mixed_scores`)
        # the KV cache's argument and output field: `cache` from transformers 5.2x, `past_key_values` before
        self.cache_name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

    def params(self) -> tuple[int, int]:
        """(total, active per token): for an MoE only top-k of E experts' weights are active."""
        total = experts = 0
        for n, p in self.model.named_parameters():
            total += p.numel()
            if ".experts." in n or n.endswith(".experts"):
                experts += p.numel()
        cfg = self.model.config
        e = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
        k = getattr(cfg, "num_experts_per_tok", None)
        if experts and e and k:
            return total, int(total - experts + experts * k / e)
        return total, total

    def forward(self, keep: int, **inputs):
        """The model on `inputs` (tensors moved to its device), computing logits for the last
        `keep` positions only where the model class allows (`logits_to_keep`)."""
        args = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        try:
            return self.model(**args, logits_to_keep=keep)
        except TypeError:  # a model class without logits_to_keep
            return self.model(**args)

    def shared_prefix(self, rows: list[list[int]], limit: int) -> int:
        """How many leading tokens (at most `limit`) every row shares, when worth running once:
        0 below MIN_SHARED_PREFIX, for one row, or with `share_prefix` off."""
        shared = chat.common_prefix(rows, limit) if self.share_prefix and len(rows) > 1 else 0
        return shared if shared >= MIN_SHARED_PREFIX else 0

    @torch.no_grad()
    def run(self, rows: list[list[int]], pad_id: int, keep: int, limit: int, use_cache: bool = False):
        """The model over `rows` left-padded (every row ends at the last position), with logits for
        the last `keep` positions: (output, attention mask, position ids of the input tokens).

        When the rows share at least MIN_SHARED_PREFIX leading tokens (at most `limit`: positions
        whose logits are read must stay after the prefix), the prefix runs once on one row and its
        KV cache is repeated over the batch; the rest of each row follows it, left-padded, so the
        pads sit between prefix and suffix with attention mask 0 and the positions count on from the
        prefix: every real token attends to exactly the tokens, at the positions, it does unshared."""
        shared = self.shared_prefix(rows, limit)
        past = None
        with capture_router_logits(self.model) if self.counts_routes else nullcontext([]) as captured:
            if shared:
                head = torch.tensor([rows[0][:shared]], dtype=torch.long)
                first = self.forward(1, input_ids=head, attention_mask=torch.ones_like(head),
                                     position_ids=torch.arange(shared)[None], use_cache=True)
                past = getattr(first, self.cache_name)
            if not hasattr(past, "batch_repeat_interleave"):  # no prefix, or a cache that cannot be repeated
                captured.clear()
                ids, mask, pos = chat.left_padded(rows, pad_id)
                out = self.forward(keep, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache)
                self.note_routes(rows, captured, mask)
                return out, mask, pos
            head_logits = list(captured)
            captured.clear()
            past.batch_repeat_interleave(len(rows))
            ids, tail_mask, tail_pos = chat.left_padded([r[shared:] for r in rows], pad_id)
            mask = torch.cat([torch.ones((len(rows), shared), dtype=torch.long), tail_mask], dim=1)
            pos = tail_pos + shared
            out = self.forward(keep, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                               **{self.cache_name: past})
            self.note_routes(rows, captured, tail_mask, head_logits)
        return out, mask, pos

    def note_routes(self, rows: list[list[int]], logits: list[torch.Tensor], mask: torch.Tensor,
                    head: list[torch.Tensor] | None = None) -> None:
        """Each row's top-k slot counts [layers, experts] over its real tokens (mask 1), from the
        router logits of one pass over the rows, plus those of the shared prefix `head` (run once,
        counted for every row): kept in `routed` by the row's ids. Nothing for a dense model."""
        if not logits:
            return
        k = getattr(self.model.config, "num_experts_per_tok", 1)
        counts = row_slot_counts(logits, mask, k)
        if head:
            counts += row_slot_counts(head, torch.ones((1, len(head[0])), dtype=torch.long), k)
        for row, c in zip(rows, counts):
            self.routed[tuple(row)] = c

    @torch.no_grad()
    def rows(self, batch: list[Pair], pad_id: int) -> list[torch.Tensor]:
        """Per item, the log-softmax rows [len(cont), vocab] that predict its continuation tokens.

        Left-padded, so every continuation ends at the last position and only the last
        max(len(cont)) + 1 positions need logits (`logits_to_keep`): a long prompt with a short
        answer costs no vocabulary-sized rows for the prompt. The shared prefix may reach up to the
        shortest context's last token but one (that token predicts its continuation's first)."""
        keep = max(len(t) for _, t in batch) + 1
        out, _, _ = self.run([c + t for c, t in batch], pad_id, keep, min(len(c) for c, _ in batch) - 1)
        logits = out.logits[:, -keep:].float()
        out = []
        for i, (_, t) in enumerate(batch):
            # positions keep-1-len(t) .. keep-2 predict the len(t) continuation tokens
            out.append(torch.log_softmax(logits[i, keep - 1 - len(t) : keep - 1], dim=-1).cpu())
        return out

    def score(self, batch: list[Pair], pad_id: int) -> list[Scored]:
        """Per item (summed log-prob, tokens, whether greedy decoding gives it), remembered in the memo."""
        return [self.memo.scores[k][0] for k in self.remember(batch, pad_id)]

    def summaries(self, batch: list[Pair], pad_id: int) -> list[TokenSummary]:
        """Per item, what the memo keeps of its log-prob rows (mixture.py), computed when missing."""
        return [self.memo.tokens[k] for k in self.remember(batch, pad_id)]

    def remember(self, batch: list[Pair], pad_id: int) -> list[tuple]:
        """The items' memo keys, after scoring those the memo lacks (their score and their rows'
        summary, with the seconds they took; a reused item adds its seconds to reused_seconds)."""
        memo = self.memo
        keys = [(self.identity, tuple(c), tuple(t)) for c, t in batch]
        todo = [i for i, k in enumerate(keys) if k not in memo.scores or k not in memo.tokens]
        self.reused_seconds += sum(memo.scores[k][1] for k in keys if k in memo.scores and k in memo.tokens)
        if todo:
            start = time.perf_counter()
            rows = self.rows([batch[i] for i in todo], pad_id)
            share = (time.perf_counter() - start) / len(todo)
            for i, r in zip(todo, rows):
                memo.scores[keys[i]] = (scored(r, batch[i][1]), share)
                memo.tokens[keys[i]] = summarize(r, batch[i][1])
            self.keep_routes({keys[i]: batch[i][0] + batch[i][1] for i in todo})
        self.touched += keys
        return keys

    def keep_routes(self, rows: dict[tuple, list[int]]) -> None:
        """Move the routing counts `run` noted for these rows into the memo, under their keys."""
        for key, row in rows.items():
            if tuple(row) in self.routed:
                self.memo.routes[key] = self.routed[tuple(row)]
        self.routed.clear()

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
               stops: set[int]) -> tuple[list[list[int]], int]:
        """Greedy answer ids per prompt and the tokens generated, remembered in the memo (a reused
        answer counts its tokens and the seconds it first took)."""
        memo = self.memo.answers
        keys = [(self.identity, tuple(p), max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        tokens = 0
        for k in keys:
            if k in memo:
                self.reused_seconds += memo[k][1]
                tokens += len(memo[k][0])
        if todo:
            start = time.perf_counter()
            answers, made = decode([self], torch.zeros(1), [prompts[i] for i in todo], max_new_tokens, pad_id, stops)
            tokens += made
            share = (time.perf_counter() - start) / len(todo)
            for i, ids in zip(todo, answers):
                memo[keys[i]] = (ids, share)
            self.keep_routes({keys[i]: prompts[i] for i in todo})
        self.touched += keys
        return [memo[k][0] for k in keys], tokens

    def stepper(self, prompts: list[list[int]], pad_id: int) -> Stepper:
        return Stepper(self, prompts, pad_id)


class Stepper:
    """Greedy decoding state of one model over a left-padded batch, with its KV cache."""

    @torch.no_grad()
    def __init__(self, lm: LoadedModel, prompts: list[list[int]], pad_id: int):
        self.lm = lm
        out, mask, pos = lm.run(prompts, pad_id, 1, min(len(p) for p in prompts) - 1, use_cache=True)
        self.past, self.mask, self.pos = getattr(out, lm.cache_name), mask, pos[:, -1]
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (the others stopped): their cache, mask and positions."""
        self.past.batch_select_indices(rows.to(self.lm.device))
        self.mask, self.pos, self.logp = self.mask[rows], self.pos[rows], self.logp[rows]

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones((len(next_ids), 1), dtype=torch.long)], dim=1)
        self.pos = self.pos + 1
        out = self.lm.forward(1, input_ids=next_ids[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                              use_cache=True, **{self.lm.cache_name: self.past})
        self.past = getattr(out, self.lm.cache_name)
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
        return self.logp


def has_routers(model) -> bool:
    """Whether every decoder layer has the top-k router moe.routing hooks (Mixtral, Qwen2/3-MoE
    layouts): another MoE layout (dense layers between, other router modules) is evaluated alike,
    without routing shares."""
    try:
        return bool(routers(model))
    except (AttributeError, ValueError):
        return False


def mix(logps: list[torch.Tensor], log_weights: torch.Tensor) -> torch.Tensor:
    """log sum_i w_i p_i: a single member with weight 1 returns its log-probs unchanged."""
    if len(logps) == 1:
        return logps[0] + log_weights[0]
    width = min(x.shape[-1] for x in logps)  # embeddings padded past the shared tokenizer differ in size
    logps = [x[..., :width] for x in logps]
    return torch.logsumexp(torch.stack(logps) + log_weights.view(-1, *([1] * logps[0].dim())), dim=0)


def scored(rows: torch.Tensor, continuation: list[int]) -> Scored:
    """(summed log-prob, tokens, greedy?) of a continuation from the log-prob rows predicting it."""
    target = torch.tensor(continuation)
    greedy = bool((rows.argmax(-1) == target).all())
    return float(rows.gather(1, target[:, None]).sum()), len(target), greedy


def mixed_scores(models: list[LoadedModel], log_weights: torch.Tensor, batch: list[Pair], pad_id: int) -> list[Scored]:
    """Scores under the weighted mixture of the models' token distributions (never remembered as
    such), from each model's remembered summaries (mixture.py): a member already scored on these
    items runs no forward pass again. Items whose greedy flag the summaries cannot tell are scored
    from the rows."""
    out: list[Scored | None] = [None] * len(batch)
    if all(lm.reuse_summaries for lm in models):
        parts = [lm.summaries(batch, pad_id) for lm in models]
        out = [mixed_from_summaries([p[j] for p in parts], log_weights, cont) for j, (_, cont) in enumerate(batch)]
    unsure = [j for j, x in enumerate(out) if x is None]
    if unsure:
        per_member = [lm.rows([batch[j] for j in unsure], pad_id) for lm in models]
        for k, j in enumerate(unsure):
            out[j] = scored(mix([m[k] for m in per_member], log_weights), batch[j][1])
    return out


def greedy_decode(models: list[LoadedModel], log_weights: torch.Tensor, prompts: list[list[int]],
                  max_new_tokens: int, pad_id: int, stops: set[int]) -> tuple[list[list[int]], int]:
    """Greedy answer ids on the weighted mixture of the models' next-token distributions (one KV
    cache per model), and the number of tokens generated, remembered in the first model's memo
    under the models and weights: two suites asking a mixture the same prompt decode it once (a
    reused answer counts its tokens and the seconds it first took, as LoadedModel.greedy does)."""
    memo = models[0].memo.answers
    mixture = ("mixture", tuple(lm.identity for lm in models), tuple(log_weights.tolist()))
    keys = [(mixture, tuple(p), max_new_tokens) for p in prompts]
    todo = [i for i, k in enumerate(keys) if k not in memo]
    tokens = 0
    for k in keys:
        if k in memo:
            models[0].reused_seconds += memo[k][1]
            tokens += len(memo[k][0])
    if todo:
        start = time.perf_counter()
        answers, made = decode(models, log_weights, [prompts[i] for i in todo], max_new_tokens, pad_id, stops)
        tokens += made
        share = (time.perf_counter() - start) / len(todo)
        for i, ids in zip(todo, answers):
            memo[keys[i]] = (ids, share)
    return [memo[k][0] for k in keys], tokens


def decode(models: list[LoadedModel], log_weights: torch.Tensor, prompts: list[list[int]],
           max_new_tokens: int, pad_id: int, stops: set[int]) -> tuple[list[list[int]], int]:
    """greedy_decode's work, nothing remembered: in batches of `fitting_rows` prompts."""
    size = fitting_rows(models, max(len(p) for p in prompts), max_new_tokens, len(prompts))
    outs: list[list[int]] = []
    made = 0
    for s in range(0, len(prompts), size):
        answers, tokens = decode_batch(models, log_weights, prompts[s : s + size], max_new_tokens, pad_id, stops)
        outs += answers
        made += tokens
    return outs, made


def decode_batch(models: list[LoadedModel], log_weights: torch.Tensor, prompts: list[list[int]],
                 max_new_tokens: int, pad_id: int, stops: set[int]) -> tuple[list[list[int]], int]:
    """One batch of greedy decoding. A row that has stopped leaves the batch (and every cache) at
    once: a decoding step costs per row, and finished rows have nothing left to compute. (With
    `drop_stopped` off on a model, stopped rows are fed pads to the end: the old path.)"""
    drop = all(lm.drop_stopped for lm in models)
    steppers = [lm.stepper(prompts, pad_id) for lm in models]
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # which prompt each row of the batch is
    done = torch.zeros(len(prompts), dtype=torch.bool)  # rows of the batch that have stopped
    made = 0
    logp = mix([s.logp for s in steppers], log_weights)
    for step in range(max_new_tokens):
        nxt = logp.argmax(-1)
        for r, i in enumerate(live):
            if not done[r]:
                if int(nxt[r]) in stops:
                    done[r] = True
                else:
                    outs[i].append(int(nxt[r]))
        made += int((~done).sum())
        if bool(done.all()) or (drop and step == max_new_tokens - 1):  # no one reads another step
            break
        if drop and bool(done.any()):
            rows = (~done).nonzero().flatten()
            for s in steppers:
                s.keep_rows(rows)
            nxt, live, done = nxt[rows], [live[r] for r in rows.tolist()], done[rows]
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        logp = mix([s.step(nxt) for s in steppers], log_weights)
    return outs, made
