"""Tiny experts and labelled data for tests and examples (no network, a few KB each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from merge_lab.core.architecture import MLP_ROLES, classify
from merge_lab.testing.tiny import save_tiny_tokenizer


def _load(base: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)


def tiny_base(path: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny base of any family merge_lab.testing.tiny makes, plus qwen3 (q/k norms, tied embeddings)."""
    from merge_lab.testing.tiny import make_checkpoint

    if arch != "qwen3":
        return make_checkpoint(path, arch, seed=seed, shards=False)
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(path))
    save_tiny_tokenizer(path, cfg.vocab_size)
    return Path(path)


def ffn_expert(base: str | Path, path: str | Path, seed: int, noise: float = 0.05, also: str | None = None) -> Path:
    """The base with seeded noise on its FFN weights only (and on tensors whose name contains `also`)."""
    model = _load(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if classify(name).role in MLP_ROLES or (also and also in name):
                p.add_(noise * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path, model.config.vocab_size)
    return Path(path)


def lora_expert(base: str | Path, path: str | Path, seed: int, r: int = 4, alpha: float = 16,
                rslora: bool = False, targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj"),
                merged: str | Path | None = None) -> Path:
    """A PEFT LoRA adapter on the base with random A and B; with `merged`, also the merged full model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=list(targets), lora_dropout=0.0)
    model = get_peft_model(_load(base), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # (PEFT starts an embedding's A at zero)
                p.normal_(0, 0.05)
    model.save_pretrained(str(path))
    if merged is not None:
        full = model.merge_and_unload()
        full.save_pretrained(str(merged))
        save_tiny_tokenizer(merged, full.config.vocab_size)
    return Path(path)


# Each label's prompts use their own characters, so the label is learnable from the tokens.
_ALPHABETS = ("abcdefg", "nopqrst", "0123456", "HIJKLMN")


def labelled_jsonl(path: str | Path, labels: list[str], per_label: int = 16, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = []
    for k, label in enumerate(labels):
        chars = _ALPHABETS[k % len(_ALPHABETS)]
        for _ in range(per_label):
            prompt = "".join(rng.choice(chars) for _ in range(rng.randint(6, 12)))
            response = "".join(rng.choice(chars) for _ in range(rng.randint(3, 6)))
            rows.append({"prompt": prompt, "response": response, "label": label})
    rng.shuffle(rows)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)
