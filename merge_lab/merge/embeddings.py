"""Embedding and LM-head rows re-indexed to the output vocabulary, as mergekit's PermutedVocabulary does.

For each vocabulary tensor, member m's output row i is its own row of token i when it has that
token (and `tokens:` does not force another source); otherwise every member gets the token's
default row: the `tokens:` source when one is given ({kind: zero}, a model's row of the token,
or a model's row of another token), else the row of the one model that has it, the base's when
the base has it, the mean of the models that have it, or zeros when none does. Rows padded on
by `pad_to_multiple_of` are the mean of the member's other rows.

`PermutedRows` presents one member's re-indexed tensor to the engine as a checkpoint does (info,
read of a row range), so the merge streams row blocks as for any tensor: a block reads only the
input rows it needs. The few default rows and the padding mean are computed on first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from merge_lab.core.checkpoint import Checkpoint, TensorInfo
from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import ModelTokenEmbedding, Recipe, ZeroEmbedding
from merge_lab.merge.tokenizer import OutputVocabulary

GAP_ROWS = 64  # input rows closer than this are read in one span
BLOCK_ROWS = 4096  # rows per read when summing a whole tensor for the padding mean

Source = tuple[int, int]  # (member, input row)


def default_sources(recipe: Recipe, out: OutputVocabulary, tensor_rows: list[int]) -> dict[int, list[Source]]:
    """Output token id -> the rows whose mean is its default row (empty: zeros), for every token
    some member lacks or `tokens:` forces. tensor_rows: each member's rows of the tensor."""
    perms = out.permutations
    defaults: dict[int, list[Source]] = {}
    for token, i in out.vocab.items():
        cfg = out.tokens.get(token)
        if not (cfg is not None and cfg.force) and all(p[i] >= 0 for p in perms):
            continue
        if cfg is not None and isinstance(cfg.source, ZeroEmbedding):
            defaults[i] = []
            continue
        if cfg is not None and cfg.source is not None:
            where = recipe.where("tokenizer", "tokens", token, "source")
            defaults[i] = [_explicit(recipe, out, token, i, cfg.source, tensor_rows, where)]
            continue
        present = [m for m, p in enumerate(perms) if p[i] >= 0]
        if len(present) == 1 or (out.base_index is not None and out.base_index in present):
            m = present[0] if len(present) == 1 else out.base_index
            assert m is not None
            defaults[i] = [(m, perms[m][i])]
        else:
            defaults[i] = [(m, perms[m][i]) for m in present]
    return defaults


def _explicit(recipe: Recipe, out: OutputVocabulary, token: str, i: int, source: ModelTokenEmbedding | str,
              tensor_rows: list[int], where: str) -> Source:
    """The (member, row) a `tokens:` source names, checked against that member's vocabulary."""
    if isinstance(source, str):
        m = out.member(recipe, source, where)
        row = out.permutations[m][i]
        if row < 0:
            raise MergeLabError(f"{where}: {out.refs[m]} has no token {token!r} to take its row from; name a model that "
                                "has it, or use {kind: model_token, model, token} or {kind: zero}.")
        return m, row
    m = out.member(recipe, source.model, where)
    if source.token is not None:
        row = out.originals[m].get(source.token, -1)
        if row < 0:
            raise MergeLabError(f"{where}: {out.refs[m]}'s vocabulary has no token {source.token!r}.")
    else:
        assert source.token_id is not None
        row = source.token_id
    if row >= tensor_rows[m]:
        raise MergeLabError(f"{where}: token id {row} is beyond the {tensor_rows[m]} rows of {out.refs[m]}.")
    return m, row


@dataclass
class VocabularyRows:
    """One vocabulary tensor of every member, re-indexed: the shared default rows and a view per member."""

    name: str
    members: list[Checkpoint]
    permutations: list[list[int]]
    force: frozenset[int]  # output ids whose default row wins even where a member has the token
    defaults: dict[int, list[Source]]
    tokens: int  # output tokens (rows beyond are padding)
    rows: int

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._default_rows: dict[int, torch.Tensor] | None = None
        self._pad_rows: dict[int, torch.Tensor] = {}

    def view(self, m: int) -> PermutedRows:
        return PermutedRows(self, m)

    def row_shape(self) -> tuple[int, ...]:
        return self.members[0].info(self.name).shape[1:]

    def default_rows(self) -> dict[int, torch.Tensor]:
        """Each default row, float32, read once for all members."""
        with self._lock:
            if self._default_rows is None:
                values = {}
                for i, sources in self.defaults.items():
                    row = torch.zeros(self.row_shape(), dtype=torch.float32)
                    for m, r in sources:
                        row = row + self.members[m].read(self.name, (r, r + 1), torch.float32)[0]
                    values[i] = row / len(sources) if sources else row
                self._default_rows = values
            return self._default_rows

    def source_rows(self, m: int, start: int, stop: int) -> list[int]:
        """Member m's input row for each output token in [start, stop), -1 where the default row goes."""
        p = self.permutations[m]
        return [-1 if (p[i] < 0 or i in self.force) else p[i] for i in range(start, stop)]

    def token_rows(self, m: int, start: int, stop: int) -> torch.Tensor:
        """Member m's re-indexed rows [start, stop) of the output tokens (no padding), float32."""
        wanted = torch.tensor(self.source_rows(m, start, stop), dtype=torch.long)
        out = torch.empty((stop - start, *self.row_shape()), dtype=torch.float32)
        missing = (wanted < 0).nonzero().flatten().tolist()
        if missing:
            defaults = self.default_rows()
            for k in missing:
                out[k] = defaults[start + k]
        rows, ks = torch.sort(wanted)
        ks = ks[rows >= 0]
        rows = rows[rows >= 0]
        if not len(rows):
            return out
        # spans of nearby input rows, each read once: a cut wherever the gap reaches GAP_ROWS
        cuts = [0, *((rows[1:] - rows[:-1] >= GAP_ROWS).nonzero().flatten() + 1).tolist(), len(rows)]
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi = int(rows[a]), int(rows[b - 1]) + 1
            span = self.members[m].read(self.name, (lo, hi), torch.float32)
            out[ks[a:b]] = span[rows[a:b] - lo]
        return out

    def pad_row(self, m: int) -> torch.Tensor:
        """The mean of member m's re-indexed token rows: the value of its padding rows."""
        with self._lock:
            cached = self._pad_rows.get(m)
        if cached is not None:
            return cached
        total = torch.zeros(self.row_shape(), dtype=torch.float64)
        for start in range(0, self.tokens, BLOCK_ROWS):
            total += self.token_rows(m, start, min(self.tokens, start + BLOCK_ROWS)).sum(0, dtype=torch.float64)
        value = (total / self.tokens).to(torch.float32)
        with self._lock:
            self._pad_rows[m] = value
        return value


class PermutedRows:
    """One member's vocabulary tensor re-indexed to the output vocabulary, read as a Checkpoint is."""

    def __init__(self, rows: VocabularyRows, member: int) -> None:
        self.rows = rows
        self.member = member
        self.source = rows.members[member]

    @property
    def path(self) -> Path:
        return self.source.path

    def __repr__(self) -> str:
        return f"PermutedRows({str(self.path)!r}, {self.rows.name!r})"

    def info(self, name: str) -> TensorInfo:
        base = self.source.info(name)
        shape = (self.rows.rows, *base.shape[1:])
        numel = 1
        for d in shape:
            numel *= d
        return replace(base, shape=shape, begin=0, end=numel * base.dtype.itemsize)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The re-indexed rows [start, stop) (or all), converted to `dtype`, into `out` if given."""
        if name != self.rows.name:
            raise MergeLabError(f"internal: {self!r} read as '{name}'")
        start, stop = rows if rows is not None else (0, self.rows.rows)
        tokens = self.rows.tokens
        parts = []
        if start < tokens:
            parts.append(self.rows.token_rows(self.member, start, min(stop, tokens)))
        if stop > tokens:
            pad = self.rows.pad_row(self.member)
            parts.append(pad.expand(stop - max(start, tokens), *pad.shape))
        value = torch.cat(parts) if len(parts) > 1 else parts[0]
        want = dtype if dtype is not None else self.source.info(name).dtype
        if out is None:
            return value.to(want)
        view = out.reshape(-1)[: value.numel()].view(value.shape)
        return view.copy_(value)


def vocabulary_rows(recipe: Recipe, out: OutputVocabulary, name: str) -> VocabularyRows:
    """The re-indexed rows of tensor `name` (embed_tokens or lm_head) of every member, checked
    against each member's tokenizer: a token id past a tensor's rows is an error, before any read."""
    tensor_rows = []
    for ckpt, p in zip(out.members, out.permutations):
        n = ckpt.info(name).shape[0]
        top = max(p, default=-1)
        if top >= n:
            raise MergeLabError(
                f"{ckpt.path}: its tokenizer gives id {top} but tensor '{name}' has {n} rows; config.json's "
                "vocab_size and the weights disagree. Fix vocab_size or re-save the model."
            )
        tensor_rows.append(n)
    defaults = default_sources(recipe, out, tensor_rows)
    force = frozenset(out.vocab[t] for t, cfg in out.tokens.items() if cfg.force)
    return VocabularyRows(name, out.members, out.permutations, force, defaults, len(out.vocab), out.rows)
