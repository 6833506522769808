"""Tensor roles, described as data: which tensor is an embedding, attention, MLP, norm or head.

One table of name patterns covers the decoder families that share the Llama naming (llama,
mistral, qwen2, qwen3, gemma, phi3 ...); adding a family means adding patterns, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    ATTENTION = "attention"
    MLP_GATE = "mlp_gate"
    MLP_UP = "mlp_up"
    MLP_DOWN = "mlp_down"
    NORM = "norm"
    OTHER = "other"


# First match wins. Patterns are searched in the tensor name.
ROLE_PATTERNS: list[tuple[Role, re.Pattern]] = [
    (Role.EMBEDDING, re.compile(r"(embed_tokens|wte|word_embeddings)\.weight$")),
    (Role.LM_HEAD, re.compile(r"(^|\.)lm_head\.weight$")),
    (Role.ATTENTION, re.compile(r"\.(self_attn|attention|attn)\.")),
    (Role.MLP_GATE, re.compile(r"\.mlp\.(gate_proj|w1)\.")),
    (Role.MLP_UP, re.compile(r"\.mlp\.(up_proj|w3)\.")),
    (Role.MLP_DOWN, re.compile(r"\.mlp\.(down_proj|w2)\.")),
    (Role.NORM, re.compile(r"norm[^.]*\.weight$|norm[^.]*\.bias$")),
]
# The families the table above describes: model_type -> the prefix of its transformers classes.
# A checkpoint of another family (GPT-2's transposed Conv1D weights, custom code) would be merged
# with roles the table gets wrong, so its config.json is refused (core.model_config).
FAMILIES: dict[str, str] = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "gemma2": "Gemma2",
    "phi3": "Phi3",
    "mixtral": "Mixtral",  # the MoE layouts merge_lab's h3_moe writes
    "qwen2_moe": "Qwen2Moe",
    "qwen3_moe": "Qwen3Moe",
}
ARCHITECTURE_CLASSES: frozenset[str] = frozenset(
    f"{prefix}{head}" for prefix in FAMILIES.values() for head in ("ForCausalLM", "ForSequenceClassification")
)
LAYER_PATTERN = re.compile(r"\.layers\.(\d+)\.")
MLP_ROLES = (Role.MLP_GATE, Role.MLP_UP, Role.MLP_DOWN)


@dataclass(frozen=True)
class TensorRole:
    role: Role
    layer: int | None  # None for tensors outside the decoder layers


def classify(name: str) -> TensorRole:
    m = LAYER_PATTERN.search(name)
    layer = int(m.group(1)) if m else None
    for role, pattern in ROLE_PATTERNS:
        if pattern.search(name):
            return TensorRole(role, layer)
    return TensorRole(Role.OTHER, layer)


def num_layers(config: dict) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if key in config:
            return int(config[key])
    text = config.get("text_config")
    return num_layers(text) if isinstance(text, dict) else 0


def is_vocab_tensor(name: str) -> bool:
    """Tensors whose first dimension is the vocabulary."""
    return classify(name).role in (Role.EMBEDDING, Role.LM_HEAD)
