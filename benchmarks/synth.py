"""Synthetic Llama-shaped bf16 checkpoints, written straight with safetensors.

No transformers model is instantiated: each tensor is drawn from a generator seeded by (family
seed, tensor name), so a fine-tune (base + small noise) is made tensor by tensor without holding
the base in memory, and regenerating a set gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of a LlamaForCausalLM (untied embeddings), in the order HF saves them."""
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (self.kv_heads * hd, h)),
                (p + "self_attn.v_proj.weight", (self.kv_heads * hd, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


# Llama-3 vocabulary; 0.5B ~ a narrow Llama-3.2, 1.5B = Llama-3.2-1B's shape with untied embeddings.
SHAPES = {
    "tiny": Shape("tiny", 64, 176, 2, 4, 2, 1000),
    "0.5B": Shape("0.5B", 1024, 4096, 16, 16, 8, 128256),
    "1.5B": Shape("1.5B", 2048, 8192, 16, 32, 8, 128256),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _gen(seed: int, name: str) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") & (2**62))
    return g


def _tensor(name: str, shape: tuple[int, ...], variant: int) -> torch.Tensor:
    """Base weights (variant 0), or base + noise of 10% of the weights' scale (fine-tune `variant`)."""
    if name.endswith("norm.weight"):
        t = 1.0 + 0.05 * torch.randn(shape, generator=_gen(0, name))
    else:
        t = torch.randn(shape, generator=_gen(0, name)).mul_(0.02)
    if variant:
        t.add_(torch.randn(shape, generator=_gen(variant, name)), alpha=0.002)
    return t.to(torch.bfloat16)


def write_checkpoint(folder: Path, shape: Shape, variant: int, shard_bytes: int) -> Path:
    """One model folder: config.json, shards of at most `shard_bytes`, and the index."""
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = 2 * _numel(s)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, s))
        size += nbytes
    weight_map = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: _tensor(n, s, variant) for n, s in group}, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n, _ in group})
    total = sum(2 * _numel(s) for _, s in shape.tensors())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(shape.config(), indent=2))
    return folder


def ensure_family(root: Path, shape: Shape, n_finetunes: int = 2, shard_bytes: int = 1 << 30) -> list[Path]:
    """base + fine-tunes under root/<shape>/; reused when already complete (the stamp file)."""
    out = root / shape.name
    folders = [out / "base"] + [out / f"ft{i}" for i in range(1, n_finetunes + 1)]
    for variant, folder in enumerate(folders):
        stamp = folder / ".complete"
        if stamp.exists() and stamp.read_text() == f"{shape}/{shard_bytes}":
            continue
        for f in folder.glob("*") if folder.exists() else []:
            f.unlink()
        write_checkpoint(folder, shape, variant, shard_bytes)
        stamp.write_text(f"{shape}/{shard_bytes}")
    return folders
