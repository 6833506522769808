"""One loaded model at inference: batched continuation log-probs, a KV-cached greedy stepper,
routing shares of an MoE, and greedy decoding on a weighted mixture of several models.

A `LoadedModel` remembers what it computed in the `Memo` it is given (see memo.py), keyed by its
identity: the stat of its folder's files and its dtype.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.fingerprint import folder_state
from merge_lab.evaluation.memo import Memo, Scored
from merge_lab.training import chat

Pair = tuple[list[int], list[int]]  # context ids, continuation ids


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

    @torch.no_grad()
    def rows(self, batch: list[Pair], pad_id: int) -> list[torch.Tensor]:
        """Per item, the log-softmax rows [len(cont), vocab] that predict its continuation tokens.

        Left-padded, so every continuation ends at the last position and only the last
        max(len(cont)) + 1 positions need logits (`logits_to_keep`): a long prompt with a short
        answer costs no vocabulary-sized rows for the prompt."""
        ids, mask, pos = chat.left_padded([c + t for c, t in batch], pad_id)
        keep = max(len(t) for _, t in batch) + 1
        logits = self.forward(keep, input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -keep:].float()
        out = []
        for i, (_, t) in enumerate(batch):
            # positions keep-1-len(t) .. keep-2 predict the len(t) continuation tokens
            out.append(torch.log_softmax(logits[i, keep - 1 - len(t) : keep - 1], dim=-1).cpu())
        return out

    def score(self, batch: list[Pair], pad_id: int) -> list[Scored]:
        """Per item (summed log-prob, tokens, whether greedy decoding gives it), remembered in the memo."""
        memo = self.memo.scores
        keys = [(self.identity, tuple(c), tuple(t)) for c, t in batch]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        self.reused_seconds += sum(memo[k][1] for k in keys if k in memo)
        if todo:
            start = time.perf_counter()
            rows = self.rows([batch[i] for i in todo], pad_id)
            share = (time.perf_counter() - start) / len(todo)
            for i, r in zip(todo, rows):
                memo[keys[i]] = (scored(r, batch[i][1]), share)
        return [memo[k][0] for k in keys]

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
            answers, made = greedy_decode([self], torch.zeros(1), [prompts[i] for i in todo], max_new_tokens,
                                          pad_id, stops)
            tokens += made
            share = (time.perf_counter() - start) / len(todo)
            for i, ids in zip(todo, answers):
                memo[keys[i]] = (ids, share)
        return [memo[k][0] for k in keys], tokens

    @torch.no_grad()
    def routing(self, batch: list[list[int]], pad_id: int) -> torch.Tensor | None:
        """Counts of (token, top-k slot) assignments, [layer, expert]; None for dense models."""
        if not self.is_moe:
            return None
        k = getattr(self.model.config, "num_experts_per_tok", 1)
        ids, mask, pos = chat.left_padded(batch, pad_id)
        out = self.forward(1, input_ids=ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
        logits = getattr(out, "router_logits", None)
        if not logits:
            return None
        keep = mask.reshape(-1).bool()
        return torch.stack([torch.bincount(layer.float().cpu()[keep].topk(k, dim=-1).indices.reshape(-1),
                                           minlength=layer.shape[-1]) for layer in logits])

    def stepper(self, prompts: list[list[int]], pad_id: int) -> Stepper:
        return Stepper(self, prompts, pad_id)


class Stepper:
    """Greedy decoding state of one model over a left-padded batch, with its KV cache."""

    @torch.no_grad()
    def __init__(self, lm: LoadedModel, prompts: list[list[int]], pad_id: int):
        self.lm = lm
        ids, mask, pos = chat.left_padded(prompts, pad_id)
        out = lm.forward(1, input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.past, self.mask, self.pos = getattr(out, lm.cache_name), mask, pos[:, -1]
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, torch.ones((len(next_ids), 1), dtype=torch.long)], dim=1)
        self.pos = self.pos + 1
        out = self.lm.forward(1, input_ids=next_ids[:, None], attention_mask=self.mask, position_ids=self.pos[:, None],
                              use_cache=True, **{self.lm.cache_name: self.past})
        self.past = getattr(out, self.lm.cache_name)
        self.logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
        return self.logp


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
    """Scores under the weighted mixture of the models' token distributions (never remembered)."""
    per_member = [lm.rows(batch, pad_id) for lm in models]
    return [scored(mix([m[j] for m in per_member], log_weights), cont) for j, (_, cont) in enumerate(batch)]


def greedy_decode(models: list[LoadedModel], log_weights: torch.Tensor, prompts: list[list[int]],
                  max_new_tokens: int, pad_id: int, stops: set[int]) -> tuple[list[list[int]], int]:
    """Greedy answer ids on the weighted mixture of the models' next-token distributions (one KV
    cache per model), and the number of tokens generated."""
    steppers = [lm.stepper(prompts, pad_id) for lm in models]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    outs: list[list[int]] = [[] for _ in prompts]
    made = 0
    logp = mix([s.logp for s in steppers], log_weights)
    for _ in range(max_new_tokens):
        nxt = logp.argmax(-1)
        for i in range(len(prompts)):
            if not done[i]:
                if int(nxt[i]) in stops:
                    done[i] = True
                else:
                    outs[i].append(int(nxt[i]))
        made += int((~done).sum())
        if bool(done.all()):
            break
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        logp = mix([s.step(nxt) for s in steppers], log_weights)
    return outs, made
