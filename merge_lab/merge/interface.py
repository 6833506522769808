"""The strategy interface and its one registry.

A strategy is a class. It declares two pydantic models of typed, validated parameters with
defaults and help text:
- `Params`: merge-wide settings (e.g. TIES' `lambda`);
- `ModelParams`: settings that each input model may set for itself (e.g. `weight`, `density`);
  given under the recipe's global `parameters:` they are every model's default.

A tensor-wise strategy implements `merge()` for one tensor group; the engine reads the files and
hands it tensors in its working_dtype() (float32 unless it computes in the recipe's dtype). A
structural strategy (one that changes the architecture, like the H3 MoE fusion) sets
`structural = True` and implements `build_plan()` to lay out the whole output as tasks whose ops
follow merge.ops' protocol (what each reads, how it computes; work that needs a model first is a
plan step), still executed by the same engine and writer.

Strategies are discovered through the entry-point group `merge_lab.strategies` (core.registry); the built-ins in
`strategies/` register exactly that way. `register()` adds one at run time (tests, notebooks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

from merge_lab.core.architecture import TensorRole
from merge_lab.core.registry import Registry

if TYPE_CHECKING:
    from merge_lab.merge.plan import Plan, PlanContext
    from merge_lab.merge.recipe import Recipe

ENTRY_POINT_GROUP = "merge_lab.strategies"


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TensorContext:
    """What a strategy may know about the tensor it merges (never the files)."""

    name: str
    role: TensorRole
    seed: int
    model_ids: tuple[str, ...]  # the recipe's reference for each input, in order
    # The whole tensor's statistics (see Strategy.stats_passes) when the engine gathered them over
    # row blocks beforehand; None when merge() gets the whole tensor and should gather them itself.
    stats: Any = field(default=None, compare=False, repr=False)

    def generator(self, model_index: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from (seed, tensor name, model): independent of order and threads."""
        key = f"{self.seed}\x00{self.name}\x00{self.model_ids[model_index]}".encode()
        g = torch.Generator(device=device)
        g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
        return g


class Strategy:
    """Base class of every merge strategy. Subclass, set the class attributes, implement merge()."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    ModelParams: ClassVar[type[BaseModel]] = NoParams
    needs_base: ClassVar[bool] = False
    uses_base: ClassVar[bool] = False  # the base takes part when given
    symmetric: ClassVar[bool] = True  # result does not depend on the order of the models
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    structural: ClassVar[bool] = False
    # True when a row of the result depends only on that row of the inputs and on the tensor's
    # statistics (random draws coming in row-major order from ctx.generator): the engine may then
    # stream a tensor in row blocks, first folding every block into the statistics when
    # stats_passes() asks for them (see fold_stats), then merging every block with them in ctx.stats.
    row_separable: ClassVar[bool] = False
    # Parameters under which the result equals the first model exactly (used by the contract suite).
    identity_params: ClassVar[dict[str, Any]] = {}

    def working_dtype(self, arithmetic: torch.dtype) -> torch.dtype:
        """The dtype merge() gets its float inputs in, given the recipe's arithmetic dtype (see
        merge.planner.arithmetic_dtype); the inputs are rounded to `arithmetic` first, as
        mergekit's loader casts them. By default float32 (float64 stays float64): what mergekit's
        linear and slerp compute in whatever they are given, and what strategies written for
        float32 expect. Strategies whose mergekit counterpart computes in the tensors' dtype
        return `arithmetic`, and then see bfloat16 or float16 tensors."""
        return torch.float64 if arithmetic == torch.float64 else torch.float32

    def merge(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: BaseModel,
        model_params: list[BaseModel],
        ctx: TensorContext,
    ) -> torch.Tensor:
        """Merge one tensor group. Inputs are in working_dtype() on the compute device; return the
        same shape (in any float dtype: the writer casts to the output dtype)."""
        raise NotImplementedError

    # -- whole-tensor statistics, for strategies that are elementwise once they know a few scalars
    # (slerp's angle, TIES' magnitude threshold): the engine streams such a tensor in row blocks,
    # pass by pass, instead of holding it whole.

    def stats_passes(self, params: BaseModel, model_params: list[BaseModel], dtype: torch.dtype) -> int:
        """How many passes over the tensor's row blocks gather its statistics (0: none needed), for a
        tensor computed in `dtype` (mergekit's 16-bit arithmetic can round between reductions that
        float32 gathers in one pass)."""
        return 0

    def held_bytes(self, numel: int, params: BaseModel, model_params: list[BaseModel], dtype: torch.dtype) -> int:
        """Bytes the statistics of a tensor of `numel` entries, computed in `dtype`, hold until its
        merge ends (a mask kept between the passes, say): counted in the plan's predicted peak.
        Default: none."""
        return 0

    def fold_stats(
        self,
        pass_index: int,
        stats: Any,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        params: BaseModel,
        model_params: list[BaseModel],
        ctx: TensorContext,
    ) -> Any:
        """Fold one row block (or the whole tensor) into the statistics and return them.

        `stats` is None at the first block of pass 0, then whatever the previous call returned.
        Must not modify the inputs, nor draw from ctx.generator (merge() owns the random streams).
        """
        raise NotImplementedError

    def finish_stats(self, pass_index: int, stats: Any, params: BaseModel, model_params: list[BaseModel]) -> Any:
        """Called after the last block of each pass (e.g. to pick a histogram bin); returns the stats."""
        return stats

    def tensor_stats(self, tensors, base, params, model_params, ctx: TensorContext) -> Any:
        """The statistics of a tensor given whole: every pass over one block. merge() calls this
        when ctx.stats is None, so whole and streamed tensors share one definition."""
        stats = None
        for p in range(self.stats_passes(params, model_params, tensors[0].dtype)):
            stats = self.fold_stats(p, stats, tensors, base, params, model_params, ctx)
            stats = self.finish_stats(p, stats, params, model_params)
        return stats

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Raise MergeLabError for recipe-level mistakes this strategy can see before any read."""

    @classmethod
    def check_params(cls, params: BaseModel, model_params: list[BaseModel]) -> str | None:
        """Why one tensor's resolved parameters cannot be merged (a rule across several of them,
        e.g. weights that sum to zero under `normalize`), or None. Single values are ranged by
        the pydantic models; the planner calls this for every tensor, so `validate` sees it."""
        return None

    def build_plan(self, ctx: PlanContext) -> Plan:
        """Structural strategies lay out the whole output here."""
        raise NotImplementedError

    @classmethod
    def param_fields(cls) -> dict[str, tuple[str, FieldInfo]]:
        """recipe key -> (scope 'model' or 'global', pydantic FieldInfo), for validation and help."""
        out = {k: ("model", f) for k, f in recipe_keys(cls.ModelParams).items()}
        out.update({k: ("global", f) for k, f in recipe_keys(cls.Params).items()})
        return out


def recipe_keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A params model's keys as written in recipes (the alias where one is set, e.g. `lambda`)."""
    return {(f.alias or n): f for n, f in model.model_fields.items()}


STRATEGIES: Registry[type[Strategy]] = Registry(ENTRY_POINT_GROUP, "merge method", Strategy, "merge-lab strategies")
register = STRATEGIES.register
available = STRATEGIES.available
get = STRATEGIES.get
