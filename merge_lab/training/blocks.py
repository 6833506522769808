"""Training data blocks: the `data:` entries of align recipes and the `train.data:` entries of fusion recipes.

A block selects items from one origin (a shipped source by split, the user's JSONL, or a
registered suite's train split), keeps those with a label, the first `limit`, and templates the
prompt and the reply (`{refusal}` is one of REFUSALS, picked by the item's id, so a shipped
harmful request with no reply gets a stable refusal to learn). Align trains on the rows as they
are; fusion blocks add `expert: LABEL`, the expert the rows are for.

    - {source: advbench, split: train, limit: 60, response_template: "{refusal}"}
    - {jsonl: my_rows.jsonl}
    - {suite: harmless_refusal, limit: 40, response_template: "{refusal}", expert: harmless}   # fusion

Every row is a `merge_lab.datasets.sources.Example` (its id says where it came from), with the
templated prompt and reply.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from merge_lab.datasets import sources as data
from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError

# Templated refusals for harmful requests that ship without a reply (AdvBench, Do-Not-Answer, HarmBench).
REFUSALS = (
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, but I won't help with this request because it could be used to hurt someone.",
    "I can't assist with that. If you are facing a difficult situation, please reach out to someone you trust or a local support service.",
    "Sorry, I can't provide that. It would be unsafe and possibly illegal.",
    "I won't do that. Helping with this could put people at risk.",
)

# Names a block's key in an error: at(i) is block i, at(i, "split") its `split:` (a recipe's
# Where bound to the blocks' list gives file and line).
Locate = Callable[..., str]
# Checks one raw JSONL row (a dict) and returns what is wrong with it, or None.
RowCheck = Callable[[dict], str | None]


class DataSpec(BaseModel):
    """One block of training rows: a shipped source (by split), a JSONL file, or a suite's train split."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="a shipped source (merge_lab.datasets.sources.sources())")
    jsonl: str | None = Field(None, description="a JSONL file: one {prompt, response} object per line")
    suite: str | None = Field(None, description="a registered suite's item selection, on its 'train' split only")
    split: Literal["train", "validation", "test"] | None = Field(
        "train", description="shipped sources: which split (never train on 'test')")
    limit: int | None = Field(None, ge=1, description="at most this many rows from this block")
    label: Any = Field(None, description="keep only items with this label (or list of labels)")
    prompt_template: str | None = Field(None, description="format the prompt, e.g. 'True or false? {response}'")
    response_template: str | None = Field(None, description="format the reply, e.g. '{refusal}' or 'False.'")

    @model_validator(mode="after")
    def _one_origin(self) -> DataSpec:
        if sum(x is not None for x in (self.source, self.jsonl, self.suite)) != 1:
            raise ValueError("give exactly one of 'source' (a shipped data set), 'jsonl' (a file) or 'suite'")
        return self

    @field_validator("split")
    @classmethod
    def _suite_trains_on_train(cls, split: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("suite") is not None and split != "train":
            raise ValueError(f"a suite block reads the suite's 'train' split only (its '{split}' items are "
                             "evaluation items); drop `split:` or set it to train")
        return split

    def describe(self) -> str:
        """'advbench', 'my_rows.jsonl' or 'suite harmless_refusal', for messages."""
        return self.source or self.jsonl or f"suite {self.suite}"


class ExpertBlock(DataSpec):
    """A fusion data block: an align block whose rows train one expert of the fused model."""

    expert: str | None = Field(
        None, description="the expert label these rows are for; a jsonl block may leave it out when "
                          "each of its rows names its expert in `label`")

    @model_validator(mode="after")
    def _expert_named(self) -> ExpertBlock:
        if self.expert is None and self.jsonl is None:
            raise ValueError("a source or suite block needs `expert: LABEL` (the expert its rows are for); "
                             "only a jsonl block whose rows carry a `label` may leave it out")
        return self


def refusal(item_id: str) -> str:
    """One of REFUSALS, the same for an item every time (a hash of its id)."""
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:4], "little")
    return REFUSALS[h % len(REFUSALS)]


def fill(template: str, ex: Example, where: str) -> str:
    """`template` with the item's fields: prompt, response, label, refusal and its meta keys."""
    fields = {**ex.meta, "prompt": ex.prompt, "response": ex.response or "", "label": ex.label,
              "refusal": refusal(ex.id)}
    try:
        return template.format_map(fields)
    except (KeyError, IndexError, ValueError) as e:
        raise MergeLabError(
            f"{where}: template {template!r} uses {e} which item {ex.id} does not have; "
            f"fields available: {', '.join(sorted(fields))}."
        ) from None


def suite_train_items(name: str, response_template: str | None, where: str) -> list[Example]:
    """A registered suite's own item selection (its sources, `keep` filter and order) on the
    'train' split: items its evaluation never sees, since splits go by content hash. Suites that
    score a reference response (likelihood, true/false, multiple choice) give it as the reply;
    the others (refusal rate, win rate) score only what the model writes to a prompt, so their
    items have no reply to learn: those need a `response_template` (e.g. "{refusal}")."""
    from merge_lab.evaluation import suites

    cls = suites.SUITES.get(name, where)
    if cls.ood:
        raise MergeLabError(f"{where}: suite '{name}' is out of distribution: its sources ({', '.join(cls.sources)}) "
                            "are evaluation-only, held out whole; train on an in-distribution suite or source.")
    reference = issubclass(cls, (suites.LikelihoodSuite, suites.TrueFalseSuite, suites.MultipleChoiceSuite))
    if not reference and response_template is None:
        raise MergeLabError(
            f"{where}: suite '{name}' scores the {cls.metric} of the model's own answers, so its items carry no "
            "reference response to train on; give a response_template, e.g. \"{refusal}\" (a templated "
            "refusal) or \"{response}\" (the item's shipped reply, where it has one)."
        )
    suite = cls()
    suite.split = "train"  # evaluation refuses this split; here it is the point: never an evaluated item
    items = suite.load_items()
    leaked = [e.id for e in items if data.split_of(e) != "train"]
    if leaked:  # a suite that ignores the split (e.g. one reading its own file) would hand us its test items
        raise MergeLabError(
            f"{where}: suite '{name}' does not select its items by merge_lab.datasets.sources's splits ({len(leaked)} are "
            f"evaluation items, e.g. {leaked[0]}); it cannot give training rows. Use `source:` or `jsonl:` blocks."
        )
    return items


def block_items(spec: DataSpec, where: str, check: RowCheck | None = None) -> list[Example]:
    """The items a block selects, before templating: its origin, then the label filter, then the limit.
    `check` is applied to every raw row of a JSONL block (an error names the file's line)."""
    if spec.suite is not None:
        items = suite_train_items(spec.suite, spec.response_template, where)
    elif spec.source is not None:
        if spec.split == "test":
            raise MergeLabError(f"{where}: training on the 'test' split would leak evaluation items; use 'train'.")
        if spec.source in data.EVALUATION_ONLY:
            raise MergeLabError(f"{where}: source '{spec.source}' is evaluation-only (it has no train split); "
                                "train on another source or on your own JSONL.")
        items = data.select(spec.source, spec.split)
    else:
        try:
            items = data.load_jsonl(spec.jsonl, check=check)
        except MergeLabError as e:
            raise MergeLabError(f"{where}: {e}") from None
    if spec.label is not None:
        wanted = spec.label if isinstance(spec.label, list) else [spec.label]
        items = [e for e in items if e.label in wanted]
    return items[: spec.limit] if spec.limit is not None else items


def templated(spec: DataSpec, items: list[Example], where: str) -> list[Example]:
    """The items with the block's templates applied, stripped; an item left without a prompt or
    a reply is an error that says which template to give."""
    if not items:
        raise MergeLabError(f"{where}: selects no items; check source, split, label and limit.")
    rows = []
    for ex in items:
        prompt = fill(spec.prompt_template, ex, where) if spec.prompt_template else ex.prompt
        response = fill(spec.response_template, ex, where) if spec.response_template else ex.response
        if not prompt or not prompt.strip():
            raise MergeLabError(f"{where}: item {ex.id} has no prompt; give a prompt_template.")
        if not response or not str(response).strip():
            raise MergeLabError(f"{where}: item {ex.id} has no response; give a response_template (e.g. '{{refusal}}').")
        rows.append(replace(ex, prompt=prompt.strip(), response=str(response).strip()))
    return rows


def plain_keys(prefix: str) -> Locate:
    """A Locate without a file: at(0, "split") -> 'data.0.split'."""
    return lambda *path: ".".join([prefix, *map(str, path)])


def training_rows(blocks: list[DataSpec], at: Locate = plain_keys("data")) -> list[Example]:
    """The rows the blocks select, templated, in a stable order (blocks in turn, items in file order)."""
    rows: list[Example] = []
    for i, spec in enumerate(blocks):
        rows += templated(spec, block_items(spec, at(i)), f"{at(i)} ({spec.describe()})")
    return rows
