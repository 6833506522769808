"""H3 MoE fusion (moe/strategy.py is the registered strategy). Door: `fuse`.

layout       dense -> Mixtral / Qwen2-MoE / Qwen3-MoE: config and hub tensor names
assemble     the structural plan the merge engine runs (experts, routers, non-FFN policy)
router_init  random rows, or centroids of the base's hidden states per label
data         labelled rows (JSONL or training/blocks.py's blocks with `expert:`), response-only loss mask
losses       LM, gating, drift, load balancing, routing accuracy
train        fusion training through accelerate (setup, loop), with exact resume
state        the resume state: safetensors + JSON, loaded strictly
export       trained model -> hub layout through the ShardWriter
pipeline     `merge-lab fuse`: assemble, train, export
routing      router hooks, forced routing, routing accuracy, `merge-lab inspect-routing`
(tiny experts and labelled data for tests: merge_lab.testing.moe)
"""

from merge_lab import lazy_exports

__getattr__ = lazy_exports(__name__, {"fuse": "merge_lab.moe.pipeline"})
__all__ = ["fuse"]
