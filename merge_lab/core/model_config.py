"""config.json of a model folder, checked: a JSON object whose fields we read have the right types
and whose architecture is one the role table knows (core.architecture.FAMILIES)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from merge_lab.core.architecture import ARCHITECTURE_CLASSES, FAMILIES
from merge_lab.core.config import Where, validate
from merge_lab.core.untrusted import shown
from merge_lab.errors import MergeLabError

Count = Annotated[int, Field(ge=0, strict=True)]
Size = Annotated[int, Field(ge=1, strict=True)]


class ConfigFields(BaseModel):
    """The config.json fields merge_lab reads (planner, architecture, MoE assembly), typed; the
    others pass through to the output untouched."""

    model_config = ConfigDict(extra="allow")

    model_type: StrictStr | None = None
    architectures: list[StrictStr] | None = None
    num_hidden_layers: Count | None = None
    n_layer: Count | None = None
    num_layers: Count | None = None
    hidden_size: Size | None = None
    intermediate_size: Size | None = None
    moe_intermediate_size: Size | None = None
    vocab_size: Size | None = None
    num_local_experts: Size | None = None
    num_experts: Size | None = None
    num_experts_per_tok: Size | None = None
    tie_word_embeddings: StrictBool | None = None
    torch_dtype: StrictStr | None = None
    dtype: StrictStr | None = None
    merge_lab_expert_labels: list[StrictStr] | None = None
    text_config: ConfigFields | None = None


def check_config(cfg: dict, label: Path | str) -> dict:
    """`cfg` (the JSON object of config.json) when its fields and architecture are acceptable."""
    validate(ConfigFields, cfg, Where(str(label)), "config.json")
    known = ", ".join(sorted(ARCHITECTURE_CLASSES))
    archs = cfg.get("architectures")
    if archs:
        unknown = [a for a in archs if a not in ARCHITECTURE_CLASSES]
        if unknown:
            raise MergeLabError(
                f"{label}: architectures {shown(unknown)} is not a decoder family merge-lab knows the tensor roles "
                f"of, so it would merge it blindly. Known: {known}."
            )
    model_type = cfg.get("model_type")
    if not archs:  # then the family is what model_type says
        if model_type is None:
            raise MergeLabError(f"{label}: names neither architectures nor model_type; is this a model's config.json?")
        if model_type not in FAMILIES:
            raise MergeLabError(
                f"{label}: model_type {shown(model_type)} is not a decoder family merge-lab knows the tensor roles "
                f"of ({', '.join(FAMILIES)}), and no architectures are named."
            )
    return cfg
