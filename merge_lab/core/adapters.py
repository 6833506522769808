"""PEFT LoRA adapter folders, read as deltas of the base's tensors with their true scale.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` with, for each
adapted linear module `M`, `base_model.model.M.lora_A.weight` [r, in] and `...lora_B.weight`
[out, r]. The module's weight changes by `scale * B @ A`, where scale = alpha / r, or
alpha / sqrt(r) with rsLoRA (`use_rslora`), and per-module `rank_pattern` / `alpha_pattern`
override r and alpha. (H3Fusion's public code drops this scale; we do not.)

A LoRA on an embedding is saved as `M.lora_embedding_A` [r, vocab] and `M.lora_embedding_B`
[dim, r]: its delta is (B @ A).T, the orientation of a `fan_in_fan_out` pair. Tensors saved whole
(`modules_to_save`, e.g. lm_head, and the `M.base_layer.weight` copy PEFT saves of an adapted
embedding) replace the base's tensor of that name; only `AdapterCheckpoint(..., whole_tensors=True)`
reads them (the LoRA-applied view, core.lora_applied): code that only adds deltas refuses them.
A tensor both saved whole and adapted (an embedding) is the saved tensor plus its delta. DoRA
modules (`use_dora`, whole_tensors only) also carry `M.lora_magnitude_vector` [out]; with
`lora_bias` (whole_tensors only), `M.lora_B.bias` [out] changes the base's `M.bias` by scale times it.

`AdapterCheckpoint` is a `Checkpoint` over the adapter's safetensors file, so the engine reads
A and B memory-mapped, tensor by tensor, like any other input; `lora_delta` is the arithmetic.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.config import Where, validate
from merge_lab.core.untrusted import inside, read_json_object, regular_file, shown
from merge_lab.errors import MergeLabError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_PEFT_PREFIX = "base_model.model."
# rank_pattern / alpha_pattern keys: module names (or their dotted tails), matched literally. PEFT
# reads them as regular expressions; one from a downloaded file could take forever to match.
_PATTERN_KEY = re.compile(r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$")
Rank = Annotated[int, Field(ge=1, strict=True)]
Number = Annotated[float, Field(allow_inf_nan=False)]


class AdapterConfig(BaseModel):
    """The adapter_config.json fields read here, typed; PEFT's many others pass unread."""

    model_config = ConfigDict(extra="allow")

    peft_type: StrictStr = "LORA"
    r: Rank = 8
    lora_alpha: Number | None = None
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Number] | None = None
    use_rslora: StrictBool = False
    use_dora: StrictBool = False
    fan_in_fan_out: StrictBool = False
    modules_to_save: list[StrictStr] | None = None
    base_model_name_or_path: StrictStr | None = None


def is_adapter(path: str | Path) -> bool:
    return os.path.lexists(Path(path) / ADAPTER_CONFIG)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: its target tensor in the base, the A and B tensor names, the scale;
    for DoRA, the magnitude vector's name (the rows of W + delta are rescaled to its norms)."""

    target: str
    a: str
    b: str
    scale: float
    fan_in_fan_out: bool
    magnitude: str | None = None


@dataclass(frozen=True)
class LoraBias:
    """A module's LoRA bias (PEFT's `lora_bias`): its base bias changes by scale * lora_B.bias."""

    target: str
    b: str
    scale: float


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule for literal keys: a key matches a module whose name ends with it (at a dot boundary)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def lora_scale(r: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_delta(a: torch.Tensor, b: torch.Tensor, scale: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """scale * B @ A, in the target weight's [out, in] orientation (transposed for Conv1D bases)."""
    delta = (b @ a).mul_(scale)
    return delta.T if fan_in_fan_out else delta


def whole_tensor_target(name: str) -> str:
    """The base tensor an adapter tensor saved whole replaces: PEFT's prefix and the `base_layer`
    level its adapted modules add dropped (base_model.model.model.embed_tokens.base_layer.weight
    -> model.embed_tokens.weight)."""
    target = name.removeprefix(_PEFT_PREFIX)
    return target.replace(".base_layer.", ".")


class AdapterCheckpoint(Checkpoint):
    """A PEFT LoRA adapter folder, read through the same lazy, memory-mapped Checkpoint access.

    whole_tensors: read tensors saved whole (modules_to_save) as replacements of the base's;
    without it they are refused, for readers that only add LoRA deltas."""

    def __init__(self, path: str | Path, whole_tensors: bool = False):
        super().__init__(path)
        self.whole_tensors = whole_tensors

    @cached_property
    def config(self) -> dict:
        path = self.path / ADAPTER_CONFIG
        cfg = read_json_object(self.path, ADAPTER_CONFIG, "PEFT adapter config")
        checked = validate(AdapterConfig, cfg, Where(str(path)), ADAPTER_CONFIG)
        if checked.peft_type.upper() != "LORA":
            raise MergeLabError(f"{path}: peft_type {shown(checked.peft_type)} is not supported; only LoRA adapters are.")
        if checked.use_dora and not self.whole_tensors:
            raise MergeLabError(f"{path}: DoRA adapters are not supported; merge it into a full checkpoint first.")
        if checked.modules_to_save and not self.whole_tensors:
            raise MergeLabError(
                f"{path}: modules_to_save {shown(checked.modules_to_save)} holds full module copies, which we do not "
                "read; merge the adapter into a full checkpoint (peft merge_and_unload) and use that."
            )
        for field in ("rank_pattern", "alpha_pattern"):
            bad = [k for k in getattr(checked, field) or {} if not _PATTERN_KEY.match(k)]
            if bad:
                raise MergeLabError(
                    f"{path}: {field} key {shown(bad[0])} is not a module name. merge-lab matches these keys "
                    "literally (a regular expression from a downloaded file could take forever to match): "
                    "write out the module names, e.g. model.layers.0.mlp.up_proj."
                )
        return cfg

    @property
    def model_type(self) -> str:
        return "peft-lora"

    @cached_property
    def shards(self) -> dict[str, Path]:
        path = self.path / ADAPTER_WEIGHTS
        real = inside(self.path, ADAPTER_WEIGHTS, self.path, f"the file {ADAPTER_WEIGHTS}")
        if not regular_file(real, path):
            raise MergeLabError(
                f"{path}: missing. Save the adapter with safetensors (PEFT's default); .bin adapters are not read."
            )
        return {ADAPTER_WEIGHTS: real}

    @cached_property
    def index(self) -> None:
        """An adapter is one file: no index is read."""
        return None

    @cached_property
    def saved(self) -> dict[str, str]:
        """Base tensor name -> the adapter tensor saved whole that replaces it (whole_tensors only)."""
        return self._split[1]

    @cached_property
    def pairs(self) -> dict[str, LoraPair]:
        """Target tensor name in the base (e.g. model.layers.0.mlp.up_proj.weight) -> its LoRA pair."""
        return self._split[0]

    @cached_property
    def biases(self) -> dict[str, LoraBias]:
        """Base bias name (e.g. model.layers.0.self_attn.q_proj.bias) -> its LoRA bias (whole_tensors only)."""
        return self._split[2]

    @cached_property
    def _split(self) -> tuple[dict[str, LoraPair], dict[str, str], dict[str, LoraBias]]:
        cfg = self.config
        found: dict[str, dict[str, str]] = {}
        embedding: set[str] = set()
        saved: dict[str, str] = {}
        magnitudes: dict[str, str] = {}
        bias_of: dict[str, str] = {}
        for name in self.tensors:
            if self.whole_tensors and (bias := _BIAS_KEY.match(name)) is not None:
                bias_of[bias["module"]] = name
                continue
            if (dora := _MAGNITUDE_KEY.match(name)) is not None:
                magnitudes[dora["module"]] = name
                continue
            m = _KEY.match(name) or _EMBEDDING_KEY.match(name)
            if m is not None:
                found.setdefault(m["module"], {})[m["ab"]] = name
                if ".lora_embedding_" in name:
                    embedding.add(m["module"])
                continue
            if name.endswith(".bias") and (".lora_A" in name or ".lora_B" in name):
                raise MergeLabError(f"{self.path}: tensor '{name}': LoRA biases are not supported.")
            if not self.whole_tensors:
                raise MergeLabError(
                    f"{self.path}: tensor {shown(name)} is not a LoRA A/B weight (a module saved whole, "
                    "modules_to_save?); merge the adapter into a full checkpoint (peft merge_and_unload) and use that."
                )
            target = whole_tensor_target(name)
            if target in saved:
                raise MergeLabError(f"{self.path}: tensors {shown(saved[target])} and {shown(name)} both replace "
                                    f"{shown(target)}; which one is meant is ambiguous. Re-save the adapter.")
            saved[target] = name
        out = {}
        for module, ab in found.items():
            if set(ab) != {"A", "B"}:
                raise MergeLabError(f"{self.path}: module '{module}' has lora_{next(iter(ab))} but not its partner.")
            r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
            default_alpha = r if cfg.get("lora_alpha") is None else cfg["lora_alpha"]
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, default_alpha))
            a_shape, b_shape = self.info(ab["A"]).shape, self.info(ab["B"]).shape
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
                raise MergeLabError(
                    f"{self.path}: module {shown(module)} has lora_A of shape {a_shape} and lora_B of shape {b_shape}; "
                    "LoRA needs A [r, in] and B [out, r]. Re-save the adapter."
                )
            shape_r = a_shape[0]
            if shape_r != r:
                raise MergeLabError(
                    f"{self.path}: module '{module}' has rank {shape_r} in its weights but {r} in {ADAPTER_CONFIG}."
                )
            scale = lora_scale(r, alpha, bool(cfg.get("use_rslora", False)))
            transposed = module in embedding or bool(cfg.get("fan_in_fan_out", False))
            magnitude = magnitudes.pop(module, None)
            if bool(cfg.get("use_dora", False)) != (magnitude is not None):
                has = "has no lora_magnitude_vector" if magnitude is None else "has a lora_magnitude_vector"
                raise MergeLabError(f"{self.path}: module {shown(module)} {has} but {ADAPTER_CONFIG} sets use_dora "
                                    f"{bool(cfg.get('use_dora', False))}; re-save the adapter.")
            if magnitude is not None and transposed:
                raise MergeLabError(f"{self.path}: module {shown(module)}: DoRA on embeddings and Conv1D "
                                    "(fan_in_fan_out) layers is not supported; merge it into a full checkpoint first.")
            out[f"{module}.weight"] = LoraPair(f"{module}.weight", ab["A"], ab["B"], scale, transposed, magnitude)
            if module in bias_of and magnitude is not None:
                raise MergeLabError(f"{self.path}: module {shown(module)}: DoRA with a LoRA bias is not supported; "
                                    "merge it into a full checkpoint first.")
        biases = {f"{m}.bias": LoraBias(f"{m}.bias", b, out[f"{m}.weight"].scale)
                  for m, b in bias_of.items() if f"{m}.weight" in out}
        if len(biases) != len(bias_of):
            name = next(b for m, b in bias_of.items() if f"{m}.weight" not in out)
            raise MergeLabError(f"{self.path}: tensor {shown(name)} is a LoRA bias with no LoRA A/B pair beside it.")
        if magnitudes:
            name = next(iter(magnitudes.values()))
            raise MergeLabError(f"{self.path}: tensor {shown(name)} is a DoRA magnitude with no LoRA A/B pair beside it.")
        return out, saved, biases

    def check_fits(self, base: Checkpoint) -> None:
        """Every adapted tensor exists in the base with the shape B @ A has; else 'adapter for another base'."""
        problems = []
        for target, pair in self.pairs.items():
            if target not in base:
                problems.append(f"it adapts '{target}', which the base has no tensor for")
                continue
            out_dim, in_dim = self.info(pair.b).shape[0], self.info(pair.a).shape[1]
            want = base.info(target).shape
            got = (in_dim, out_dim) if pair.fan_in_fan_out else (out_dim, in_dim)
            if tuple(want) != got:
                problems.append(f"'{target}' is {tuple(want)} in the base but the adapter's B @ A is {got}")
            elif pair.magnitude is not None and self.info(pair.magnitude).shape != (out_dim,):
                problems.append(f"'{pair.magnitude}' is {self.info(pair.magnitude).shape}, not one magnitude per "
                                f"output row ({out_dim},)")
        for target, bias in self.biases.items():
            out_dim = self.info(self.pairs[target.removesuffix(".bias") + ".weight"].b).shape[0]
            if target not in base:
                problems.append(f"its LoRA bias '{bias.b}' changes '{target}', which the base has no tensor for")
            elif base.info(target).shape != self.info(bias.b).shape or self.info(bias.b).shape != (out_dim,):
                problems.append(f"'{target}' is {base.info(target).shape} in the base but the adapter's LoRA bias "
                                f"'{bias.b}' is {self.info(bias.b).shape}")
        for target, name in self.saved.items():
            if target not in base:
                problems.append(f"its tensor '{name}' (saved whole) replaces '{target}', which the base has no tensor for")
            elif base.info(target).shape != self.info(name).shape:
                problems.append(f"'{target}' is {base.info(target).shape} in the base but the adapter saves "
                                f"{self.info(name).shape} in '{name}'")
        if problems:
            named = self.config.get("base_model_name_or_path")
            hint = f" (its adapter_config.json names base '{named}')" if named else ""
            raise MergeLabError(
                f"{self.path}: this adapter does not fit the base {base.path}{hint}: "
                + "; ".join(problems[:5]) + ". Was it trained on another base model?"
            )


def open_model(path: str | Path) -> Checkpoint:
    """A full checkpoint or, for a folder with adapter_config.json, an AdapterCheckpoint."""
    return AdapterCheckpoint(path) if is_adapter(path) else Checkpoint(path)
