"""Toy checkpoints with known behaviour, for tests of metrics and reports (and for plugin authors).

`make_bigram_checkpoint` writes a real one-layer Llama whose attention and MLP outputs are zero,
so the residual stream is the current token's embedding: with one-hot embeddings, the LM head is
a bigram transition table. Give it `phrase="I won't"` and after the chat template's "assistant\\n"
it answers exactly that (a refuser); `phrase="Sure"` makes a complier. Metrics on such models have
orderings known in advance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from merge_lab.testing.tiny import save_tiny_tokenizer

VOCAB = 96


def save_toy_tokenizer(path: str | Path) -> None:
    """merge_lab.testing.tiny's character tokenizer, decoding without spaces between characters."""
    from tokenizers import Tokenizer, decoders

    save_tiny_tokenizer(path, VOCAB)
    file = Path(path) / "tokenizer.json"
    tok = Tokenizer.from_file(str(file))
    tok.decoder = decoders.Fuse()
    tok.save(str(file))


def make_bigram_checkpoint(path: str | Path, phrase: str, strength: float = 8.0, start: str = "\n") -> Path:
    """A tiny Llama that, after the character `start`, spells `phrase` and then ends the turn.

    The phrase's transitions must not conflict (each character followed by one character only)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    save_toy_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [tok.convert_tokens_to_ids(start)] + [tok.convert_tokens_to_ids(c) for c in phrase] + [end]
    nxt: dict[int, int] = {}
    for a, b in zip(ids, ids[1:]):
        if nxt.setdefault(a, b) != b:
            raise ValueError(f"phrase {phrase!r}: character {tok.convert_ids_to_tokens(a)!r} has two successors")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    scale = math.sqrt(VOCAB)  # RMSNorm of a one-hot row of any size gives sqrt(hidden)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB) * 10)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(VOCAB, VOCAB)
        for a, b in nxt.items():
            head[b, a] = strength / scale
        model.lm_head.weight.copy_(head)
    model.save_pretrained(str(path))
    return path


def make_reward_checkpoint(path: str | Path, likes: str, dislikes: str, strength: float = 5.0) -> Path:
    """A tiny Llama reward model (sequence classification, one score) that scores an exchange by its
    last character: +strength when it is `likes`, -strength when `dislikes`, 0 otherwise. Its
    tokenizer has no chat template, so the scored text ends with the answer itself."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    path = Path(path)
    save_toy_tokenizer(path)
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(path))
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=VOCAB, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, num_labels=1, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    scale = math.sqrt(VOCAB)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(VOCAB) * 10)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(1, VOCAB)
        head[0, tok.convert_tokens_to_ids(likes)] = strength / scale
        head[0, tok.convert_tokens_to_ids(dislikes)] = -strength / scale
        model.score.weight.copy_(head)
    model.save_pretrained(str(path))
    return path
