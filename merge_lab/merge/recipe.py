"""Recipes: YAML validated with pydantic, errors that name the key and its line.

The schema is a superset of mergekit's for the methods we support (`merge_method`, `base_model`,
`models[].model`, `models[].parameters`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source`,
`tokenizer.source`), so a mergekit recipe runs unchanged. Our additions: `seed`, `shard_size`,
`models[].label` and `train:` (both for structural strategies such as `h3_moe`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from merge_lab.errors import MergeLabError

DType = Literal["float32", "float16", "bfloat16"]
M = TypeVar("M", bound=BaseModel)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local model folder (or PEFT adapter folder where a strategy accepts one)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="this model's own parameters")
    label: str | None = Field(None, description="objective this model is an expert for (structural strategies)")


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("base", description="'base' or a model reference whose tokenizer is copied")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="strategy name; `merge-lab strategies` lists them")
    base_model: str | None = Field(None, description="the common base (needed by delta-based methods)")
    models: list[ModelEntry] = Field(description="the models to merge")
    parameters: dict[str, Any] = Field(default_factory=dict, description="merge-wide parameters and per-model defaults")
    dtype: DType | None = Field(None, description="output dtype (default: the inputs')")
    out_dtype: DType | None = Field(None, description="mergekit's name for the output dtype; wins over dtype")
    tokenizer: TokenizerSpec | None = Field(None, description="`base`: merge shared vocabulary rows, rest from base")
    tokenizer_source: str | None = Field(None, description="mergekit's spelling of tokenizer.source")
    seed: int = Field(0, description="seed for random strategies (DARE masks)")
    shard_size: str | int = Field("2GB", description="maximum bytes per output shard, e.g. 2GB")
    train: dict[str, Any] | None = Field(None, description="training block for structural strategies (h3_moe)")
    name: str | None = Field(None, description="a name for the model card")

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v

    @field_validator("models", mode="before")
    @classmethod
    def _model_shorthand(cls, v: Any) -> Any:
        if isinstance(v, list):
            return [{"model": m} if isinstance(m, str) else m for m in v]
        return v

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype

    @property
    def tokenizer_mode(self) -> str | None:
        """'base' when vocabulary differences are resolved from the base, else a model ref or None."""
        if self.tokenizer is not None:
            return self.tokenizer.source
        return self.tokenizer_source

    def resolve_path(self, ref: str) -> Path:
        """Model references are local paths, relative to the working directory (as in mergekit)."""
        return Path(ref).expanduser()

    _lines: dict[tuple, int] = {}
    _source: str = "<recipe>"

    def line_of(self, *path: Any) -> int | None:
        return _line_for(self._lines, tuple(path))

    def where(self, *path: Any) -> str:
        """'recipe.yaml, line 7 (models.1.parameters.weight)' for error messages."""
        line = self.line_of(*path)
        key = ".".join(str(p) for p in path)
        return f"{self._source}, line {line} ({key})" if line else f"{self._source} ({key})"


def _line_map(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value
            out[path + (key,)] = k.start_mark.line + 1
            _line_map(v, path + (key,), out)
            out[path + (key,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _line_map(v, path + (i,), out)
    return out


def _line_for(lines: dict[tuple, int], loc: tuple) -> int | None:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return None


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the object at `loc` inside `model`, for 'did you mean' hints."""
    if not loc:
        return list(model.model_fields)
    if model is Recipe and loc[0] == "models" and len(loc) == 2:
        return list(ModelEntry.model_fields)
    if model is Recipe and loc[0] == "tokenizer" and len(loc) == 1:
        return list(TokenizerSpec.model_fields)
    return []


def _format_error(err: dict, lines: dict, source: str, model: type[BaseModel] | None = None) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    line = _line_for(lines, loc)
    where = f"{source}, line {line}" if line else source
    key = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model or Recipe, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{where}: unknown key '{key}'.{hint} Allowed here: {', '.join(allowed)}."
    if err["type"] == "missing":
        return f"{where}: missing required key '{key}'."
    return f"{where}: '{key}': {err['msg']} (got {err.get('input')!r})."


def parse_yaml_model(text: str, source: str, model: type[M], what: str) -> tuple[M, dict[tuple, int]]:
    """Validate YAML `text` against `model`; errors name the key, its line and the closest valid key.

    Returns the validated object and the map from key paths to line numbers. One loader for every
    YAML file the project reads (merge recipes, align recipes), so all report errors alike.
    """
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MergeLabError(f"{source}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise MergeLabError(f"{source}: {what} is a YAML mapping of keys to values.")
    lines = _line_map(node) if node is not None else {}
    if model is Recipe and "slices" in data:
        raise MergeLabError(
            f"{source}, line {lines.get(('slices',), '?')}: mergekit 'slices' (layer stacking) is not supported; "
            "use 'models:' with per-layer parameter gradients instead."
        )
    try:
        return model.model_validate(data), lines
    except ValidationError as e:
        msgs = [_format_error(err, lines, source, model) for err in e.errors()]
        raise MergeLabError(f"invalid {what}:\n  " + "\n  ".join(msgs)) from None


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    recipe, lines = parse_yaml_model(text, source, Recipe, "recipe")
    recipe._lines = lines
    recipe._source = source
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise MergeLabError(f"{path}: recipe file not found.")
    return parse_recipe(path.read_text(), source=str(path))
