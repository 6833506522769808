"""mergekit-moe configs: read them as mergekit-moe 0.1.5 does, check them, translate to h3_moe.

A mergekit-moe YAML (`base_model`, `experts[]` with prompts, `gate_mode`, `experts_per_token`,
`shared_experts`, `architecture`, `dtype`) becomes our `h3_moe` recipe dict plus a side
structure (`MergekitExtras`) holding what the recipe has no key for yet: gate mode and prompts
(rows come from merge_lab.moe.gates), per-expert noise_scale / residual_scale (which `merge-lab moe`
passes on as h3_moe's per-expert parameters), shared experts.

Where we are stricter than mergekit-moe, and why:
- Unknown keys are errors with line and did-you-mean (mergekit's pydantic models ignore them, so a
  misspelt `negative_promts` silently drops the prompts).
- `gate_mode` must be one mergekit's router knows (an unknown one crashes it mid-run).
- Checks mergekit only logs and exits on (`is_bad_config`) raise with the key's line.
Where we are looser: `uniform_random` does not need prompts (mergekit's check asks for them
although the mode never reads them).

Model references (a path, `path@revision`, `base+lora`, or a mapping) are read by
merge_lab.moe.mergekit_refs: local folders only; `model+adapter` stays a reference in the
translated recipe, opened as merge recipes open it (the adapter applied while streaming), and
the gates read the adapted base (`base_weights`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.config import Where, load_yaml, load_yaml_text, parse_yaml, validate
from merge_lab.errors import MergeLabError
from merge_lab.moe.gates import PROMPT_MODES, ExpertPrompts, GateMode, gate_rows
from merge_lab.moe.mergekit_refs import ModelRefSpec, local_reference, model_folder, open_reference, ref_text

WHAT = "mergekit-moe config"
# mergekit's output architectures, in its ALL_OUTPUT_ARCHITECTURES order; `architecture:` picks
# those whose name starts with it (case-insensitive), so `qwen` matches both Qwen ones.
MERGEKIT_ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
# mergekit output architecture -> our layout family (merge_lab.moe.layout.FAMILIES values)
H3_FAMILY = {"Mixtral": "mixtral", "Qwen MoE": "qwen2_moe", "Qwen3 MoE": "qwen3_moe"}
_DTYPES = ("bfloat16", "float16", "float32", "float64", "int64")  # mergekit's dtype_from_name
_RECIPE_DTYPES = ("bfloat16", "float16", "float32")


class MoeExpert(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source_model: str | ModelRefSpec = Field(description="the expert model (its FFN weights become the expert)")
    positive_prompts: list[str] | None = Field(None, description="prompts to route to this expert")
    negative_prompts: list[str] | None = Field(None, description="prompts to route away from it")
    noise_scale: float | None = Field(None, description="std of Gaussian noise added to its FFN weights")
    residual_scale: float | None = Field(None, description="factor on its down_proj")


class MergekitMoeConfig(BaseModel):
    """Every key mergekit-moe 0.1.5 (`mergekit/moe/config.py`) reads, with its defaults."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | ModelRefSpec = Field(description="attention, embeddings, norms come from here")
    experts: list[MoeExpert] = Field(description="one MoE expert per entry, in router row order")
    gate_mode: GateMode = Field("hidden", description="how router rows are made: see merge_lab.moe.gates")
    dtype: str | None = Field(None, description="output dtype (default: the base's torch_dtype)")
    experts_per_token: int = Field(2, ge=1, description="top-k")
    shared_experts: list[MoeExpert] | None = Field(None, description="always-on experts (Qwen MoE: exactly one)")
    architecture: str | None = Field(None, description="output architecture: mixtral, qwen, qwen3, deepseek")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is None:
            return v
        name = v.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}")
        return name


@dataclass(frozen=True)
class ExpertExtras:
    """What mergekit-moe does to one expert that our h3_moe recipe has no key for."""

    source: str
    noise_scale: float | None = None  # mergekit: tensor + randn_like(tensor) * noise_scale, every FFN tensor
    residual_scale: float | None = None  # mergekit: down_proj * residual_scale (after the noise)


@dataclass(frozen=True)
class MergekitExtras:
    """The side structure `to_h3_recipe` cannot put into the recipe, for `merge-lab moe` to wire."""

    gate_mode: str
    # prompts in the order mergekit computes gates: routed experts, then shared experts when mergekit
    # gates them (they have prompts, or the mode is random); gates.gate_rows takes this list as is
    gate_prompts: list[ExpertPrompts]
    routed_experts: int  # rows [:, :routed_experts] are the router; the rest the shared-expert gates
    experts: list[ExpertExtras]
    shared_experts: list[ExpertExtras] = field(default_factory=list)
    architecture: str | None = None  # mergekit's output architecture, when resolved from the models
    unsupported: list[str] = field(default_factory=list)  # what h3_moe cannot do yet, in words


def parse_mergekit_moe(text: str, source: str = "<mergekit-moe>", allow_all_same: bool = False
                       ) -> tuple[MergekitMoeConfig, Where]:
    config, where = parse_yaml(text, source, MergekitMoeConfig, WHAT)
    check_config(config, where, allow_all_same)
    return config, where


def load_mergekit_moe(path: str | Path, allow_all_same: bool = False) -> tuple[MergekitMoeConfig, Where]:
    """A mergekit-moe YAML file, validated and checked; errors name the file, line and key."""
    config, where = load_yaml(path, MergekitMoeConfig, WHAT)
    check_config(config, where, allow_all_same)
    return config, where


def load_moe_file(path: str | Path, allow_all_same: bool = False
                  ) -> tuple[MergekitMoeConfig, Where, dict | None]:
    """A mergekit-moe YAML that may also hold our `train:` block (h3 TrainConfig keys, checked by
    the h3 recipe): (config, where, the train block or None). mergekit-moe ignores unknown keys, so
    such a file still runs there; everything else is checked as `load_mergekit_moe` does."""
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"{path}: {WHAT} not found.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MergeLabError(f"{path}: cannot be read as a UTF-8 text file ({type(e).__name__}).") from None
    data, where = load_yaml_text(text, str(path), WHAT)
    if not isinstance(data, dict):
        raise MergeLabError(f"{path}: a {WHAT} is a YAML mapping of keys to values.")
    train = data.pop("train", None)
    if train is not None and not isinstance(train, dict):
        raise MergeLabError(f"{where('train')}: train: is a mapping of h3 training keys (data, steps, lambda, ...).")
    config = validate(MergekitMoeConfig, data, where, WHAT)
    check_config(config, where, allow_all_same)
    return config, where, train


def looks_like_mergekit_moe(data: object) -> bool:
    """Whether parsed YAML is a mergekit-moe config rather than a merge recipe."""
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data and "models" not in data


def is_mergekit_moe_file(path: str | Path) -> bool:
    """Whether the YAML file at `path` is a mergekit-moe config (what `merge-lab merge` hands to `moe`)."""
    try:
        data, _ = load_yaml_text(Path(path).read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, MergeLabError):
        return False  # the recipe loader reports what is wrong with the file
    return looks_like_mergekit_moe(data)


def refuse_as_recipe(data: object, source: str) -> None:
    """For recipe loading (`merge`, `validate`): a mergekit-moe config is run by `merge-lab moe`."""
    if looks_like_mergekit_moe(data):
        raise MergeLabError(f"{source}: is a mergekit-moe config (experts:, no merge_method); build it with "
                            f"`merge-lab moe {source} -o OUT/`.")


def _prompts(e: MoeExpert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e.positive_prompts or []), tuple(e.negative_prompts or [])


def matching_architectures(name: str | None) -> list[str]:
    """mergekit's candidates for `architecture:` (all when unset)."""
    if not name:
        return list(MERGEKIT_ARCHITECTURES)
    return [a for a in MERGEKIT_ARCHITECTURES if a.lower().startswith(name.lower())]


def check_config(config: MergekitMoeConfig, where: Where, allow_all_same: bool = False) -> None:
    """mergekit-moe's checks (`is_bad_config`, the shared-expert and architecture rules), as errors.

    `allow_all_same` is mergekit's --i-understand-this-is-not-useful-without-training.
    """
    n = len(config.experts)
    if n == 0:
        raise MergeLabError(f"{where('experts')}: no experts; list at least {config.experts_per_token} "
                            "(experts_per_token) under experts:, each with a source_model.")
    if config.experts_per_token > n:
        raise MergeLabError(
            f"{where('experts_per_token')}: experts_per_token = {config.experts_per_token} but there are only {n} "
            "experts; lower experts_per_token or add experts."
        )
    prompt_mode = config.gate_mode in PROMPT_MODES
    if prompt_mode:
        for i, e in enumerate(config.experts):
            if not e.positive_prompts:
                raise MergeLabError(
                    f"{where('experts', i)}: gate_mode '{config.gate_mode}' makes each router row from the expert's "
                    "prompts, and this expert has no positive_prompts. Add a few prompts that should go to it, or "
                    "set gate_mode: random / uniform_random."
                )
        if n > 1 and all(_prompts(e) == _prompts(config.experts[0]) for e in config.experts[1:]):
            raise MergeLabError(
                f"{where('experts')}: every expert has the same positive and negative prompts, so every router row "
                "is the same and the router cannot choose. Give each expert prompts typical of what it should handle."
            )
    if n > 1 and not allow_all_same and len({ref_text(e.source_model) for e in config.experts}) == 1:
        raise MergeLabError(
            f"{where('experts')}: every expert is the same model; the MoE would cost more and give the same output. "
            "Use different experts (or allow it explicitly if you will train the result)."
        )
    shared = config.shared_experts or []
    with_prompts = [bool(e.positive_prompts) for e in shared]
    if shared and any(with_prompts) and not all(with_prompts):
        raise MergeLabError(f"{where('shared_experts')}: give prompts to all shared experts or to none, not a mix.")
    if config.architecture is not None and not matching_architectures(config.architecture):
        raise MergeLabError(
            f"{where('architecture')}: unknown architecture '{config.architecture}'; mergekit-moe writes "
            f"{', '.join(MERGEKIT_ARCHITECTURES)} (give a prefix: mixtral, deepseek, qwen, qwen3)."
        )
    fits = [a for a in matching_architectures(config.architecture) if _shared_fits(a, config) is None]
    if not fits:
        reasons = "; ".join(f"{a}: {_shared_fits(a, config)}" for a in matching_architectures(config.architecture))
        key = "shared_experts" if shared else "architecture"
        raise MergeLabError(f"{where(key)}: no output architecture takes these shared experts ({reasons}).")


def _shared_fits(arch: str, config: MergekitMoeConfig) -> str | None:
    """Why `arch` refuses the config's shared experts (None when it takes them), as mergekit decides."""
    shared = config.shared_experts or []
    if arch in ("Mixtral", "Qwen3 MoE"):
        return "has no shared experts" if shared else None
    if arch == "Qwen MoE":
        if len(shared) != 1:
            return "needs exactly one shared expert"
        if config.gate_mode != "random" and not shared[0].positive_prompts:
            return "needs positive_prompts for the shared expert's gate"
        return None
    if len(shared) > 1:  # DeepSeek MoE
        return "takes at most one shared expert"
    if shared and (shared[0].positive_prompts or shared[0].negative_prompts):
        return "cannot gate a shared expert (remove its prompts)"
    return None


def _labels(refs: list[str]) -> list[str]:
    """Expert labels from folder names (`model+adapter`: both names), made unique."""
    labels: list[str] = []
    for i, ref in enumerate(refs):
        name = "+".join(Path(part).name for part in ref.split("+")) or f"expert{i}"
        labels.append(name if name not in labels else f"{name}_{i}")
    return labels


def to_h3_recipe(config: MergekitMoeConfig, source: Where | str) -> dict:
    """The h3_moe recipe dict for `config` (routed experts, and a single shared expert as h3_moe's
    `shared_expert`; see `mergekit_extras` for the rest).

    Non-FFN weights come from the base (mergekit copies them from the base), top_k is
    experts_per_token, labels are the experts' folder names. `router_init` is left at `random`:
    the rows are mergekit's gates (`gates.gate_rows`), which the caller must hand to the plan.
    """
    where = source if isinstance(source, Where) else Where(source)
    base = local_reference(config.base_model, where("base_model"))
    paths = [local_reference(e.source_model, where("experts", i, "source_model")) for i, e in enumerate(config.experts)]
    recipe: dict = {
        "merge_method": "h3_moe",
        "base_model": base,
        "models": [{"model": p, "label": lab} for p, lab in zip(paths, _labels(paths))],
        "parameters": {"top_k": config.experts_per_token, "router_init": "random", "non_ffn": "base"},
    }
    if len(config.shared_experts or []) == 1:  # Qwen MoE's (the other architectures are refused by merge-lab moe)
        e = (config.shared_experts or [])[0]
        spec = {"shared_expert": local_reference(e.source_model, where("shared_experts", 0, "source_model")),
                "shared_residual_scale": e.residual_scale, "shared_noise_scale": e.noise_scale}
        recipe["parameters"].update({k: v for k, v in spec.items() if v is not None})
    if config.dtype is not None:
        if config.dtype not in _RECIPE_DTYPES:
            raise MergeLabError(f"{where('dtype')}: dtype {config.dtype} is not an output dtype merge-lab writes; "
                                f"use one of {', '.join(_RECIPE_DTYPES)}.")
        recipe["dtype"] = config.dtype
    return recipe


def gate_prompts(config: MergekitMoeConfig) -> list[ExpertPrompts]:
    """The experts whose gates mergekit computes, in its order: routed, then shared when gated."""
    need = list(config.experts)
    shared = config.shared_experts or []
    if shared and (any(e.positive_prompts for e in shared) or config.gate_mode in ("random", "uniform_random")):
        need += shared
    return [ExpertPrompts(list(e.positive_prompts or []), list(e.negative_prompts or [])) for e in need]


def _model_type(path: str, where: str) -> str:
    cfg = Path(path).expanduser() / "config.json"
    if not cfg.is_file():
        raise MergeLabError(f"{where}: '{path}' is not a local model folder (no config.json).")
    try:
        return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type", "unknown"))
    except (OSError, ValueError) as e:
        raise MergeLabError(f"{cfg}: not a readable config.json ({type(e).__name__}).") from None


def output_architecture(config: MergekitMoeConfig, where: Where) -> str:
    """The architecture mergekit-moe would write for these models (its `select_output_arch`)."""
    refs = [("base_model",), *(("experts", i, "source_model") for i in range(len(config.experts))),
            *(("shared_experts", i, "source_model") for i in range(len(config.shared_experts or [])))]
    models = [config.base_model] + [e.source_model for e in config.experts + (config.shared_experts or [])]
    types = [_model_type(model_folder(m), where(*r)) for m, r in zip(models, refs)]
    ok = {"Mixtral": ("llama", "mistral"), "DeepSeek MoE": ("llama", "mistral"),
          "Qwen MoE": ("llama", "mistral", "qwen2"), "Qwen3 MoE": ("qwen3",)}
    fits = [a for a in matching_architectures(config.architecture)
            if _shared_fits(a, config) is None and len(set(types)) == 1 and types[0] in ok[a]]
    if not fits:
        raise MergeLabError(
            f"{where('architecture' if config.architecture else 'base_model')}: no mergekit-moe output architecture "
            f"takes these models (model types {sorted(set(types))}, {len(config.shared_experts or [])} shared experts)."
        )
    return "Mixtral" if "Mixtral" in fits else fits[0]


def mergekit_extras(config: MergekitMoeConfig, source: Where | str) -> MergekitExtras:
    """What the recipe cannot hold, with the output architecture checked against the models on disk."""
    where = source if isinstance(source, Where) else Where(source)
    arch = output_architecture(config, where)
    unsupported = []
    if arch not in H3_FAMILY:
        unsupported.append(f"output architecture {arch}: h3_moe writes Mixtral, Qwen2-MoE and Qwen3-MoE only")
    shared = [ExpertExtras(ref_text(e.source_model), e.noise_scale, e.residual_scale)
              for e in config.shared_experts or []]
    if shared and arch != "Qwen MoE":
        unsupported.append(f"shared expert with output architecture {arch}: h3_moe's shared expert is Qwen2-MoE's")
    experts = [ExpertExtras(ref_text(e.source_model), e.noise_scale, e.residual_scale) for e in config.experts]
    return MergekitExtras(config.gate_mode, gate_prompts(config), len(config.experts), experts, shared, arch,
                          unsupported)


def base_path(config: MergekitMoeConfig, source: Where | str) -> Path:
    """The base model's local folder (for `base+adapter`, the model's: its config and tokenizer)."""
    where = source if isinstance(source, Where) else Where(source)
    return Path(model_folder(local_reference(config.base_model, where("base_model")))).expanduser()


def base_weights(config: MergekitMoeConfig, source: Where | str) -> Checkpoint:
    """The base as the gates read it: its checkpoint, with a `+adapter` applied while reading
    (the same reader as merge recipes' references, core.references.ModelOpener)."""
    where = source if isinstance(source, Where) else Where(source)
    return open_reference(config.base_model, where("base_model"))


def check_references(config: MergekitMoeConfig, source: Where | str) -> None:
    """Every model the config names opened from headers (a `+adapter` checked against its model:
    targets, shapes, ranks), so an error names the config's own key and line."""
    where = source if isinstance(source, Where) else Where(source)
    keys = [("base_model",), *(("experts", i, "source_model") for i in range(len(config.experts))),
            *(("shared_experts", i, "source_model") for i in range(len(config.shared_experts or [])))]
    refs = [config.base_model, *(e.source_model for e in config.experts + (config.shared_experts or []))]
    for key, ref in zip(keys, refs):
        open_reference(ref, where(*key))


def base_model_type(config: MergekitMoeConfig, source: Where | str) -> str:
    """The base's model_type (config.json): h3_moe's output layout follows it."""
    where = source if isinstance(source, Where) else Where(source)
    return _model_type(str(base_path(config, where)), where("base_model"))


def config_gate_rows(config: MergekitMoeConfig, source: Where | str, seed: int = 0, device: str | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(router rows [layers, experts, hidden], shared-expert gate rows [layers, shared, hidden]) for
    `config`, as mergekit-moe computes them; the second is empty when mergekit gates no shared expert."""
    base = base_path(config, source)
    weights = base_weights(config, source) if config.gate_mode in PROMPT_MODES else None
    rows = gate_rows(base, gate_prompts(config), config.gate_mode, seed=seed, device=device, weights=weights)
    n = len(config.experts)
    return rows[:, :n].contiguous(), rows[:, n:].contiguous()


def translate(config: MergekitMoeConfig, source: Where | str) -> tuple[dict, MergekitExtras]:
    """(h3_moe recipe dict, side structure): what `merge-lab moe` needs from a mergekit-moe config,
    its references checked first (check_references)."""
    recipe = to_h3_recipe(config, source)
    check_references(config, source)
    return recipe, mergekit_extras(config, source)
