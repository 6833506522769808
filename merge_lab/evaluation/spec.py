"""The compare file's schema: `settings:`, `candidates:`, `selection:` and the file itself.

    output: runs/compare            # where report.md, report.html, results.json go
    settings: {limit: 100, split: test, seed: 0, max_new_tokens: 48, batch_size: 8}
    suites: [harmless_refusal, harmless_overrefusal, honest_truefalse, helpful_likelihood,
             capability_commonsenseqa, {name: mine, path: my.jsonl, kind: likelihood}]
    judge: base                     # candidate name or checkpoint folder (win rate, best-of-N)
    reference: base                 # candidate the win rate compares against
    training_data: [advbench:train, {path: my_train.jsonl}]   # proven disjoint from every suite
    candidates:
      - {name: base, checkpoint: ./base, source: true}
      - {name: ties, recipe: ties.yaml}                  # or the recipe inline: {merge_method: ties, ...}
      - {name: ens, ensemble: [base, ties], weights: [0.5, 0.5]}
      - {name: bon, best_of_n: [base, ties]}             # scorer: the judge, or reward_model: ./rm
      - {name: moe, checkpoint: ./moe, choose: {num_experts_per_tok: [1, 2]}}
      - {name: moe_untrained, checkpoint: ./moe0, choose_as: moe}   # the values moe's `choose:` picked
      - {name: mixture, multitask: {align: [a.yaml, b.yaml], fuse: fuse.yaml}}   # trained here (trained.py)
      - {name: ties+train, merge_then_train: {merges: [ties], fuse: fuse.yaml}}  # several: the best on selection
    selection: {split: validation, limit: 24}   # where `choose:` values are tried (never the test split)
    headline: moe                   # the candidate whose tested verdict opens the report
    verdict: {base: base, scale: source, against: [ties], alpha: 0.05}   # the headline's references

Compare files load through merge_lab.core.config, as recipes do: every error names the file, the
line and the key, with the closest valid key when one is misspelt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge_lab.core.config import Where, load_yaml
from merge_lab.errors import MergeLabError

# Raise when a change alters scores, answers or routing shares (cached results of older versions are then redone).
SCORING_VERSION = 5


class Settings(BaseModel):
    """What every candidate is evaluated under: identical across candidates, part of the cache key.
    Also the `settings:` block of compare files."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    limit: int | None = 100
    split: str = "test"
    max_new_tokens: int = 48
    max_length: int = 512
    chat_template: bool = True
    batch_size: int = 8  # scoring: every position's logits are kept, so memory grows with it
    # generating: a decoding step reads every weight once whatever the batch, so wide batches pay
    # (SmolLM2-135M on 2 cores: 0.16 s a step at 8 rows, 0.27 s at 40)
    generate_batch_size: int = 64
    bootstrap: int = 1000
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def key(self) -> dict:
        """The settings that change results (batch size and device do not, by design), and the
        version of the scoring code, so a change to how items are scored invalidates old results."""
        return {**self.model_dump(exclude={"batch_size", "generate_batch_size", "device", "bootstrap"}),
                "scoring": SCORING_VERSION}


CANDIDATE_KINDS = ("checkpoint", "recipe", "ensemble", "best_of_n", "multitask", "merge_then_train")


class MultitaskSpec(BaseModel):
    """`multitask:`: where the data-mixture baseline's rows and budget come from (budget.py)."""

    model_config = ConfigDict(extra="forbid")
    align: list[str] = Field(min_length=1, description="the experts' align recipes (as run)")
    fuse: str | None = Field(None, description="the fuse recipe whose rows, steps and trainable parameters count too")


class MergeThenTrainSpec(BaseModel):
    """`merge_then_train:`: the merges to start from (the best on the selection split) and the fuse recipe."""

    model_config = ConfigDict(extra="forbid")
    merges: list[str] = Field(min_length=1, description="candidate names (or checkpoint folders) of merges")
    fuse: str = Field(description="the fuse recipe whose rows, steps, learning rate and LoRA are used")


class CandidateSpec(BaseModel):
    """One entry of `candidates:`: exactly one of checkpoint, recipe, ensemble, best_of_n."""

    model_config = ConfigDict(extra="forbid")
    name: str
    checkpoint: str | None = None
    recipe: str | dict[str, Any] | None = None
    ensemble: list[str] | None = None
    weights: list[float] | None = None
    best_of_n: list[str] | None = None
    reward_model: str | None = None
    multitask: MultitaskSpec | None = None
    merge_then_train: MergeThenTrainSpec | None = None
    source: bool = False
    group: str | None = None  # e.g. merge, ensemble: the headline is compared with each group's best
    choose: dict[str, list[Any]] | None = None  # config.json values tried on the selection split
    # the values another candidate's `choose:` picked (an ablation that differs from it only in training)
    choose_as: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> CandidateSpec:
        kinds = [k for k in CANDIDATE_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"candidate '{self.name}': give exactly one of {', '.join(CANDIDATE_KINDS)}")
        if self.choose is not None and (self.checkpoint is None or not self.choose or not all(self.choose.values())):
            raise ValueError(f"candidate '{self.name}': `choose:` needs a checkpoint candidate and a non-empty "
                             "list of values per config key, e.g. {num_experts_per_tok: [1, 2]}")
        if self.choose_as is not None and (self.checkpoint is None or self.choose is not None):
            raise ValueError(f"candidate '{self.name}': `choose_as:` needs a checkpoint candidate and no `choose:` of "
                             "its own (it takes the values another candidate's `choose:` picked)")
        return self

    @property
    def selects(self) -> bool:
        """Whether something of this candidate is chosen on the selection split."""
        return bool(self.choose) or self.choose_as is not None or (self.merge_then_train is not None and len(self.merge_then_train.merges) > 1)


class Selection(BaseModel):
    """Where `choose:` values and merge_then_train's merge are compared: a split other than the evaluation split."""

    model_config = ConfigDict(extra="forbid")
    split: str = "validation"
    limit: int | None = None  # items of every suite there (default: each suite's own, as on the test split)


class VerdictSpec(BaseModel):
    """`verdict:`: the references the headline score is anchored to (so it does not move when an
    unrelated candidate joins the file), extra comparators, and the test's level."""

    model_config = ConfigDict(extra="forbid")
    base: str | None = None  # default: the candidate named `base`, else the first `source: true` one
    sources: list[str] | None = None  # default: the `source: true` candidates (the base left out)
    scale: Literal["source", "z"] = "source"  # source: base = 0, best source = 1; z: base's per-item spread
    alpha: float = Field(0.05, gt=0, lt=0.5)
    against: list[str] = []  # compared with the headline besides the best source and each group's best


class CompareSpec(BaseModel):
    """A whole compare file."""

    model_config = ConfigDict(extra="forbid")
    output: str | None = None
    cache_dir: str | None = None
    settings: Settings = Settings()
    suites: list[str | dict[str, Any]]
    candidates: list[CandidateSpec]
    judge: str | dict[str, str] | None = None
    reference: str | None = None
    training_data: list[str | dict[str, Any]] = []
    headline: str | None = None  # the candidate whose verdict leads the report (e.g. the fused model)
    notes: list[str] = []  # plain statements printed first in the report (what the candidates are)
    selection: Selection = Selection()
    verdict: VerdictSpec = VerdictSpec()


@dataclass(frozen=True)
class References:
    """The resolved `verdict:` block: what the headline scale and test use."""

    base: str
    sources: tuple[str, ...]
    scale: str
    alpha: float
    against: tuple[str, ...]


def references(spec: CompareSpec, where: Where | Callable[..., str] | None = None) -> References | None:
    """The declared (or default) references, checked against the candidates; None when the file
    names no base and no source and asks for no verdict. Errors name the key and its line."""
    place = where or (lambda *path: f"compare file ({'.'.join(str(p) for p in path)})")
    names = [c.name for c in spec.candidates]
    v = spec.verdict

    def known(name: str, *path: Any) -> None:
        if name not in names:
            raise MergeLabError(f"{place(*path)}: '{name}' is not a candidate; name one of {', '.join(names)}.")

    if v.base is not None:
        known(v.base, "verdict", "base")
    for i, name in enumerate(v.sources or []):
        known(name, "verdict", "sources", i)
    for i, name in enumerate(v.against):
        known(name, "verdict", "against", i)
        if name == spec.headline:
            raise MergeLabError(f"{place('verdict', 'against', i)}: '{name}' is the headline candidate itself; "
                                "list the candidates it should be compared with.")
    declared = list(v.sources) if v.sources is not None else [c.name for c in spec.candidates if c.source]
    base = v.base or ("base" if "base" in names else (declared[0] if declared else None))
    sources = tuple(s for s in declared if s != base) or tuple(declared)
    asked = spec.headline is not None or "verdict" in spec.model_fields_set
    problem = None
    if base is None:
        problem = "no base to anchor the headline score: add a candidate named `base`, mark source models with " \
                  "`source: true`, or set verdict.base"
    elif v.scale == "source" and (not sources or sources == (base,)):
        problem = (f"the 'source' scale needs source models besides the base ({base}): mark them `source: true`, "
                   "list them in verdict.sources, or use verdict.scale: z")
    if problem:
        if asked:
            raise MergeLabError(f"{place('verdict')}: {problem}.")
        return None
    return References(base, sources, v.scale, v.alpha, tuple(v.against))


def load_spec(path: str | Path) -> tuple[CompareSpec, Where]:
    """The compare file at `path` and where each of its keys is (for later errors)."""
    return load_yaml(path, CompareSpec, "compare file")
