"""Model references in mergekit-moe configs, as mergekit's ModelReference writes them.

`path`, `path@revision`, `model+adapter`, or the mapping {model, lora, override_architecture}.
Only local folders are read (no hub, no revisions: an error says what to do); `model+adapter` is
opened as merge recipes open it (core.references.ModelOpener: the PEFT adapter applied while
streaming, checked against its model from headers).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.references import ModelOpener
from merge_lab.errors import MergeLabError


class ModelPathSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    revision: str | None = None


class ModelRefSpec(BaseModel):
    """mergekit's ModelReference written out as a mapping."""

    model_config = ConfigDict(extra="forbid")

    model: str | ModelPathSpec
    lora: str | ModelPathSpec | None = None
    override_architecture: str | None = None


def ref_text(ref: str | ModelRefSpec) -> str:
    """A reference as mergekit prints it: path[@rev][+lora[@rev]]."""
    if isinstance(ref, str):
        return ref

    def one(p: str | ModelPathSpec) -> str:
        return p if isinstance(p, str) else (f"{p.path}@{p.revision}" if p.revision else p.path)

    return one(ref.model) + (f"+{one(ref.lora)}" if ref.lora is not None else "")


def local_reference(ref: str | ModelRefSpec, where: str) -> str:
    """A reference as our recipes take it: a local folder, or `model+adapter` (the PEFT adapter is
    applied while streaming by core.lora_applied, as for merge recipes)."""
    if isinstance(ref, ModelRefSpec) and ref.override_architecture:
        raise MergeLabError(f"{where}: override_architecture is not supported; remove it.")
    text = ref_text(ref)
    if "@" in text:
        raise MergeLabError(f"{where}: '{text}' names a hub revision; merge-lab reads local folders only. "
                            "Download that revision and give its folder.")
    if text.count("+") > 1:
        raise MergeLabError(f"{where}: '{text}' has more than one '+'; mergekit-moe takes MODEL or MODEL+ADAPTER.")
    return text


def model_folder(ref: str | ModelRefSpec) -> str:
    """The model part of a reference (before `+adapter`, without `@revision`): where its
    config.json and tokenizer are."""
    return ref_text(ref).split("+")[0].split("@")[0]


def open_reference(ref: str | ModelRefSpec, where: str) -> Checkpoint:
    """The checkpoint `ref` stands for, from headers (a `+adapter` applied while reading)."""
    return ModelOpener().open(local_reference(ref, where), where)
