"""H3 MoE fusion: a base and N experts aligned from it become one mixture-of-experts model.

Tekin et al., "H3Fusion: Helpful, Harmless, Honest Fusion of Aligned LLMs" (arXiv 2411.17792).

Assembly (this strategy, run by `merge-lab merge`): attention, embeddings, norms and LM head from
the base; each layer's FFN becomes N experts (expert i = expert i's FFN: its full checkpoint's, or
base + alpha/r * B @ A from its LoRA adapter); one linear router per layer (no bias), top-k
routing with the kept softmax weights renormalised. Output: the hub's Mixtral layout for llama
and mistral bases, Qwen2-MoE for qwen2, Qwen3-MoE for qwen3, loadable by
`AutoModelForCausalLM.from_pretrained` without custom code. Fusion training (`merge-lab fuse`,
the recipe's `train:` block) is in merge_lab.moe.train.

Recipe:
    merge_method: h3_moe
    base_model: ./base
    models: [{model: ./helpful, label: helpful}, {model: ./harmless-lora, label: harmless}]
    parameters: {top_k: 2, router_init: random | centroid, non_ffn: base | average}

Where we differ from the paper's public code, and why:
- Routers are trained. The public code names the router `mlp.gate`, targets LoRA at `gate_proj`
  and freezes every non-LoRA parameter, so its routers stay at their random init. Ours are
  always trainable and a test checks they receive gradients in every mode.
- Experts are distinct: the public code adds every expert's delta in place to the same base
  tensor, so all experts end up identical; each of ours is computed from its own inputs.
- LoRA deltas carry their true scale (alpha/r; alpha/sqrt(r) for rsLoRA; rank/alpha patterns)
  and are applied to the base the adapters were trained on (the public code adds B @ A without
  the scale, onto the chat model). An adapter whose shapes do not fit the base is refused.
- The gating loss is the negative log of the labelled expert's probability, with probabilities
  averaged over the example's real (non-pad) tokens and the layers; the public code applies
  cross-entropy (a second softmax) to probabilities and averages over pad tokens.
- The drift regulariser is ||theta_i - theta_i_initial||^2 over expert i's trainable weights,
  not the norm of all weights including frozen ones.
- Labels come from the recipe, one per expert, checked against the data (the public code builds
  labels from a running total so the third type never gets its own label).
- Any number of layers and experts, safetensors shards in a standard layout instead of a
  hard-coded 32x3 model pickled into one 31 GB file.
- Routing accuracy is measured on the tokens after the prefix all examples share (the chat
  template's system block has the same routing in every example; averaged in, it hid a router
  that had learned: 0.48 on all tokens vs 0.98 on content tokens on SmolLM2-135M).
- Additions: `router_init: centroid` (rows from the base's hidden states on each label's
  prompts), `non_ffn: average`, an optional load-balancing loss, `gating_tokens: content`
  (the gating loss without the shared prefix; default `all`, the paper's), Qwen bases.
"""

from __future__ import annotations

from merge_lab.merge.interface import Strategy
from merge_lab.merge.plan import Plan, PlanContext
from merge_lab.merge.recipe import Recipe
from merge_lab.moe.assemble import H3ModelParams, H3Params, build_moe_plan


class H3Moe(Strategy):
    name = "h3_moe"
    summary = "H3Fusion: base + N aligned experts -> a Mixtral / Qwen-MoE checkpoint (structural)"
    Params = H3Params
    ModelParams = H3ModelParams
    needs_base = True
    uses_base = True
    symmetric = False  # expert order is the router's row order
    min_models = 2
    structural = True

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        from merge_lab.moe.assemble import expert_labels, h3_params

        h3_params(recipe)
        expert_labels(recipe)
        if recipe.train is not None:
            from merge_lab.moe.train_config import train_config

            train_config(recipe)

    def build_plan(self, ctx: PlanContext) -> Plan:
        return build_moe_plan(ctx, self.name)
