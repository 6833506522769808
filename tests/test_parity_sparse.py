"""Parity with mergekit 0.1.5 for breadcrumbs, breadcrumbs_ties, della, della_linear, sce,
model_stock and DARE's `rescale`: the same recipe through both tools on the same tiny checkpoints.

Deterministic methods give the same tensors within float32 tolerance, with their defaults and
with other parameters, layer gradients and `filter:` conditionals, and give the same bytes
again when streamed in small row blocks. Random masks come from different generators (ours are
seeded per tensor and model), so DELLA and DARE are compared by their statistics: the share of
entries kept, which entries (by magnitude), and the task vector's L1 norm.
"""

from __future__ import annotations

import pytest
import torch
from parity_support import assert_same_tensors, run_mergekit, run_ours

from merge_lab.errors import MergeLabError
from merge_lab.merge import interface as registry
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import load_recipe
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")

WEIGHTS = {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": [0.2, 1.0]}]}  # filter + gradient


def _models(models, **params):
    """Model entries with the same per-model parameters (lists: one value per model)."""
    entries = []
    for i, m in enumerate(models):
        p = {k: (v[i] if isinstance(v, tuple) else v) for k, v in params.items()}
        entries.append({"model": m, "parameters": p})
    return entries


def recipes(base, models):
    b, ms = str(base), [str(m) for m in models]
    w3 = (1.0, 0.5, 0.7)
    return {
        # breadcrumbs: mergekit's defaults (gamma 0.01, no rescale, no normalize; weight has none)
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "parameters": {"density": 0.5}, "models": _models(ms, weight=w3)},
        "breadcrumbs_params": {
            "merge_method": "breadcrumbs", "base_model": b,
            "parameters": {"lambda": 0.8, "normalize": True, "rescale": True, "density": [0.3, 0.9],
                           "gamma": [{"filter": "mlp", "value": 0.1}, {"value": 0.02}]},
            "models": [{"model": ms[0], "parameters": {"weight": 1.0}},
                       {"model": ms[1], "parameters": WEIGHTS | {"gamma": 0.05}},
                       {"model": ms[2], "parameters": {"weight": 0.6, "density": 0.7}}]},
        # density + gamma > 1: fewer outliers go, so that the target is kept
        "breadcrumbs_dense": {"merge_method": "breadcrumbs", "base_model": b,
                              "models": _models(ms[:2], weight=1.0, density=0.95, gamma=0.2)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "parameters": {"density": 0.5}, "models": _models(ms, weight=w3)},
        "breadcrumbs_ties_params": {
            "merge_method": "breadcrumbs_ties", "base_model": b,
            "parameters": {"normalize": True, "rescale": True, "lambda": 1.2,
                           "density": [{"filter": "self_attn", "value": [0.2, 0.6]}, {"value": 0.8}]},
            "models": [{"model": ms[0], "parameters": {"weight": 1.0, "gamma": 0.0}},
                       {"model": ms[1], "parameters": WEIGHTS | {"gamma": [0.0, 0.1]}},
                       {"model": ms[2], "parameters": {"weight": -0.4, "density": 0.0}},
                       {"model": b}]},  # the base listed as a model, as mergekit users do
        # DELLA without sampling is exact: density 1 keeps all, 0 drops all (epsilon unused)
        "della_kept_and_dropped": {"merge_method": "della", "base_model": b, "parameters": {"lambda": 0.9},
                                   "models": _models(ms, weight=w3, density=(1.0, 0.0, 1.0))},
        "della_linear_kept": {"merge_method": "della_linear", "base_model": b,
                              "parameters": {"normalize": True, "epsilon": 0.3},
                              "models": _models(ms[:2], weight=(0.7, 0.2), density=1.0)},
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": m} for m in ms]},
        "sce_topk": {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 0.3},
                     "models": [{"model": m} for m in ms]},
        "sce_topk_gradient": {
            "merge_method": "sce", "base_model": b,
            "parameters": {"int8_mask": True,
                           "select_topk": [{"filter": "mlp", "value": [0.2, 0.8]}, {"value": 0.5}]},
            "models": [{"model": m} for m in ms[:2]] + [{"model": b}]},
        "sce_topk_zero": {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 0.0},
                          "models": [{"model": m} for m in ms]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": m} for m in ms]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b,
                                    "parameters": {"filter_wise": True}, "models": [{"model": m} for m in ms]},
        "model_stock_filter": {
            "merge_method": "model_stock", "base_model": b,
            "parameters": {"filter_wise": [{"filter": "self_attn", "value": True}, {"value": False}]},
            "models": [{"model": b}, {"model": ms[0]}, {"model": ms[2]}]},
    }


CASES = list(recipes("b", ["1", "2", "3"]))


@pytest.mark.parametrize("case", CASES)
def test_same_tensors_as_mergekit(case, fp32_family, tmp_path, monkeypatch):
    base, models = fp32_family
    recipe = recipes(base, models)[case] | {"dtype": "float32"}
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = run_ours(recipe, tmp_path)
    assert_same_tensors(ours, theirs, case)
    blocked = run_ours(recipe, tmp_path, "blocked", chunk_elements=200)  # streamed in row blocks: the same bytes
    for name in ours:
        assert torch.equal(blocked[name], ours[name]), f"{case}: {name}"


def test_sce_uniform_weights_for_tiny_task_vectors(tmp_path):
    """mergekit weighs models equally when their mean squares sum below 1e-6: tiny deltas."""
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, layers=2)
    models = [make_checkpoint(tmp_path / f"m{i}", "llama", seed=i, base=base, noise=3e-4, layers=2) for i in (1, 2)]
    recipe = {"merge_method": "sce", "base_model": str(base), "dtype": "float32",
              "models": [{"model": str(m)} for m in models]}
    theirs, ours = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path)
    assert_same_tensors(ours, theirs, "sce_tiny")
    b, m1, m2 = load_tensors(base), load_tensors(models[0]), load_tensors(models[1])
    name = "model.layers.0.mlp.up_proj.weight"  # where both deltas agree, uniform weights: their mean
    d1, d2 = m1[name] - b[name], m2[name] - b[name]
    agree = (d1 * d2) > 0
    torch.testing.assert_close((ours[name] - b[name])[agree], ((d1 + d2) / 2)[agree], rtol=1e-4, atol=1e-7)


# -- streaming: statistics passes over row blocks, 1-D tensors cut into blocks too

STREAMED = {
    "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1, "rescale": True},
    "della": {"density": 0.5, "epsilon": 0.2},
    "della_linear": {"density": 0.4, "rescale": False},
    "dare_ties": {"density": 0.5},
    "sce": {"select_topk": 0.4},
    "model_stock": {"filter_wise": True},
}


@pytest.mark.parametrize("method", sorted(STREAMED))
def test_streams_in_row_blocks(method, fp32_family, tmp_path, monkeypatch):
    """With 16-element blocks the strategy sees one row at a time (at most 64 elements, the widest
    row) and the 32-element norms in halves, and gives the whole-tensor result to the bit."""
    base, models = fp32_family
    recipe = {"merge_method": method, "base_model": str(base), "seed": 5, "parameters": STREAMED[method],
              "models": [{"model": str(m)} for m in models]}
    whole = run_ours(recipe, tmp_path, "whole")
    cls = registry.get(method)
    seen = []
    merge_fn = cls.merge

    def spy(self, tensors, base, params, model_params, ctx):
        seen.append((base.dim(), base.numel()))
        return merge_fn(self, tensors, base, params, model_params, ctx)

    monkeypatch.setattr(cls, "merge", spy)
    blocked = run_ours(recipe, tmp_path, "blocked", chunk_elements=16)
    assert max(n for _, n in seen) <= 64
    assert {n for dim, n in seen if dim == 1} == {16}
    for name in whole:
        assert torch.equal(blocked[name], whole[name]), f"{method}: {name}"


# -- random methods: the same distribution as mergekit's


def _kept_share(out, base, names):
    return torch.cat([(out[n] != base[n]).float().reshape(-1) for n in names]).mean().item()


def _l1(out, base, names):
    return sum(float((out[n] - base[n]).abs().sum()) for n in names)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("method", ["della_linear", "dare_linear"])
def test_one_model_drop_matches_mergekit(method, rescale, fp32_family, tmp_path):
    """One model, weight 1: out - base is the dropped task vector itself. With rescale both tools
    give each tensor back its L1 norm exactly; the kept share, and for DELLA the preference for
    large magnitudes, agree with mergekit's."""
    base, (m1, *_) = fp32_family
    density = 0.4
    recipe = {"merge_method": method, "base_model": str(base), "dtype": "float32", "seed": 11,
              "parameters": {"rescale": rescale},
              "models": [{"model": str(m1), "parameters": {"weight": 1.0, "density": density, "epsilon": 0.25}}]}
    if method == "dare_linear":
        del recipe["models"][0]["parameters"]["epsilon"]
    theirs, ours = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path)
    b, m = load_tensors(base), load_tensors(m1)
    big = [n for n in b if b[n].numel() >= 1024]
    for out in (ours, theirs):
        assert abs(_kept_share(out, b, big) - density) < 0.02
        for n in big:
            delta, kept = m[n] - b[n], out[n] - b[n]
            if rescale:  # scaled back to the L1 norm it had: mergekit's rescale, not 1/density
                torch.testing.assert_close(kept.abs().sum(), delta.abs().sum(), rtol=1e-4, atol=0)
            else:  # kept entries as they were
                on = kept != 0
                torch.testing.assert_close(out[n][on], m[n][on], rtol=1e-6, atol=1e-7)
    l1_ours, l1_theirs = _l1(ours, b, big), _l1(theirs, b, big)
    assert abs(l1_ours / l1_theirs - 1) < 0.05, (l1_ours, l1_theirs)
    if method == "della_linear":  # keep probability rises with the magnitude rank within each row
        def kept_by_half(out):
            large, small = [], []
            for n in big:
                mag = (m[n] - b[n]).abs()
                above = mag > mag.median(dim=1, keepdim=True).values
                kept = out[n] != b[n]
                large.append(kept[above].float())
                small.append(kept[~above].float())
            return torch.cat(large).mean().item(), torch.cat(small).mean().item()

        (large_ours, small_ours), (large_theirs, small_theirs) = kept_by_half(ours), kept_by_half(theirs)
        assert large_theirs - small_theirs > 0.15  # epsilon 0.25: about 0.25 apart
        assert abs(large_ours - large_theirs) < 0.03 and abs(small_ours - small_theirs) < 0.03


def test_della_matches_mergekit_statistically(fp32_family, tmp_path):
    """della (TIES election) over three models with a density gradient: the share kept per layer
    and the merged task vector's L1 norm agree with mergekit's; seeded like DARE."""
    base, models = fp32_family
    recipe = {"merge_method": "della", "base_model": str(base), "dtype": "float32", "seed": 3,
              "parameters": {"density": [0.3, 0.7], "epsilon": 0.1, "lambda": 1.1},
              "models": _models([str(m) for m in models], weight=(1.0, 0.6, 0.8))}
    theirs, ours, b = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path), load_tensors(base)
    for layer in range(3):
        names = [n for n in b if f"layers.{layer}." in n and b[n].dim() == 2]
        kept_ours, kept_theirs = _kept_share(ours, b, names), _kept_share(theirs, b, names)
        assert abs(kept_ours - kept_theirs) < 0.02, (layer, kept_ours, kept_theirs)
    big = [n for n in b if b[n].numel() >= 1024]
    assert abs(_l1(ours, b, big) / _l1(theirs, b, big) - 1) < 0.05
    again = run_ours(recipe, tmp_path, "again")
    other = run_ours(recipe | {"seed": 4}, tmp_path, "other")
    assert all(torch.equal(again[n], ours[n]) for n in ours)
    assert not torch.equal(other[big[0]], ours[big[0]])


# -- recipes that cannot work are refused before any tensor is read, naming the key and line


def _plan_error(tmp_path, recipe) -> str:
    with pytest.raises(MergeLabError) as e:
        make_plan(load_recipe(write_recipe(tmp_path / "bad.yaml", recipe)))
    return str(e.value)


def test_della_epsilon_outside_probabilities_is_refused(fp32_family, tmp_path):
    base, models = fp32_family
    msg = _plan_error(tmp_path, {"merge_method": "della", "base_model": str(base),
                                 "parameters": {"epsilon": 0.15},
                                 "models": [{"model": str(models[0]), "parameters": {"density": 0.9}}]})
    assert "epsilon" in msg and "1.05" in msg and "line" in msg and "models" in msg


@pytest.mark.parametrize(("key", "value"), [("gamma", 1.5), ("density", -0.1)])
def test_breadcrumbs_out_of_range_is_refused(key, value, fp32_family, tmp_path):
    base, models = fp32_family
    msg = _plan_error(tmp_path, {"merge_method": "breadcrumbs", "base_model": str(base),
                                 "models": [{"model": str(models[0]), "parameters": {key: value}}]})
    assert key in msg and "line" in msg


def test_model_stock_needs_two_models_besides_the_base(fp32_family, tmp_path):
    base, models = fp32_family
    msg = _plan_error(tmp_path, {"merge_method": "model_stock", "base_model": str(base),
                                 "models": [{"model": str(base)}, {"model": str(models[0])}]})
    assert "two models besides the base_model" in msg and "line" in msg


def test_sce_has_no_weights(fp32_family, tmp_path):
    base, models = fp32_family
    msg = _plan_error(tmp_path, {"merge_method": "sce", "base_model": str(base),
                                 "models": [{"model": str(models[0]), "parameters": {"weight": 0.5}}]})
    assert "'sce' has no parameter 'weight'" in msg


def test_della_tie_ranks_are_searchsorteds():
    """DELLA's fast row ranks (one sort and a scatter) equal the binary-search ranks they replace,
    ties sharing their lowest rank: values rounded so that most of them tie, zeros and 3-D included."""
    from merge_lab.strategies.della import tie_ranks

    g = torch.Generator().manual_seed(0)
    for shape in [(7, 33), (3, 5, 64), (1, 1), (4, 2)]:
        rows = (torch.randn(shape, generator=g) * 4).round().abs()
        rows[..., 0] = 0.0
        expected = torch.searchsorted(rows.sort(dim=-1).values.contiguous(), rows.contiguous())
        assert torch.equal(tie_ranks(rows), expected), shape
    assert tie_ranks(torch.tensor([[2.0, 1.0, 2.0, 0.0]])).tolist() == [[2, 1, 2, 0]]


def test_della_ranks_in_row_groups_give_the_whole_units_probabilities(monkeypatch):
    """keep_probabilities ranks a work unit a few rows at a time (RANK_GROUP_ELEMENTS, so the ranking's
    int64 temporaries stay small): the probabilities equal ranking the whole unit at once, 2-D and 3-D."""
    from merge_lab.strategies import della

    g = torch.Generator().manual_seed(1)
    for shape in [(37, 19), (5, 7, 11)]:
        delta = (torch.randn(shape, generator=g) * 3).round()  # many ties
        monkeypatch.setattr(della, "RANK_GROUP_ELEMENTS", 2**30)
        whole = della.keep_probabilities(delta, 0.6, 0.2)
        monkeypatch.setattr(della, "RANK_GROUP_ELEMENTS", 20)  # a row or two a group
        assert torch.equal(della.keep_probabilities(delta, 0.6, 0.2), whole), shape


def test_della_masks_kept_from_the_statistics_pass_equal_masks_drawn_again(fp32_family, tmp_path, monkeypatch):
    """With `rescale` merge() reuses the masks the statistics pass drew, up to MASK_CACHE_ELEMENTS
    per model and tensor, and draws the rest again from where the pass stopped keeping them: any
    budget (none, part of a tensor, all of it), whole or in row blocks, gives the same bytes."""
    from merge_lab.strategies import della

    base, models = fp32_family
    recipe = {"merge_method": "della", "base_model": str(base), "seed": 9, "dtype": "bfloat16",
              "parameters": {"density": [0.3, 0.7], "epsilon": 0.1, "rescale": True},
              "models": _models([str(m) for m in models], weight=(1.0, 0.6, 0.8))}
    reused = []
    keep_mask = della.MagPrune.keep_mask

    def counting(self, delta, p, generator):
        if delta.dim() > 1:  # a 1-D tensor's ranks need it whole: its masks are drawn again
            reused.append(self.masks.entries > 0)
        return keep_mask(self, delta, p, generator)

    monkeypatch.setattr(della.MagPrune, "keep_mask", counting)
    runs = {}
    for budget, chunk in [(0, None), (100, 40), (della.MASK_CACHE_ELEMENTS, None), (della.MASK_CACHE_ELEMENTS, 40)]:
        monkeypatch.setattr(della, "MASK_CACHE_ELEMENTS", budget)
        reused.clear()
        options = {} if chunk is None else {"chunk_elements": chunk}
        runs[budget, chunk] = run_ours(recipe, tmp_path, f"b{budget}_{chunk}", **options)
        if budget == 0:
            assert reused and not any(reused)
        elif budget == 100 and chunk == 40:  # the first blocks of each tensor kept, the rest drawn
            assert any(reused) and not all(reused)
        elif budget > 100:
            assert reused and all(reused)
    reference = runs[0, None]
    for key, out in runs.items():
        for name in reference:
            assert torch.equal(out[name].view(torch.int16), reference[name].view(torch.int16)), (key, name)


def test_della_plan_counts_the_masks_it_keeps_between_passes(fp32_family, tmp_path):
    """With rescale, della keeps each pruning model's masks (packed: one bit an entry) from the
    statistics pass to the merge: the plan's predicted peak says so; without rescale nothing is kept."""
    from merge_lab.strategies.della import MASK_CACHE_ELEMENTS
    from merge_lab.strategies.packed_masks import packed_bytes

    base, models = fp32_family
    recipe = {"merge_method": "della", "base_model": str(base),
              "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}} for m in models]}
    kept = make_plan(load_recipe(write_recipe(tmp_path / "kept.yaml", recipe)))
    none = make_plan(load_recipe(write_recipe(tmp_path / "none.yaml", recipe | {"parameters": {"rescale": False}})))
    merged = [t for t in kept.tasks if t.op.stats_passes()]  # the pruned ones: every float tensor
    assert merged and all(t.op.held_bytes(t.numel) == 3 * packed_bytes(min(t.numel, MASK_CACHE_ELEMENTS)) for t in merged)
    assert all(t.op.held_bytes(t.numel) == 0 for t in none.tasks)
    assert kept.predicted_peak_bytes() > none.predicted_peak_bytes()
    assert kept.predicted_peak_bytes(chunk_elements=64) > none.predicted_peak_bytes(chunk_elements=64)
    # the 1.5B benchmark set's 128256 x 2048 embedding is kept whole, in an eighth of a bool mask's bytes
    embedding = 128256 * 2048
    op = merged[0].op
    assert op.held_bytes(embedding) == 3 * packed_bytes(embedding) < 3 * embedding // 4


def _della_op(shape):
    """A della MergeOp (rescale on) over three random fine-tunes of one tensor, and its inputs."""
    from merge_lab.core.architecture import classify
    from merge_lab.merge.interface import TensorContext
    from merge_lab.merge.ops import MergeOp

    cls = registry.get("della")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(3)]
    model_params = tuple(cls.ModelParams(weight=w, density=d, epsilon=0.1) for w, d in [(1.0, 0.3), (0.6, 0.5), (0.8, 0.7)])
    ids, name = ("m0", "m1", "m2"), "model.layers.0.mlp.up_proj.weight"
    op = MergeOp(cls(), cls.Params(), model_params, TensorContext(name, classify(name), 7, ids),
                 models=tuple((None, name) for _ in ids), base=(None, name))
    return op, [*tensors, base]


def _streamed(op, inputs, rows):
    """The op's result as the engine streams it (the statistics pass over row blocks, then the
    merge of each block), and the bytes each model's kept masks took once the pass was done."""
    stream, n = op.stream(), inputs[0].shape[0]
    blocks = [[t[i : i + rows].clone() for t in inputs] for i in range(0, n, rows)]
    for k, block in enumerate(blocks):
        stream.fold(0, k == len(blocks) - 1, [t.clone() for t in block])
    held = [prune.masks.nbytes for prune in stream.stats]
    out = torch.cat([stream.merge(block) for block in blocks])
    assert all(prune.masks.entries == 0 and prune.masks.nbytes == 0 for prune in stream.stats)  # all taken back
    return out, held


# budget -> entries kept per model of the 11 x 13 tensor in blocks of 3 rows (39 entries; the last 26)
KEPT = {0: 0, 60: 39, None: 11 * 13}


@pytest.mark.parametrize("budget", sorted(KEPT, key=str))
def test_della_packed_masks_of_odd_blocks_are_the_masks_drawn_again(budget, monkeypatch):
    """Row blocks whose entries are no multiple of 8 (3 rows of 13) pack across block boundaries:
    kept whole, in part or not at all, the masks give the whole tensor's result to the bit; kept,
    they take ceil(entries / 8) bytes, within held_bytes, and no kept block is ranked again."""
    from merge_lab.strategies import della
    from merge_lab.strategies.packed_masks import packed_bytes

    if budget is not None:
        monkeypatch.setattr(della, "MASK_CACHE_ELEMENTS", budget)
    op, inputs = _della_op((11, 13))
    whole = op.execute([t.clone() for t in inputs])
    ranked = []
    keep_probabilities = della.keep_probabilities

    def counting(delta, *args):
        ranked.append(delta.numel())
        return keep_probabilities(delta, *args)

    monkeypatch.setattr(della, "keep_probabilities", counting)
    out, held = _streamed(op, inputs, rows=3)
    assert torch.equal(out, whole)
    kept = KEPT[budget]
    assert held == [packed_bytes(kept)] * 3 and sum(held) <= op.held_bytes(11 * 13)
    assert sum(ranked) == 3 * 11 * 13 + 3 * (11 * 13 - kept)  # the pass ranks every block, the merge the rest
def test_packed_masks_give_back_what_was_added():
    """Masks of any sizes (empty, under a byte, across bytes) come back in order, bit for bit,
    and once closed take ceil(entries / 8) bytes."""
    from merge_lab.strategies.packed_masks import PackedMasks, pack_bits, packed_bytes, unpack_bits

    every_byte = torch.arange(256)  # entry 8j + b is bit b of byte j, for each of the 256 bytes
    entries = every_byte.unsqueeze(1).bitwise_right_shift(torch.arange(8)).bitwise_and(1).bool().reshape(-1)
    assert torch.equal(pack_bits(entries), every_byte.to(torch.uint8))
    assert torch.equal(unpack_bits(pack_bits(entries)), entries)
    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (0,), (2, 5), (1,), (4, 4), (7,), (9, 3), (1, 1), (8,), (5,)]
    masks = [torch.rand(s, generator=g) < 0.5 for s in shapes]
    packed = PackedMasks()
    for m in masks:
        packed.add(m)
    packed.close()
    total = sum(m.numel() for m in masks)
    assert packed.entries == total and packed.nbytes == packed_bytes(total)
    for m in masks:
        back = packed.take(m.shape)
        assert back.dtype == torch.bool and torch.equal(back, m)
    assert packed.entries == 0 and packed.nbytes == 0
    with pytest.raises(ValueError, match="internal"):
        packed.take((1,))
