"""Tiny checkpoints, tokenizers and recipes made on the fly: a few kilobytes, no network."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from merge_lab.core.checkpoint import Checkpoint

ARCHITECTURES = ("llama", "mistral", "qwen2")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(arch: str = "llama", vocab_size: int = 96, layers: int = 2, tie: bool = False):
    """A few-kilobyte config of one of the common decoder families."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**common)


def save_tiny_tokenizer(path: str | Path, vocab_size: int = 96) -> None:
    """A byte-level-ish character tokenizer with a ChatML template, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars[: vocab_size - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def make_checkpoint(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: bool = True,
    vocab_size: int = 96,
    base: str | Path | None = None,
    noise: float = 0.02,
    tie: bool = False,
    tokenizer: bool = True,
    layers: int = 2,
) -> Path:
    """Save a tiny random model (several safetensors shards by default).

    With `base`, the model is that checkpoint plus seeded noise of scale `noise` on every tensor:
    a stand-in for a fine-tune of the base.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, layers=layers, tie=tie)
    model = AutoModelForCausalLM.from_config(config)
    if base is not None:
        src = Checkpoint(base)
        g = torch.Generator().manual_seed(seed + 1000)
        sd = model.state_dict()
        with torch.no_grad():
            for name, t in sd.items():
                if name not in src:
                    continue
                b = src.get(name).to(torch.float32)
                rows = min(b.shape[0], t.shape[0]) if b.dim() else 1
                if b.shape[1:] == t.shape[1:]:  # equal shapes, or vocabularies of different sizes
                    t[:rows] = b[:rows] + noise * torch.randn(b[:rows].shape, generator=g)
    model = model.to(dtype)
    model.save_pretrained(str(path), max_shard_size="20KB" if shards else "10GB")
    if tokenizer:
        save_tiny_tokenizer(path, vocab_size)
    return path


def logits(path: str | Path, text_ids: list[int] | None = None) -> torch.Tensor:
    """Logits of a checkpoint on a fixed token sequence, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([text_ids or [1, 5, 9, 17, 33, 40, 2]])
    with torch.no_grad():
        return model(ids).logits


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n).clone() for n in ckpt.tensors}
