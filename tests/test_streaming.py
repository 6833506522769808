"""TIES and slerp stream in row blocks: statistics passes first, then an elementwise merge.

Their memory then follows the block size, not the largest tensor; the results equal the
whole-tensor ones (tests/test_benchmarks_engine.py compares whole files byte for byte).
"""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_lab.merge import interface as registry
from merge_lab.merge.engine import merge
from merge_lab.merge.interface import TensorContext
from merge_lab.merge.ops import ALLOCATOR_SLACK
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import load_recipe
from merge_lab.strategies.slerp import SlerpParams
from merge_lab.strategies.sparsify import TopKThreshold, magnitude_bits, trim_topk_
from merge_lab.strategies.ties import TiesParams

BLOCK = 256  # elements per row block, forced: the tiny models' largest tensor has 3072


def _recipe(path, method, base, models):
    if method == "slerp":
        r = {"merge_method": "slerp", "base_model": str(base), "models": [str(models[0])], "parameters": {"t": 0.3}}
    else:
        r = {"merge_method": "ties", "base_model": str(base), "parameters": {"density": 0.4},
             "models": [{"model": str(m), "parameters": {"weight": 0.7}} for m in models]}
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_strategy_only_ever_sees_row_blocks(method, family, tmp_path, monkeypatch):
    """Fails if the engine hands TIES or slerp a whole tensor larger than a block, or if their
    merge has to gather the statistics itself (it gets them in ctx.stats)."""
    base, models = family
    cls = registry.get(method)
    seen = {"merge": [], "fold": [], "stats": []}
    merge_fn, fold_fn = cls.merge, cls.fold_stats

    def spy_merge(self, tensors, base, params, model_params, ctx):
        seen["merge"].append(max(t.numel() for t in [*tensors, base] if t is not None))
        seen["stats"].append(ctx.stats is not None)
        return merge_fn(self, tensors, base, params, model_params, ctx)

    def spy_fold(self, pass_index, stats, tensors, base, *rest):
        seen["fold"].append(max(t.numel() for t in [*tensors, base] if t is not None))
        return fold_fn(self, pass_index, stats, tensors, base, *rest)

    monkeypatch.setattr(cls, "merge", spy_merge)
    monkeypatch.setattr(cls, "fold_stats", spy_fold)
    merge(_recipe(tmp_path / "r.yaml", method, base, models), tmp_path / "out", progress=False, hash_inputs=False,
          chunk_elements=BLOCK)
    assert max(seen["merge"]) <= BLOCK and max(seen["fold"]) <= BLOCK
    streamed = sum(seen["stats"])  # blocks merged with the engine's statistics; the rest are whole
    assert streamed > len(seen["merge"]) - streamed > 0  # small tensors (norms) still come whole
    passes = 2 if method == "ties" else 1
    # every block folded once per pass (whole tensors may fold inside merge: TIES does)
    assert passes * streamed <= len(seen["fold"]) <= passes * len(seen["merge"])


def _blocked(strategy, tensors, base, params, model_params, rows):
    """Drive a strategy as the engine does: every statistics pass over the row blocks, then merge."""
    ctx = TensorContext("w", None, 0, tuple(str(i) for i in range(len(tensors))))
    blocks = [slice(i, i + rows) for i in range(0, tensors[0].shape[0], rows)]
    stats = None
    passes = strategy.stats_passes(params, model_params, tensors[0].dtype)
    for p in range(passes):
        for b in blocks:
            stats = strategy.fold_stats(p, stats, [t[b] for t in tensors], base[b], params, model_params, ctx)
        stats = strategy.finish_stats(p, stats, params, model_params)
    out = [
        strategy.merge([t[b].clone() for t in tensors], base[b].clone(), params, model_params,
                       TensorContext(ctx.name, ctx.role, ctx.seed, ctx.model_ids, stats=stats if passes else None))
        for b in blocks
    ]
    return torch.cat(out)


def _whole(strategy, tensors, base, params, model_params):
    ctx = TensorContext("w", None, 0, tuple(str(i) for i in range(len(tensors))))
    return strategy.merge([t.clone() for t in tensors], base.clone(), params, model_params, ctx)


@pytest.mark.parametrize("density", [0.0, 0.001, 0.3, 0.5, 1.0])
def test_ties_blocks_equal_whole_tensor(density):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(37, 19, generator=g)
    tensors = [base + 0.1 * torch.randn(37, 19, generator=g) for _ in range(3)]
    tensors[1][::3] = base[::3]  # exact zeros in a delta: ties at the threshold
    ties = registry.get("ties")()
    mp = [ties.ModelParams(weight=w, density=density) for w in (1.0, 0.5, 0.7)]
    params = TiesParams(**{"lambda": 0.9})
    whole = _whole(ties, tensors, base, params, mp)
    for rows in (1, 5, 36):
        assert torch.equal(_blocked(ties, tensors, base, params, mp, rows), whole), rows


@pytest.mark.parametrize("n", [1, 2, 97, 5000])
@pytest.mark.parametrize("density", [0.01, 0.5, 0.9])
def test_radix_threshold_is_kthvalue(n, density):
    """The streamed threshold is exactly the (n - k + 1)-th smallest magnitude (torch.kthvalue),
    with duplicates, zeros and uneven blocks."""
    g = torch.Generator().manual_seed(n)
    t = torch.round(torch.randn(n, generator=g) * 8) / 8  # many duplicates, some zeros
    base = torch.zeros(n)
    k = max(1, int(density * n))
    expected = torch.kthvalue(t.abs(), n - k + 1).values
    sel = TopKThreshold(density)
    for p in (0, 1):
        for i in range(0, n, 13):
            sel.fold(p, magnitude_bits(t[i : i + 13], base[i : i + 13]))
        sel.finish(p)
    assert torch.equal(sel.value, expected)
    kept = trim_topk_(t.clone(), density)
    assert torch.equal(kept, torch.where(t.abs() >= expected, t, 0.0))
    assert int((kept != 0).sum()) >= min(k, int((t != 0).sum()))


@pytest.mark.parametrize("case", ["random", "colinear", "opposite", "zero"])
def test_slerp_blocks_equal_whole_tensor(case):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(40, 7, generator=g)
    b = {"random": torch.randn(40, 7, generator=g), "colinear": 2.0 * a, "opposite": -a,
         "zero": torch.zeros(40, 7)}[case]
    slerp = registry.get("slerp")()
    params = SlerpParams(t=0.3)
    whole = _whole(slerp, [b], a, params, [])
    if case in ("colinear", "opposite"):  # |dot| > threshold: linear
        torch.testing.assert_close(whole, 0.7 * a + 0.3 * b)
    for rows in (1, 3, 40):
        assert torch.equal(_blocked(slerp, [b], a, params, [], rows), whole), rows
    assert slerp.stats_passes(SlerpParams(t=1.0), [], torch.float32) == 0  # endpoints need no statistics


def test_predicted_peak_follows_blocks_not_tensors(family, tmp_path):
    """The plan predicts a streamed merge's memory from its row blocks, so the prediction does not
    grow with the largest tensor (it did for TIES and slerp when they held whole tensors)."""
    base, models = family
    for method in ("ties", "slerp"):
        plan = make_plan(load_recipe(_recipe(tmp_path / f"{method}.yaml", method, base, models)))
        largest = max(t.numel for t in plan.tasks)
        inputs = max(len(t.inputs) for t in plan.tasks)
        assert largest > BLOCK
        assert plan.predicted_peak_bytes(chunk_elements=BLOCK) - ALLOCATOR_SLACK <= 2 * 4 * BLOCK * (inputs + 3)
        assert plan.predicted_peak_bytes() - ALLOCATOR_SLACK > 2 * 4 * BLOCK * (inputs + 3)  # default blocks
