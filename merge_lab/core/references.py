"""Model references as mergekit writes them: `path`, `path+adapter`, `path@revision`.

mergekit 0.1.5 (common.ModelReference) splits a reference at `+` into a model and a PEFT LoRA
adapter, and each of those at `@` into a Hub id and a revision. Here:

- a local folder whose name holds `+` or `@` literally wins: `./v1+extra` names that folder if
  it exists; otherwise, with several `+`, the split whose model part is an existing folder is used;
- `model+adapter` opens the model with the adapter applied while streaming (core.lora_applied),
  never a merged copy on disk;
- `@revision` is a Hub revision, which merge-lab cannot fetch (it never reaches the network):
  an error that names the recipe key and line and the download command to run instead.

Every reference is a local path, relative to the working directory (as in mergekit); a folder
named by several references is opened once (`ModelOpener`), so its files are read and hashed as
one input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from merge_lab.core.adapters import AdapterCheckpoint, is_adapter
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.lora_applied import LoraAppliedCheckpoint
from merge_lab.core.untrusted import shown
from merge_lab.errors import MergeLabError

Resolve = Callable[[str], Path]


def default_resolve(text: str) -> Path:
    return Path(text).expanduser()


@dataclass(frozen=True)
class ModelReference:
    """A parsed reference: the model folder and, for `model+adapter`, the adapter folder."""

    model: str
    adapter: str | None = None

    def __str__(self) -> str:
        return self.model if self.adapter is None else f"{self.model}+{self.adapter}"


def _exists(text: str, resolve: Resolve) -> bool:
    return bool(text) and os.path.lexists(resolve(text))


def _local(text: str, where: str, what: str, resolve: Resolve) -> str:
    """`text` as a local folder name: refused with what to do when it is a Hub revision or missing."""
    if _exists(text, resolve):
        return text
    if "@" in text:
        repo, _, revision = text.rpartition("@")
        raise MergeLabError(
            f"{where}: {shown(text)} asks for revision {shown(revision)} of {shown(repo)}. Revisions are fetched "
            "from the Hugging Face Hub, which merge-lab does not reach; download that revision, e.g. "
            f"`huggingface-cli download {repo or 'ID'} --revision {revision or 'R'} --local-dir DIR`, and name DIR."
        )
    kind = ("a PEFT adapter folder (adapter_config.json and adapter_model.safetensors)" if what == "adapter"
            else "a local folder with config.json and *.safetensors")
    raise MergeLabError(
        f"{where}: {resolve(text)}: {what} folder not found. Give {kind}; merge-lab does not reach the Hugging "
        f"Face Hub, so download a Hub model first (`huggingface-cli download ID --local-dir DIR`) and name DIR."
    )


def _split(text: str, resolve: Resolve) -> tuple[str, str] | None:
    """MODEL+ADAPTER's two parts: of several `+`, the split whose parts are (then whose model part
    is) existing folders; None when no split is plausible."""
    splits = [(text[:i], text[i + 1:]) for i, c in enumerate(text) if c == "+"]
    both = [s for s in splits if _exists(s[0], resolve) and _exists(s[1], resolve)]
    left = [s for s in splits if _exists(s[0], resolve)]
    chosen = both or left or (splits if len(splits) == 1 else [])
    return chosen[0] if chosen else None


def parse_reference(text: str, where: str, resolve: Resolve = default_resolve) -> ModelReference:
    """The reference `text` (the recipe value at `where`), checked against the file system: every
    folder it names exists (a `+` or `@` that is part of an existing folder's name is kept)."""
    if _exists(text, resolve) or "+" not in text:
        return ModelReference(_local(text, where, "model", resolve))
    parts = _split(text, resolve)
    if parts is None:
        raise MergeLabError(
            f"{where}: {shown(text)} has {text.count('+')} '+' and no part before one of them is an existing folder. "
            "A reference is MODEL or MODEL+ADAPTER (a PEFT LoRA adapter folder); name existing local folders."
        )
    model, adapter = parts
    return ModelReference(_local(model, where, "model", resolve), _local(adapter, where, "adapter", resolve))


def reference_identity(text: str, resolve: Resolve = default_resolve) -> Path:
    """What a reference stands for, however it is spelled: its folder with links followed, or for
    MODEL+ADAPTER both folders' (`./base+./lora` and `base+lora/` are one model). Never raises."""
    parts = None if _exists(text, resolve) or "+" not in text else _split(text, resolve)
    if parts is None:
        return Path(os.path.realpath(resolve(text)))
    return Path(os.path.realpath(resolve(parts[0])) + "+" + os.path.realpath(resolve(parts[1])))


class ModelOpener:
    """Opens a recipe's references, each folder once: a base named on its own and under a
    `+adapter` is one Checkpoint, so its files are listed (and hashed) once."""

    def __init__(self, resolve: Resolve = default_resolve):
        self.resolve = resolve
        self.opened: dict[Path, Checkpoint] = {}

    def folder(self, text: str, adapter: bool = False) -> Checkpoint:
        key = Path(os.path.realpath(self.resolve(text)))
        if key not in self.opened or isinstance(self.opened[key], AdapterCheckpoint) != adapter:
            path = self.resolve(text)
            self.opened[key] = AdapterCheckpoint(path, whole_tensors=True) if adapter else Checkpoint(path)
        return self.opened[key]

    def open(self, text: str, where: str) -> Checkpoint:
        """The checkpoint `text` stands for (the recipe value at `where`), its adapter applied."""
        ref = parse_reference(text, where, self.resolve)
        if ref.adapter is None:
            return self.folder(ref.model)
        if is_adapter(self.resolve(ref.model)):
            raise MergeLabError(f"{where}: {self.resolve(ref.model)} (before '+') is an adapter folder; the model "
                                "before '+' is a full checkpoint, the adapter comes after it.")
        if not is_adapter(self.resolve(ref.adapter)):
            raise MergeLabError(
                f"{where}: {self.resolve(ref.adapter)} (after '+') has no adapter_config.json, so it is no PEFT "
                "adapter. MODEL+ADAPTER applies a LoRA adapter folder to MODEL; give the adapter's folder."
            )
        model, adapter = self.folder(ref.model), self.folder(ref.adapter, adapter=True)
        assert isinstance(adapter, AdapterCheckpoint)  # is_adapter: opened as one
        try:
            return LoraAppliedCheckpoint(model, adapter)
        except MergeLabError as e:
            raise MergeLabError(f"{where}: {e}") from None
