"""Everything a comparison evaluates, behind one interface: log-likelihood and greedy generation.

- `ModelCandidate`: any checkpoint folder (a source model, a merge, a fused MoE);
- `RecipeCandidate`: a recipe, merged on the fly into a cache folder keyed by its inputs;
- `TokenEnsemble`: weighted average of the members' next-token probabilities, for scoring and
  for generation (one KV cache per member);
- `BestOfN`: every member generates, a pluggable `Scorer` picks the best answer.

Suites only call `loglikelihood`, `generate` and `format_prompt`; they never learn which kind
of candidate they hold. Every candidate counts the tokens and seconds it spends, for the cost table.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from merge_lab.errors import MergeLabError
from merge_lab.training import chat

# Raise when a change alters scores, answers or routing shares (cached results of older versions are then redone).
SCORING_VERSION = 4

LogProbs = tuple[float, int]  # summed log-probability of a continuation, its number of tokens


# ------------------------------------------------------------------ shared helpers


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(f: Path) -> str:
    """sha256 of a whole file, remembered per (path, size, mtime) for the life of the process."""
    st = f.stat()
    key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        _FILE_DIGESTS[key] = h.hexdigest()
    return _FILE_DIGESTS[key]


def fingerprint_folder(path: Path) -> str:
    """A content fingerprint of a model folder: every file's name and full sha256.

    Whole files, weights included: fine-tunes of one base can differ only in tensors in the middle
    of a shard, and a partial hash would make their cached results collide."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode())
        h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def _folder_state(path: Path) -> tuple:
    """What a model folder is within this process, from a stat of its files (no hashing: loading a
    model must not read its weights twice): the memo's key. Symlinks resolve, so a config-only
    variant of a folder differs from it by its own config.json."""
    return tuple(sorted((f.name, str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns)
                        for f in path.iterdir() if f.is_file()))


def load_tokenizer(path: Path):
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
    ids = {tok.eos_token_id}
    end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end is not None:
        ids.add(end)
    return {i for i in ids if i is not None}


@dataclass
class Counters:
    """Tokens and seconds spent, per activity (the cost table's throughput)."""

    score_tokens: int = 0
    score_seconds: float = 0.0
    gen_tokens: int = 0
    gen_seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


# What one model (by its folder's files and dtype) already computed in this process: a continuation's
# (summed log-prob, tokens, greedy?) and a prompt's greedy answer. Best-of-N reuses its members' work
# (members are evaluated as candidates of their own first), so each member scores and generates once.
# Each entry keeps the seconds its computation took, so a reuse still costs what the work costs in the
# cost table (best-of-N is not made to look cheaper than running its members).
_SCORES: dict[tuple, tuple[tuple[float, int, bool], float]] = {}
_ANSWERS: dict[tuple, tuple[list[int], float]] = {}


def forget() -> None:
    """Drop what models computed so far in this process (tests compare fresh computations)."""
    _SCORES.clear()
    _ANSWERS.clear()


class _LM:
    """One loaded causal LM: batched continuation log-probs and a KV-cached next-token stepper."""

    def __init__(self, path: Path, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our own progress bar is per candidate and suite
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        except Exception as e:
            raise MergeLabError(f"{path}: the model does not load in transformers ({type(e).__name__}: {e}).") from None
        self.device = device
        self.identity = (_folder_state(path), str(dtype))
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
    def rows(self, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[torch.Tensor]:
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

    def score(self, batch: list[tuple[list[int], list[int]]], pad_id: int) -> list[tuple[float, int, bool]]:
        """Per item (summed log-prob, tokens, whether greedy decoding gives it), remembered per model."""
        keys = [(self.identity, tuple(c), tuple(t)) for c, t in batch]
        todo = [i for i, k in enumerate(keys) if k not in _SCORES]
        self.reused_seconds += sum(_SCORES[k][1] for k in keys if k in _SCORES)
        if todo:
            start = time.perf_counter()
            rows = self.rows([batch[i] for i in todo], pad_id)
            share = (time.perf_counter() - start) / len(todo)
            for i, r in zip(todo, rows):
                target = torch.tensor(batch[i][1])
                greedy = bool((r.argmax(-1) == target).all())
                _SCORES[keys[i]] = ((float(r.gather(1, target[:, None]).sum()), len(target), greedy), share)
        return [_SCORES[k][0] for k in keys]

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

    def stepper(self, prompts: list[list[int]], pad_id: int) -> _Stepper:
        return _Stepper(self, prompts, pad_id)


class _Stepper:
    """Greedy decoding state of one model over a left-padded batch, with its KV cache."""

    @torch.no_grad()
    def __init__(self, lm: _LM, prompts: list[list[int]], pad_id: int):
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


def _mix(logps: list[torch.Tensor], log_weights: torch.Tensor) -> torch.Tensor:
    """log sum_i w_i p_i: a single member with weight 1 returns its log-probs unchanged."""
    if len(logps) == 1:
        return logps[0] + log_weights[0]
    width = min(x.shape[-1] for x in logps)  # embeddings padded past the shared tokenizer differ in size
    logps = [x[..., :width] for x in logps]
    return torch.logsumexp(torch.stack(logps) + log_weights.view(-1, *([1] * logps[0].dim())), dim=0)


# ------------------------------------------------------------------ the interface


class Settings(BaseModel):
    """What every candidate is evaluated under: identical across candidates, part of the cache key.
    Also the `settings:` block of compare files."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    limit: int | None = 100
    split: str = "test"
    max_new_tokens: int = 48
    max_length: int = 512
    chat_template: bool = True
    batch_size: int = 8  # scoring: every position's logits are kept, so memory grows with it
    # generating: a decoding step reads every weight once whatever the batch, so wide batches pay
    # (SmolLM2-135M on 2 cores: 0.16 s a step at 8 rows, 0.27 s at 40)
    generate_batch_size: int = 64
    bootstrap: int = 1000
    device: str = "cpu"
    dtype: str = "float32"

    def key(self) -> dict:
        """The settings that change results (batch size and device do not, by design), and the
        version of the scoring code, so a change to how items are scored invalidates old results."""
        return {**self.model_dump(exclude={"batch_size", "generate_batch_size", "device", "bootstrap"}),
                "scoring": SCORING_VERSION}


class Candidate:
    """The one interface suites see. Subclasses set up `_lms` (loaded models) in `load()`."""

    kind = "candidate"
    mixes = False  # True: always mix members' distributions token by token (even one member)

    def __init__(self, name: str, settings: Settings):
        self.name = name
        self.settings = settings
        self.counters = Counters()
        self._tok = None
        self._lms: list[_LM] = []
        self.log_weights = torch.zeros(1)
        self.on_progress = None  # callable(done, total): the comparison's progress bar

    # --- identity, checked before any long work
    def fingerprint(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks that the candidate will load (configs, headers, tokenizers)."""

    def tokenizer_path(self) -> Path:
        raise NotImplementedError

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path())
        return self._tok

    def model_paths(self) -> list[Path]:
        raise NotImplementedError

    def load(self) -> None:
        if not self._lms:
            dtype = getattr(torch, self.settings.dtype)
            self._lms = [_LM(p, self.settings.device, dtype) for p in self.model_paths()]

    def unload(self) -> None:
        self._lms = []

    def params(self) -> tuple[int, int]:
        self.load()
        tot = [lm.params() for lm in self._lms]
        return sum(t for t, _ in tot), sum(a for _, a in tot)

    # --- text in, text out
    def format_prompt(self, prompt: str) -> str:
        """The prompt as training formats it (training.chat): the same text the experts learned on."""
        return chat.prompt_text(self.tokenizer, prompt, template=self.settings.chat_template)

    def _encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
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

    def _batches(self, n: int, lengths: list[int], size: int | None = None):
        order = sorted(range(n), key=lambda i: -lengths[i])
        bs = max(1, size or self.settings.batch_size)
        for s in range(0, n, bs):
            yield order[s : s + bs]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[LogProbs]:
        """Summed log-probability of each continuation after its context (batched, longest first)."""
        return [(s, n) for s, n, _ in self.loglikelihood_full(requests)]

    def loglikelihood_full(self, requests: list[tuple[str, str]]) -> list[tuple[float, int, bool]]:
        """(summed log-prob, tokens, whether greedy decoding would produce the continuation)."""
        self.load()
        enc = [self._encode(c, t) for c, t in requests]
        out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(enc)
        pad = self.tokenizer.pad_token_id
        start, reused = time.perf_counter(), self._reused()
        done = 0
        for idx in self._batches(len(enc), [len(c) + len(t) for c, t in enc]):
            batch = [enc[i] for i in idx]
            for i, lp in zip(idx, self._score_batch(batch, pad)):
                out[i] = lp
            self.counters.score_tokens += sum(len(c) + len(t) for c, t in batch) * len(self._lms)
            done += len(batch)
            self._report(done, len(enc))
        self.counters.score_seconds += time.perf_counter() - start + self._reused() - reused
        return out

    def _reused(self) -> float:
        return sum(lm.reused_seconds for lm in self._lms)

    def _score_batch(self, batch, pad) -> list[tuple[float, int, bool]]:
        if len(self._lms) == 1 and not self.mixes:
            return self._lms[0].score(batch, pad)
        per_member = [lm.rows(batch, pad) for lm in self._lms]
        out = []
        for j, (_, cont) in enumerate(batch):
            rows = _mix([m[j] for m in per_member], self.log_weights)
            target = torch.tensor(cont)
            greedy = bool((rows.argmax(-1) == target).all())
            out.append((float(rows.gather(1, target[:, None]).sum()), len(cont), greedy))
        return out

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
        return self._greedy(self._lms, self.log_weights, enc)

    def _greedy(self, lms: list[_LM], log_weights: torch.Tensor, prompts: list[list[int]]) -> list[str]:
        """Greedy decoding on the weighted mixture of `lms`' next-token distributions; a single
        model's answers are remembered, so best-of-N reuses what its members generated alone."""
        if len(lms) > 1 or self.mixes:
            return [self.tokenizer.decode(o, skip_special_tokens=True) for o in self._decode(lms, log_weights, prompts)]
        keys = [(lms[0].identity, tuple(p), self.settings.max_new_tokens) for p in prompts]
        todo = [i for i, k in enumerate(keys) if k not in _ANSWERS]
        for k in keys:
            if k in _ANSWERS:
                lms[0].reused_seconds += _ANSWERS[k][1]
                self.counters.gen_tokens += len(_ANSWERS[k][0])
        if todo:
            start = time.perf_counter()
            answers = self._decode(lms, log_weights, [prompts[i] for i in todo])
            share = (time.perf_counter() - start) / len(todo)
            for i, ids in zip(todo, answers):
                _ANSWERS[keys[i]] = (ids, share)
        return [self.tokenizer.decode(_ANSWERS[k][0], skip_special_tokens=True) for k in keys]

    def _decode(self, lms: list[_LM], log_weights: torch.Tensor, prompts: list[list[int]]) -> list[list[int]]:
        tok = self.tokenizer
        pad, stops = tok.pad_token_id, stop_ids(tok)
        steppers = [lm.stepper(prompts, pad) for lm in lms]
        done = torch.zeros(len(prompts), dtype=torch.bool)
        outs: list[list[int]] = [[] for _ in prompts]
        logp = _mix([s.logp for s in steppers], log_weights)
        for _ in range(self.settings.max_new_tokens):
            nxt = logp.argmax(-1)
            for i in range(len(prompts)):
                if not done[i]:
                    if int(nxt[i]) in stops:
                        done[i] = True
                    else:
                        outs[i].append(int(nxt[i]))
            self.counters.gen_tokens += int((~done).sum())
            if bool(done.all()):
                break
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            logp = _mix([s.step(nxt) for s in steppers], log_weights)
        return outs

    def routing(self, texts: list[str]) -> list[list[float]] | None:
        """Per layer, the share of routing slots each expert took on these texts (MoE only)."""
        self.load()
        if len(self._lms) != 1:
            return None
        tok = self.tokenizer
        enc = [tok(t, add_special_tokens=False)["input_ids"][: self.settings.max_length] or [tok.eos_token_id] for t in texts]
        counts = 0
        for s in range(0, len(enc), max(1, self.settings.batch_size)):
            c = self._lms[0].routing(enc[s : s + self.settings.batch_size], tok.pad_token_id)
            if c is None:
                return None
            counts = counts + c
        return (counts / counts.sum(-1, keepdim=True)).tolist() if enc else None


class ModelCandidate(Candidate):
    """A checkpoint folder: a source model, a merge, or a fused MoE."""

    kind = "checkpoint"

    def __init__(self, name: str, path: str | Path, settings: Settings):
        super().__init__(name, settings)
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

    def tokenizer_path(self) -> Path:
        return self.path

    def model_paths(self) -> list[Path]:
        return [self.path]


class RecipeCandidate(ModelCandidate):
    """A recipe, merged on first use into `cache/merges/<hash of recipe and inputs>`."""

    kind = "recipe"

    def __init__(self, name: str, recipe: str | Path, cache_dir: Path, settings: Settings):
        self.recipe_path = Path(recipe)
        self.cache_dir = cache_dir
        self._fp: str | None = None
        super().__init__(name, cache_dir, settings)

    def check(self) -> None:
        from merge_lab.merge.planner import make_plan
        from merge_lab.merge.recipe import load_recipe

        plan = make_plan(load_recipe(self.recipe_path))
        inputs = sorted({str(p) for p in _plan_inputs(plan)})
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


def _plan_inputs(plan) -> list[Path]:
    out = []
    for x in plan.inputs:
        p = getattr(x, "path", x)
        out.append(Path(p))
    return out


class TokenEnsemble(Candidate):
    """Weighted average of the members' next-token probabilities (members share one tokenizer)."""

    kind = "token_ensemble"
    mixes = True

    def __init__(self, name: str, members: list[ModelCandidate], weights: list[float] | None, settings: Settings):
        super().__init__(name, settings)
        if not members:
            raise MergeLabError(f"ensemble '{name}' has no members.")
        weights = weights or [1.0] * len(members)
        if len(weights) != len(members) or any(w <= 0 for w in weights):
            raise MergeLabError(f"ensemble '{name}': give one positive weight per member ({len(members)}).")
        self.members = members
        self.weights = [w / sum(weights) for w in weights]
        self.log_weights = torch.log(torch.tensor(self.weights, dtype=torch.float32))

    def check(self) -> None:
        for m in self.members:
            m.check()
        check_shared_tokenizer(self.name, self.members)

    def fingerprint(self) -> str:
        parts = [f"{m.fingerprint()}:{w:.6f}" for m, w in zip(self.members, self.weights)]
        return hashlib.sha256(("token_ensemble|" + "|".join(parts)).encode()).hexdigest()[:16]

    def tokenizer_path(self) -> Path:
        return self.members[0].tokenizer_path()

    def model_paths(self) -> list[Path]:
        return [p for m in self.members for p in m.model_paths()]


def check_shared_tokenizer(name: str, members: list[Candidate]) -> None:
    first = members[0].tokenizer
    for m in members[1:]:
        if not same_tokenizer(first, m.tokenizer):
            raise MergeLabError(
                f"ensemble '{name}': members '{members[0].name}' and '{m.name}' have different tokenizers "
                f"({len(first.get_vocab())} vs {len(m.tokenizer.get_vocab())} tokens, or different ids). "
                "Output-level ensembles need one shared vocabulary; use fine-tunes of the same base."
            )


# ------------------------------------------------------------------ scorers (judge, reward model)


class Scorer:
    """Scores (prompt, response) pairs; higher is better. Used by best-of-N and the win rate."""

    name = "scorer"

    def fingerprint(self) -> str:
        raise NotImplementedError

    def check(self) -> None:
        pass

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError


class JudgeScorer(Scorer):
    """Mean per-token log-likelihood of the response under a judge checkpoint (length-fair)."""

    name = "judge log-likelihood"

    def __init__(self, judge: Candidate):
        self.judge = judge

    def fingerprint(self) -> str:
        return "judge:" + self.judge.fingerprint()

    def check(self) -> None:
        self.judge.check()

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

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        from transformers import AutoModelForSequenceClassification

        if self._model is None:
            self._tok = self._tok or load_tokenizer(self.path)
            self._model = AutoModelForSequenceClassification.from_pretrained(str(self.path)).eval()
            self._model.config.pad_token_id = self._tok.pad_token_id
        out = []
        for p, r in zip(prompts, responses):
            msgs = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            text = (self._tok.apply_chat_template(msgs, tokenize=False) if getattr(self._tok, "chat_template", None)
                    else f"{p}\n{r}")
            ids = self._tok(text, return_tensors="pt", truncation=True, max_length=self.settings.max_length)
            out.append(float(self._model(**ids).logits[0, 0]))
        return out


class BestOfN(Candidate):
    """Each member generates; the scorer keeps the best answer. For likelihood suites it scores a
    continuation by the sequence-level mixture log(mean_i p_i(continuation)) of its members."""

    kind = "best_of_n"

    def __init__(self, name: str, members: list[ModelCandidate], scorer: Scorer, settings: Settings):
        super().__init__(name, settings)
        if len(members) < 2:
            raise MergeLabError(f"best-of-N '{name}' needs at least two members.")
        self.members = members
        self.scorer = scorer

    def check(self) -> None:
        for m in self.members:
            m.check()
        check_shared_tokenizer(self.name, self.members)
        self.scorer.check()

    def fingerprint(self) -> str:
        parts = [m.fingerprint() for m in self.members] + [self.scorer.fingerprint()]
        return hashlib.sha256(("best_of_n|" + "|".join(parts)).encode()).hexdigest()[:16]

    def tokenizer_path(self) -> Path:
        return self.members[0].tokenizer_path()

    def model_paths(self) -> list[Path]:
        return [p for m in self.members for p in m.model_paths()]

    def _score_batch(self, batch, pad) -> list[tuple[float, int, bool]]:
        per_member = [lm.score(batch, pad) for lm in self._lms]
        out = []
        for j, (_, cont) in enumerate(batch):
            seq = torch.tensor([m[j][0] for m in per_member], dtype=torch.float64)
            mixed = float(torch.logsumexp(seq, 0) - torch.log(torch.tensor(float(len(seq)))))
            out.append((mixed, len(cont), any(m[j][2] for m in per_member)))
        return out

    def _generate_batch(self, enc: list[list[int]], prompts: list[str]) -> list[str]:
        answers = [self._greedy([lm], torch.zeros(1), enc) for lm in self._lms]
        scores = [self.scorer.score(prompts, a) for a in answers]
        return [answers[max(range(len(answers)), key=lambda m: scores[m][i])][i] for i in range(len(enc))]


def describe(c: Candidate) -> dict:
    """A JSON-able description for results.json."""
    d = {"kind": c.kind, "fingerprint": c.fingerprint()}
    if isinstance(c, ModelCandidate) and not isinstance(c, RecipeCandidate):
        d["path"] = str(c.path)
    if isinstance(c, RecipeCandidate):
        d["recipe"] = str(c.recipe_path)
    if isinstance(c, TokenEnsemble):
        d["members"] = [m.name for m in c.members]
        d["weights"] = c.weights
    if isinstance(c, BestOfN):
        d["members"] = [m.name for m in c.members]
        d["scorer"] = c.scorer.name
    return json.loads(json.dumps(d))
