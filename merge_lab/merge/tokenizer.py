"""The output vocabulary of a merge: `tokenizer_source` / `tokenizer:` and `chat_template:`, as mergekit builds them.

`base` (or a model among the recipe's) gives the output that model's tokenizer; `union` gives the
base's tokenizer plus every token another model has (its plain tokens first, then its added
tokens, each once); `tokens:` adds tokens still missing. Each model's vocabulary then maps every
output token to that model's own row (-1 where it lacks the token), which merge.embeddings uses to
re-index the embedding and LM-head rows. Made from tokenizer files and configs only, so
`merge-lab validate` checks all of it before a tensor is read.

Tokenizer files are a stranger's input: only the checked side files of a folder (core.writer:
inside the folder, regular files) are copied to a private folder and loaded from there by
transformers, without remote code; nothing is unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.writer import side_files
from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import Recipe, TokenEmbedding

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a tokenizer
NOT_TOKENIZER = ("generation_config.json",)  # side files that stay as copied when the tokenizer is rewritten

# Chat templates by name (our own renderings of the well-known formats).
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>"
        "\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}


def load_tokenizer(ckpt: Checkpoint) -> Any | None:
    """The tokenizer in `ckpt`'s folder (a transformers fast tokenizer), or None when it has none.

    Loaded from a private copy of its checked side files and its checked config, so no path the
    folder names is followed and no other file is read; remote code is never run."""
    files = side_files(ckpt.path)
    if not any(name in files for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="merge-lab-tok-") as tmp:
        for name, real in files.items():
            shutil.copyfile(real, Path(tmp) / name)
        (Path(tmp) / "config.json").write_text(json.dumps(ckpt.config))
        try:
            return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, use_fast=True)
        except Exception as e:  # the library's own errors name what it could not parse
            raise MergeLabError(
                f"{ckpt.path}: its tokenizer files do not load ({type(e).__name__}: {str(e)[:200]}). "
                "Re-download or re-save the tokenizer (tokenizer.json) with transformers."
            ) from None


def fresh_copy(tokenizer: Any) -> Any:
    """A copy of `tokenizer` that changing leaves the original as it was (save and reload)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="merge-lab-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, use_fast=True)


def embedding_rows(ckpt: Checkpoint) -> int:
    """The rows a model's vocabulary may index: config.json's vocab_size."""
    size = ckpt.config.get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise MergeLabError(f"{ckpt.path / 'config.json'}: needs a positive 'vocab_size' to align vocabularies.")
    return size


def usable_vocab(tokenizer: Any, ckpt: Checkpoint) -> dict[str, int]:
    """token -> id for the tokens of `ckpt`'s tokenizer that have an embedding row."""
    rows = embedding_rows(ckpt)
    return {tok: i for tok, i in tokenizer.get_vocab().items() if i < rows}


@dataclass
class OutputVocabulary:
    """The output tokenizer and how each member's rows map to it.

    members: every model whose vocabulary tensors take part (the recipe's models, then the base
    if it is not among them), as mergekit gathers them; permutations[m][i]: member m's row for
    output token i, or -1."""

    tokenizer: Any
    vocab: dict[str, int]
    rows: int  # output vocabulary rows (len(vocab), padded to pad_to_multiple_of)
    members: list[Checkpoint]
    refs: list[str]  # how the recipe names each member
    base_index: int | None
    permutations: list[list[int]]
    originals: list[dict[str, int]]  # each member's own vocabulary (for `model_token` sources)
    tokens: dict[str, TokenEmbedding]

    def member(self, recipe: Recipe, ref: str, where: str) -> int:
        """The index of the member `ref` names (by identity), or an error at `where`."""
        return member_index(recipe, self.refs, ref, where)


def member_index(recipe: Recipe, refs: list[str], ref: str, where: str) -> int:
    """The index in `refs` of the model `ref` names (by identity, not spelling), or an error at `where`."""
    for i, r in enumerate(refs):
        if recipe.model_identity(r) == recipe.model_identity(ref):
            return i
    raise MergeLabError(f"{where}: '{ref}' is not among the recipe's models ({', '.join(refs)}); name one of them.")


def _member_tokenizers(members: list[Checkpoint], first: int) -> list[Any]:
    """Each member's tokenizer; one without tokenizer files is taken to share the first's (as mergekit does)."""
    lead = load_tokenizer(members[first])
    if lead is None:
        raise MergeLabError(
            f"{members[first].path}: has no tokenizer files ({', '.join(TOKENIZER_FILES)}), which the output "
            "vocabulary is built from. Add them (save the tokenizer with transformers) or drop the tokenizer keys."
        )
    out = []
    for i, ckpt in enumerate(members):
        tok = lead if i == first else load_tokenizer(ckpt)
        out.append(tok if tok is not None else lead)
    return out


def _union(lead: Any, lead_vocab: dict[str, int], vocabs: list[tuple[Any, dict[str, int]]]) -> Any:
    """The lead tokenizer plus every other token of `vocabs` (each member's tokenizer, usable
    vocabulary), in member order and each member's id order: plain tokens, then added tokens."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, vocab in vocabs:
        decoder = {i: info for i, info in tok.added_tokens_decoder.items() if info.content in vocab}
        names = {info.content for info in decoder.values()}
        for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if token not in names:
                plain.setdefault(token, None)
        for _, info in sorted(decoder.items()):
            added.setdefault(info.content, info)
    out = fresh_copy(lead)
    for token in plain:
        if token not in added and token not in lead_vocab:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def build_output_vocabulary(recipe: Recipe, members: list[Checkpoint], refs: list[str],
                            base_index: int | None) -> OutputVocabulary:
    """The output tokenizer for the recipe's tokenizer keys and every member's permutation to it."""
    spec = recipe.tokenizer
    source = spec.source if spec is not None else recipe.tokenizer_source
    assert source is not None
    where = recipe.where("tokenizer", "source") if spec is not None else recipe.where("tokenizer_source")
    first = base_index if base_index is not None else 0
    tokenizers = _member_tokenizers(members, first)
    vocabs = [usable_vocab(t, c) for t, c in zip(tokenizers, members)]
    extra = [t for t, i in tokenizers[first].get_vocab().items() if i >= embedding_rows(members[first])]
    if extra:
        raise MergeLabError(
            f"{members[first].path}: its tokenizer has {len(extra)} token(s) beyond config.json's vocab_size "
            f"{embedding_rows(members[first])} (e.g. {extra[0]!r}), which have no embedding row; fix vocab_size "
            "or the tokenizer before merging."
        )
    if source == "union":
        out = _union(tokenizers[first], vocabs[first], list(zip(tokenizers, vocabs)))
    elif source == "base":
        out = fresh_copy(tokenizers[first])
    else:
        i = member_index(recipe, refs, source, where)
        out = fresh_copy(tokenizers[i])
    tokens = dict(spec.tokens or {}) if spec is not None else {}
    have = set(out.get_vocab())
    for token in tokens:
        if token not in have:
            out.add_tokens(token)
            have.add(token)
    vocab = out.get_vocab()
    rows = len(vocab)
    multiple = spec.pad_to_multiple_of if spec is not None else None
    if multiple and rows % multiple:
        rows += multiple - rows % multiple
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(vocab))):
        raise MergeLabError(f"{where}: the output tokenizer's ids are not 0 .. {len(vocab) - 1}; its files are inconsistent.")
    permutations = [[v.get(token, -1) for token, _ in by_id] for v in vocabs]
    return OutputVocabulary(out, vocab, rows, members, refs, base_index, permutations, vocabs, tokens)


def chat_template(recipe: Recipe, tokenizers: list[Any]) -> str | None:
    """The recipe's `chat_template:` as jinja text: `auto` takes the template most of the models
    carry (None if none does), a name one of NAMED_TEMPLATES, anything else must be a template."""
    value = recipe.chat_template
    if not value:
        return None
    if value == "auto":
        found = []
        for tok in tokenizers:
            t = tok.chat_template if tok is not None else None
            t = t.get("default") if isinstance(t, dict) else t
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise MergeLabError(
            f"{recipe.where('chat_template')}: {value!r} is neither 'auto', a template name "
            f"({', '.join(NAMED_TEMPLATES)}) nor a jinja template."
        )
    return value


def write_tokenizer(tokenizer: Any, side_source: Path | None, dest: Path) -> None:
    """Save `tokenizer` into the output folder `dest`, with the side files of `side_source` that
    are no part of a tokenizer (generation_config.json): stale tokenizer files are never mixed in."""
    if side_source is not None:
        for name, real in side_files(side_source).items():
            if name in NOT_TOKENIZER:
                shutil.copyfile(real, dest / name)
    tokenizer.save_pretrained(str(dest))



def output_tokenizer(recipe: Recipe, vocab: OutputVocabulary | None, side_from: Path,
                     members: list[Checkpoint]) -> Any | None:
    """The tokenizer the output folder gets written (None: the side files are copied as they are):
    the built vocabulary's, or with only `chat_template:` the copied folder's, with the template set."""
    if vocab is None and not recipe.chat_template:
        return None
    tok = vocab.tokenizer if vocab is not None else load_tokenizer(Checkpoint(side_from))
    if tok is None:
        raise MergeLabError(f"{recipe.where('chat_template')}: {side_from} has no tokenizer files to give the "
                            "chat template to; add them or drop 'chat_template:'.")
    if recipe.chat_template:
        template = chat_template(recipe, [load_tokenizer(c) for c in members])
        if template is not None:
            tok.chat_template = template
    return tok
