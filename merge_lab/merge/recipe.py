"""Recipes: YAML validated with pydantic, errors that name the key and its line.

The schema is a superset of mergekit's for the methods we support (`merge_method`, `base_model`,
`models[].model`, `models[].parameters`, `parameters`, `dtype`, `out_dtype`, `tokenizer_source`,
`tokenizer` with `source`, `tokens` and `pad_to_multiple_of`, `chat_template`), so a mergekit
recipe runs unchanged. Our additions: `seed`, `shard_size`, `allow_non_finite`, `compute_dtype`, `models[].label` and `train:` (both for structural strategies such as `h3_moe`).

mergekit's `slices:` is the other way to list the inputs: each output slice names, for every
source model, the layer range [a, b) it contributes (all sources of a slice equally long), with
per-source and per-slice `parameters`. `slice_view(k)` presents one slice as a `models:` recipe
(parameters resolved source, then slice, then recipe-wide, as mergekit does), so strategies and
parameter checks see one shape of recipe whichever form was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from merge_lab.core.config import Where, load_yaml_text, read_text, validate
from merge_lab.errors import MergeLabError

DType = Literal["float32", "float16", "bfloat16"]
M = TypeVar("M", bound=BaseModel)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="local model folder, MODEL+ADAPTER (a PEFT LoRA adapter applied), or a PEFT adapter folder "
        "where a strategy accepts one"
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="this model's own parameters")
    label: str | None = Field(None, description="objective this model is an expert for (structural strategies)")


class SliceSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="local model folder, or MODEL+ADAPTER (a PEFT LoRA adapter applied)")
    layer_range: tuple[int, int] = Field(description="[a, b]: this model's layers a .. b-1")
    parameters: dict[str, Any] = Field(default_factory=dict, description="this source's own parameters")

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range [a, b] takes layers a .. b-1 and needs 0 <= a < b, not {list(v)}")
        return v


class OutputSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sources: list[SliceSource] = Field(min_length=1, description="the models and layer ranges merged into this slice")
    parameters: dict[str, Any] = Field(default_factory=dict, description="parameters for this slice's tensors")

    @property
    def length(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a


def _conditionals(value: Any) -> list:
    """A parameter value as a list of {filter, value} conditionals, so scopes can be chained."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return list(value)
    return [{"value": value}]


class ZeroEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["zero"] = Field(description="the token's embedding rows are zero")


class ModelTokenEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_token"] = Field(description="the rows of one token (or id) of one model")
    model: str = Field(description="the model (among the recipe's) whose row is taken")
    token: str | None = Field(None, description="the token, in that model's own vocabulary")
    token_id: int | None = Field(None, ge=0, description="or its id in that model's vocabulary")

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenEmbedding:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class TokenEmbedding(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: ZeroEmbedding | ModelTokenEmbedding | str | None = Field(
        None, description="{kind: zero}, a model (its row of this token) or {kind: model_token, model, token}"
    )
    force: bool = Field(False, description="use `source` in every model, even those that have the token")


class TokenizerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("union", description="'base', 'union' or a model whose vocabulary the output takes")
    tokens: dict[str, TokenEmbedding] | None = Field(
        None, description="tokens added to the output vocabulary, or whose rows come from a chosen source"
    )
    pad_to_multiple_of: int | None = Field(None, gt=0, description="pad the vocabulary rows to a multiple of this")


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    merge_method: str = Field(description="strategy name; `merge-lab strategies` lists them")
    base_model: str | None = Field(
        None, description="the common base (needed by delta-based methods); MODEL+ADAPTER applies an adapter"
    )
    models: list[ModelEntry] = Field(default_factory=list, description="the models to merge")
    slices: list[OutputSlice] | None = Field(
        None, description="mergekit's layer slices: output layers from layer ranges of the models (instead of models:)"
    )
    parameters: dict[str, Any] = Field(default_factory=dict, description="merge-wide parameters and per-model defaults")
    dtype: DType | None = Field(
        None, description="dtype the inputs are cast to and the merge computes in, as in mergekit; also the output's"
    )
    compute_dtype: DType | None = Field(
        None, description="arithmetic dtype, overriding mergekit's (`dtype`, else the inputs'); e.g. float32"
    )
    out_dtype: DType | None = Field(None, description="mergekit's name for the output dtype; wins over dtype")
    tokenizer: TokenizerSpec | None = Field(None, description="the output vocabulary: embedding rows aligned by token")
    tokenizer_source: str | None = Field(None, description="mergekit's spelling of tokenizer.source")
    chat_template: str | None = Field(None, description="'auto', a template name (chatml, llama3 ...) or a jinja text")
    seed: int = Field(0, description="seed for random strategies (DARE masks)")
    shard_size: str | int = Field("2GB", description="maximum bytes per output shard, e.g. 2GB")
    allow_non_finite: bool = Field(
        False, description="merge inputs holding NaN / Inf (counted in the model card) instead of refusing them"
    )
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

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> Recipe:
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give 'tokenizer:' or mergekit's 'tokenizer_source:', not both")
        return self

    @property
    def tokenizer_mode(self) -> str | None:
        """'base' when vocabulary differences are resolved from the base, else a model ref or None."""
        source = self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source
        return "base" if source is not None and source != "base" and self.is_base(source) else source

    def resolve_path(self, ref: str) -> Path:
        """Model references are local paths, relative to the working directory (as in mergekit)."""
        return Path(ref).expanduser()

    # -- one model, one identity: references are compared by what they resolve to, not by spelling

    def model_identity(self, ref: str) -> Path:
        """The folder a reference stands for, links followed: `./base`, `base/`, an absolute path
        and a symlink to it are one model (and MODEL+ADAPTER, both folders so resolved)."""
        from merge_lab.core.references import reference_identity  # (imports torch: only when asked)

        return reference_identity(ref, self.resolve_path)

    def is_base(self, ref: str) -> bool:
        """Whether `ref` names the base model, however it is spelled."""
        return self.base_model is not None and self.model_identity(ref) == self.model_identity(self.base_model)

    def check_distinct_models(self) -> None:
        """Refuse a model listed twice (in any spelling): it would silently count twice. A model
        that should count more is given a larger weight instead. Labelled entries (the experts of
        a structural strategy such as h3_moe) are roles, which that strategy checks: one model may
        serve several of them."""
        seen: dict[Path, int] = {}
        for i, entry in enumerate(self.models):
            key = self.model_identity(entry.model)
            other = self.models[seen[key]] if key in seen else None
            if other is not None and not (entry.label and other.label):
                j = seen[key]
                raise MergeLabError(
                    f"{self.where('models', i)}: '{entry.model}' is the model already listed as models.{j} "
                    f"('{self.models[j].model}'); both are {key}. A model listed twice would count twice without "
                    "saying so: list it once and give it a larger weight if it should count more."
                )
            seen[key] = i

    _where: Where = Where("<recipe>")

    @classmethod
    def located(cls, data: dict, where: Where) -> Recipe:
        """The recipe in `data`, validated, whose errors name the lines `where` maps its keys to."""
        recipe = validate(cls, data, where, "recipe")
        recipe._where = where
        return recipe
    _slice: int | None = None  # set on slice_view(k): messages point into slices.k
    _slice_keys: frozenset = frozenset()

    def slice_view(self, k: int) -> Recipe:
        """Output slice k as a `models:` recipe: its sources as the models, its parameters chained
        before the recipe-wide ones (a slice's conditional that matches nothing falls through to
        the recipe's, as in mergekit); messages name the slice's keys and lines."""
        assert self.slices is not None
        s = self.slices[k]
        params = dict(self.parameters)
        for key, value in s.parameters.items():
            params[key] = _conditionals(value) + _conditionals(params[key]) if key in params else value
        models = [ModelEntry(model=src.model, parameters=src.parameters) for src in s.sources]
        view = self.model_copy(update={"models": models, "slices": None, "parameters": params})
        view._where, view._slice, view._slice_keys = self._where, k, frozenset(s.parameters)
        return view

    def _path(self, path: tuple) -> tuple:
        """A key path of a slice view as written in the file."""
        k = self._slice
        if k is None or not path:
            return path
        if path[0] == "models":
            return ("slices", k, "sources", *path[1:])
        if path[0] == "parameters" and (len(path) == 1 or path[1] in self._slice_keys):
            return ("slices", k, *path)
        return path

    @property
    def source(self) -> str:
        """The file the recipe came from, for messages."""
        return self._where.source

    def where(self, *path: Any) -> str:
        """'recipe.yaml, line 7 (models.1.parameters.weight)' for error messages."""
        return self._where(*self._path(path))

    def validate_block(self, model: type[M], path: tuple, what: str, data: Any = None) -> M:
        """A block of this recipe (its `train:`, its parameters) as `model`, errors with recipe lines."""
        if data is None:
            data = self
            for p in path:
                data = data[p] if isinstance(data, (dict, list)) else getattr(data, p)
        return validate(model, data, self._where, what, self._path(tuple(path)))


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    data, where = load_yaml_text(text, source, "recipe")
    if not isinstance(data, dict):
        raise MergeLabError(f"{source}: a recipe is a YAML mapping of keys to values.")
    from merge_lab.moe.mergekit_config import refuse_as_recipe  # (imports torch: only when parsing)

    refuse_as_recipe(data, source)
    if "slices" in data and "models" in data:
        raise MergeLabError(
            f"{where('slices')}: a recipe lists its inputs under 'models:' ({where('models')}) or under "
            "'slices:', not both. Keep one: 'models:' merges whole models, 'slices:' picks layer ranges."
        )
    if "slices" not in data and "models" not in data:
        raise MergeLabError(f"invalid recipe: {source}: missing required key 'models' (or mergekit's 'slices').")
    recipe = Recipe.located(data, where)
    if recipe.slices is None:
        recipe.check_distinct_models()
        return recipe
    if not recipe.slices:
        raise MergeLabError(f"{where('slices')}: 'slices:' is empty; give at least one output slice.")
    for k, s in enumerate(recipe.slices):
        lengths = [src.layer_range[1] - src.layer_range[0] for src in s.sources]
        if len(set(lengths)) > 1:
            ranges = ", ".join(f"{src.model} {list(src.layer_range)}" for src in s.sources)
            raise MergeLabError(
                f"{where('slices', k, 'sources')}: the sources of slice {k} span different numbers of layers "
                f"({ranges}: {lengths}); every source of a slice gives one layer to each of its output layers, "
                "so give them ranges of equal length."
            )
        recipe.slice_view(k).check_distinct_models()
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_text(path, "recipe file"), source=str(path))
