"""Dense -> MoE layout: the output's config and tensor names, as data per base family.

llama and mistral bases become Mixtral (or, asked for, Qwen2-MoE: mergekit-moe's Qwen MoE, with
zero q/k/v biases since Qwen2-MoE's attention has them); qwen2 bases Qwen2-MoE; qwen3 bases
Qwen3-MoE. Names
are the hub's per-expert layout (`block_sparse_moe.experts.E.w1.weight`, ...), which the
installed transformers converts on load into its fused in-memory form (`mlp.experts.gate_up_proj`
[E, 2I, H], gate rows first) and which vLLM and llama.cpp's converter read as well.
`memory_name` maps a hub name to where its values live in the loaded model, for export.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from merge_lab.core.architecture import Role
from merge_lab.errors import MergeLabError

# dense base model_type -> MoE family
FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
# other output families a base may be made into (mergekit-moe's Qwen MoE takes llama / mistral)
ALSO = {"llama": ("qwen2_moe",), "mistral": ("qwen2_moe",)}
# dense-only config keys that the MoE config class does not take (values checked below)
_DENSE_ONLY = {"mixtral": ("attention_bias", "mlp_bias", "pretraining_tp"), "qwen2_moe": (), "qwen3_moe": ("mlp_bias",)}
_FROM_LLAMA = ("attention_bias", "mlp_bias", "pretraining_tp")  # llama / mistral keys Qwen2-MoE cannot express
# Qwen2-MoE always adds a sigmoid-gated shared expert; ours is one unit wide with zero weights, so
# it contributes exactly 0 (and stays 0 in training: all its gradients are 0).
SHARED_WIDTH = 1

_HUB_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")
_HUB_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.gate\.weight$")


@dataclass(frozen=True)
class MoeLayout:
    family: str
    intermediate: int  # the dense FFN width, each expert's width

    @property
    def block(self) -> str:
        return "block_sparse_moe" if self.family == "mixtral" else "mlp"

    def expert_name(self, layer: int, expert: int, role: Role) -> str:
        names = {"mixtral": {Role.MLP_GATE: "w1", Role.MLP_UP: "w3", Role.MLP_DOWN: "w2"}}.get(
            self.family, {Role.MLP_GATE: "gate_proj", Role.MLP_UP: "up_proj", Role.MLP_DOWN: "down_proj"}
        )
        return f"model.layers.{layer}.{self.block}.experts.{expert}.{names[role]}.weight"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.block}.gate.weight"

    def shared_name(self, layer: int, role: Role) -> str:
        """Qwen2-MoE's shared expert projection of a layer (a dense FFN beside the routed experts)."""
        names = {Role.MLP_GATE: "gate_proj", Role.MLP_UP: "up_proj", Role.MLP_DOWN: "down_proj"}
        return f"model.layers.{layer}.mlp.shared_expert.{names[role]}.weight"

    def shared_gate_name(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def extra_tensors(self, layer: int, hidden: int, shared: bool = False) -> list[tuple[str, tuple[int, ...]]]:
        """Tensors the family needs that no dense model has (all zeros); with a `shared` expert (its
        FFN made elsewhere) only the shared expert's gate row."""
        if self.family != "qwen2_moe":
            return []
        gate = [(self.shared_gate_name(layer), (1, hidden))]
        if shared:
            return gate
        return [
            (self.shared_name(layer, Role.MLP_GATE), (SHARED_WIDTH, hidden)),
            (self.shared_name(layer, Role.MLP_UP), (SHARED_WIDTH, hidden)),
            (self.shared_name(layer, Role.MLP_DOWN), (hidden, SHARED_WIDTH)),
            *gate,
        ]

    def attention_biases(self, layer: int, config: dict, have: set[str]) -> list[tuple[str, tuple[int, ...]]]:
        """The q/k/v biases Qwen2-MoE's attention has and the base lacks (a llama / mistral base):
        zeros, as mergekit-moe's Qwen MoE writes them; none for the other families."""
        if self.family != "qwen2_moe":
            return []
        head = int(config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"]))
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads)
        out = []
        for proj, n in (("q", heads), ("k", kv), ("v", kv)):
            name = f"model.layers.{layer}.self_attn.{proj}_proj.bias"
            if name not in have:
                out.append((name, (n * head,)))
        return out

    def memory_name(self, hub_name: str) -> tuple[str, int | None, slice | None]:
        """Where a hub tensor's values are in the transformers model: (parameter, expert, rows)."""
        if m := _HUB_ROUTER.match(hub_name):
            return f"model.layers.{m[1]}.mlp.gate.weight", None, None
        if m := _HUB_EXPERT.match(hub_name):
            layer, expert, proj = m[1], int(m[2]), m[3]
            i = self.intermediate
            if proj in ("w1", "gate_proj"):
                return f"model.layers.{layer}.mlp.experts.gate_up_proj", expert, slice(0, i)
            if proj in ("w3", "up_proj"):
                return f"model.layers.{layer}.mlp.experts.gate_up_proj", expert, slice(i, 2 * i)
            return f"model.layers.{layer}.mlp.experts.down_proj", expert, None
        return hub_name, None, None


def family_of(model_type: str, where: str) -> str:
    try:
        return FAMILIES[model_type]
    except KeyError:
        supported = ", ".join(f"{k} -> {v}" for k, v in FAMILIES.items())
        raise MergeLabError(
            f"{where}: base model_type '{model_type}' has no MoE layout here. Supported: {supported}."
        ) from None


def output_family(model_type: str, family: str | None, where: str) -> str:
    """The MoE family to write: the base's (`family` None), or one the base may also become."""
    own = family_of(model_type, where)
    if family is None or family == own:
        return own
    if family not in ALSO.get(model_type, ()):
        others = ", ".join((own, *ALSO.get(model_type, ())))
        raise MergeLabError(f"{where}: a '{model_type}' base cannot be made into {family}; it becomes {others}.")
    return family


def moe_config(base: dict, n_experts: int, top_k: int, labels: list[str], where: str,
               shared_expert: bool = False, family: str | None = None) -> tuple[dict, MoeLayout]:
    """The MoE config.json: the base's config (rope, norms, head_dim, vocab, tied embeddings, special
    tokens) with the family's MoE keys; and the tensor layout that goes with it. Qwen2-MoE's shared
    expert is the zero placeholder, or with `shared_expert` a full FFN of the base's width (as
    mergekit-moe writes it). `family` asks for another layout than the base's (output_family)."""
    model_type = base.get("model_type", "unknown")
    family = output_family(model_type, family, where)
    cfg = dict(base)
    converted = family == "qwen2_moe" and model_type != "qwen2"
    for key in _FROM_LLAMA if converted else _DENSE_ONLY[family]:
        value = cfg.pop(key, None)
        if value not in (None, False, 1):
            raise MergeLabError(f"{where}: the base sets {key} = {value!r}, which {family} cannot express.")
    inter = int(base["intermediate_size"])
    cfg.update(model_type=family, architectures=[ARCHITECTURES[family]], num_experts_per_tok=top_k)
    cfg.update(output_router_logits=False, router_aux_loss_coef=0.0)
    if family == "mixtral":
        cfg.update(num_local_experts=n_experts, router_jitter_noise=0.0)
    else:
        cfg.update(num_experts=n_experts, moe_intermediate_size=inter, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[])
        if family == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=inter if shared_expert else SHARED_WIDTH, qkv_bias=True)
    if converted:  # as mergekit-moe's Qwen MoE: no sliding window
        cfg.update(use_sliding_window=False, sliding_window=None)
        cfg.pop("layer_types", None)
    cfg["merge_lab_expert_labels"] = list(labels)
    return cfg, MoeLayout(family, inter)


def layout_of(config: dict) -> MoeLayout:
    """The layout of an assembled MoE checkpoint, from its config.json."""
    family = config.get("model_type")
    if family not in ARCHITECTURES:
        raise MergeLabError(f"model_type '{family}' is not an MoE layout merge_lab writes ({', '.join(ARCHITECTURES)}).")
    inter = config.get("moe_intermediate_size") if family != "mixtral" else config.get("intermediate_size")
    return MoeLayout(family, int(inter))


def expert_labels(config: dict) -> list[str]:
    labels = config.get("merge_lab_expert_labels")
    if not labels:
        raise MergeLabError("this MoE checkpoint has no 'merge_lab_expert_labels' in config.json; was it made by h3_moe?")
    return list(labels)
