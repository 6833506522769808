"""Candidates that the comparison trains itself: the same-training baselines of the fused model.

- `MultitaskCandidate` (`multitask: {align: [...], fuse: ...}`): the data-mixture baseline, one LoRA
  fine-tune of the base on the union of the experts' and the fusion's rows with their budget together;
- `MergeThenTrainCandidate` (`merge_then_train: {merges: [...], fuse: ...}`): the best merge (chosen
  on the selection split, selection.py) trained further with the fusion's rows, steps and LoRA.

The budget comes from the recipes (budget.py). Training is `merge-lab align`'s, on first use, into
`cache/trained/<name>-<fingerprint>` (the fingerprint covers the base's weights, the rows and the
schedule), so a second comparison reuses it. Their rows are checked disjoint from every suite before
any model runs, as every other candidate's training data is (prepare.py, leakage.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.budget import TrainingPlan, merge_then_train_plan, multitask_plan
from merge_lab.evaluation.candidates import ModelCandidate
from merge_lab.evaluation.fingerprint import combine, fingerprint_folder
from merge_lab.evaluation.memo import Memo
from merge_lab.evaluation.processes import current
from merge_lab.evaluation.spec import Settings


class TrainedCandidate(ModelCandidate):
    """A LoRA fine-tune made on first use from a `TrainingPlan`; subclasses say how the plan is made."""

    kind = "trained"
    made_by_all_processes = True

    def __init__(self, name: str, cache_dir: Path, settings: Settings, memo: Memo | None = None):
        self.cache_dir = cache_dir
        self._plan: TrainingPlan | None = None
        self._fp: str | None = None
        super().__init__(name, cache_dir, settings, memo)

    def make_plan(self) -> TrainingPlan:
        raise NotImplementedError

    def base_fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def plan(self) -> TrainingPlan:
        if self._plan is None:
            try:
                self._plan = self.make_plan()
            except MergeLabError as e:
                raise MergeLabError(f"candidate '{self.name}': {e}") from None
        return self._plan

    def training_rows(self) -> list[Example]:
        """The rows this candidate trains on: checked disjoint from the suites before any model runs."""
        return self.plan.rows

    def check(self) -> None:
        if not (self.plan.base / "config.json").is_file():
            raise MergeLabError(f"candidate '{self.name}': {self.plan.base} is not a checkpoint folder (no config.json).")
        self.fingerprint()

    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = combine(self.kind, [self.base_fingerprint(), self.plan.digest()])
            self.path = self.cache_dir / "trained" / f"{self.name}-{self._fp}" / "merged"
        return self._fp

    def describe(self) -> dict:
        return {"kind": self.kind, "fingerprint": self.fingerprint(), "training": self.plan.record()}

    def tokenizer_path(self) -> Path:
        self.fingerprint()
        return self.path if (self.path / "tokenizer_config.json").exists() else self.plan.base

    def model_paths(self) -> list[Path]:
        self.fingerprint()
        if not current().from_main(lambda: (self.path / "config.json").exists()):
            train_plan(self.plan, self.path.parent, self.name)
        return [self.path]


def train_plan(plan: TrainingPlan, out: Path, label: str) -> None:
    """Run the plan with `merge-lab align` into `out` (adapter/, merged/, train_items.json), all or nothing;
    the rows go through a JSONL that keeps their ids, so train_items.json names the shipped items."""
    from merge_lab.training.align import AlignRecipe, align

    processes = current()
    out.parent.mkdir(parents=True, exist_ok=True)
    rows_file = out.parent / f".{out.name}.rows.jsonl"
    text = "".join(json.dumps({"id": r.id, "prompt": r.prompt, "response": r.response}) + "\n" for r in plan.rows)
    processes.main_first(lambda: None if rows_file.exists() and rows_file.read_text() == text else rows_file.write_text(text))
    recipe = AlignRecipe.model_validate({
        "base_model": str(plan.base), "label": label, "name": f"{plan.kind} baseline {label}",
        "data": [{"jsonl": str(rows_file)}], "lora": plan.lora, "train": plan.train})
    try:
        align(recipe, out, force=True, progress=False)  # the processes share it; the main one saves
    finally:
        processes.barrier()
        if processes.main:
            rows_file.unlink(missing_ok=True)
    if processes.main:
        (out / "training_record.json").write_text(json.dumps(plan.record(), indent=1) + "\n")
    processes.barrier()


class MultitaskCandidate(TrainedCandidate):
    """One LoRA fine-tune of the base on every expert's and the fusion's rows, with their budget together."""

    kind = "multitask"

    def __init__(self, name: str, align_recipes: list[Path], fuse_recipe: Path | None, cache_dir: Path,
                 settings: Settings, memo: Memo | None = None):
        super().__init__(name, cache_dir, settings, memo)
        self.align_recipes = align_recipes
        self.fuse_recipe = fuse_recipe

    def make_plan(self) -> TrainingPlan:
        for p in [*self.align_recipes, *([self.fuse_recipe] if self.fuse_recipe else [])]:
            if not p.is_file():
                raise MergeLabError(f"recipe {p} not found.")
        return multitask_plan(self.align_recipes, self.fuse_recipe)

    def base_fingerprint(self) -> str:
        return fingerprint_folder(self.plan.base)


class MergeThenTrainCandidate(TrainedCandidate):
    """A merge trained further with the fusion's rows, steps and LoRA. With several merges listed,
    selection.py picks the best on the selection split (`choose_merge`) before it is trained."""

    kind = "merge_then_train"

    def __init__(self, name: str, merges: list[ModelCandidate], fuse_recipe: Path, cache_dir: Path,
                 settings: Settings, memo: Memo | None = None):
        if not merges:
            raise MergeLabError(f"candidate '{name}': merge_then_train needs at least one merge.")
        super().__init__(name, cache_dir, settings, memo)
        self.merges = merges
        self.fuse_recipe = fuse_recipe
        self.merge: ModelCandidate | None = merges[0] if len(merges) == 1 else None

    def choose_merge(self, merge: ModelCandidate) -> None:
        """Train from `merge` (one of `merges`): what selection found best on the selection split."""
        self.merge, self._plan, self._fp = merge, None, None

    def chosen(self) -> ModelCandidate:
        if self.merge is None:
            raise MergeLabError(f"candidate '{self.name}': no merge chosen yet among "
                                f"{', '.join(m.name for m in self.merges)} (selection chooses it on the selection split).")
        return self.merge

    def make_plan(self) -> TrainingPlan:
        if not self.fuse_recipe.is_file():
            raise MergeLabError(f"recipe {self.fuse_recipe} not found.")
        merge = self.chosen()
        merge.model_paths()  # a recipe candidate is merged here
        return merge_then_train_plan(self.fuse_recipe, merge.path)

    def training_rows(self) -> list[Example]:
        """The fusion's rows, whichever merge is chosen (known before the choice)."""
        from merge_lab.evaluation.budget import fusion_budget

        if self._plan is not None:
            return self._plan.rows
        try:
            return list(fusion_budget(self.fuse_recipe)[3])
        except MergeLabError as e:
            raise MergeLabError(f"candidate '{self.name}': {e}") from None

    def check(self) -> None:
        for m in self.merges:
            m.check()
        if self.merge is not None:
            super().check()
        else:
            self.training_rows()

    def base_fingerprint(self) -> str:
        return self.chosen().fingerprint()

    def describe(self) -> dict:
        return {**super().describe(), "merge": self.chosen().name, "merges": [m.name for m in self.merges]}
