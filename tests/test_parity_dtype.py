"""Parity with mergekit 0.1.5 in bfloat16 and float16: a recipe's `dtype` is what mergekit
computes in, and so do we unless `compute_dtype` says otherwise.

Deterministic cases give mergekit's tensors bit for bit, whole and streamed in small row blocks;
TIES with density < 1 differs only at entries tied with a trim threshold (mergekit's argsort
keeps an arbitrary k of them, we keep them all); DARE is compared by its statistics.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from parity_support import run_mergekit, run_ours
from safetensors.torch import save_file

from merge_lab.errors import MergeLabError
from merge_lab.merge import interface as registry
from merge_lab.merge.planner import arithmetic_dtype, make_plan
from merge_lab.merge.recipe import load_recipe, parse_recipe
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe

mergekit = pytest.importorskip("mergekit", reason="mergekit is a dev dependency (pip install -e .[dev])")

BLOCK = 200  # elements per row block when streamed: every 2-D tensor of the tiny models is cut


def recipes(base, models):
    b, (m1, m2, m3) = str(base), [str(m) for m in models]
    weights = {"weight": [{"filter": "self_attn", "value": 0.3}, {"value": [0.2, 1.0]}]}  # filter + gradient
    w3 = (1.0, 0.5, 0.7)  # 0.7 is 0.69921875 in bfloat16: mergekit's weights are in the dtype too
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": m1, "parameters": {"weight": 1.0}}, {"model": m2, "parameters": weights},
            {"model": m3, "parameters": {"weight": 0.7}}]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                            "parameters": {"lambda": 0.8, "normalize": True},
                            "models": [{"model": m1, "parameters": {"weight": 0.7}},
                                       {"model": m2, "parameters": weights}, {"model": b}]},
        "ties": {"merge_method": "ties", "base_model": b, "parameters": {"lambda": 0.9},
                 "models": [{"model": m, "parameters": {"weight": w, "density": 1.0}}
                            for m, w in zip((m1, m2, m3), w3)]},
        "ties_unnormalized": {"merge_method": "ties", "base_model": b, "parameters": {"normalize": False},
                              "models": [{"model": m, "parameters": {"weight": w}} for m, w in ((m1, 0.7), (m2, 0.3))]},
        "dare_ties_density1": {"merge_method": "dare_ties", "base_model": b,
                               "models": [{"model": m, "parameters": {"weight": 0.6, "density": 1.0}}
                                          for m in (m1, m2, m3)]},
        "breadcrumbs_dense": {"merge_method": "breadcrumbs", "base_model": b, "parameters": {"lambda": 0.7},
                              "models": [{"model": m, "parameters": {"weight": w, "density": 1.0}}
                                         for m, w in zip((m1, m2), w3)]},
        "della_kept_and_dropped": {"merge_method": "della", "base_model": b, "parameters": {"lambda": 0.9},
                                   "models": [{"model": m, "parameters": {"weight": w, "density": d}}
                                              for m, w, d in zip((m1, m2, m3), w3, (1.0, 0.0, 1.0))]},
        "slerp": {"merge_method": "slerp", "base_model": b, "parameters": {"t": [0.2, 0.7]}, "models": [{"model": m1}]},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "parameters": {"t": 0.01}, "models": [{"model": m2}]},
        "ram": {"merge_method": "ram", "base_model": b, "parameters": {"epsilon": 0.01},
                "models": [{"model": m} for m in (m1, m2, m3)]},
        "passthrough_scale": {"merge_method": "passthrough", "models": [{"model": m3, "parameters": {"scale": 0.7}}]},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": [{"model": m} for m in (m1, m2, m3)]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b, "parameters": {"filter_wise": True},
                                    "models": [{"model": m} for m in (m1, m2, m3)]},
        "sce": {"merge_method": "sce", "base_model": b, "models": [{"model": m} for m in (m1, m2, m3)]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b,
                    "models": [{"model": m1, "parameters": {"weight": 0.3}}, {"model": m2, "parameters": weights}]},
        "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False},
                                 "models": [{"model": m1, "parameters": {"weight": 0.7}}, {"model": m3, "parameters": {"weight": 1.0}}]},
        "nuslerp_columns": {"merge_method": "nuslerp", "base_model": b,
                            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                            "models": [{"model": m1, "parameters": {"weight": 0.25}}, {"model": m3, "parameters": {"weight": 0.6}}]},
        "multislerp": {"merge_method": "multislerp", "base_model": b,
                       "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip((m1, m2, m3), w3)]},
        "multislerp_unnormalized_no_base": {"merge_method": "multislerp", "parameters": {"normalize_weights": False, "eps": 1e-3},
                                            "models": [{"model": m1, "parameters": {"weight": 0.5}},
                                                       {"model": m2, "parameters": weights}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": b, "models": [{"model": m1}]},
        "karcher": {"merge_method": "karcher", "models": [{"model": m} for m in (m1, m2, m3)]},
        "karcher_with_base": {"merge_method": "karcher", "base_model": b, "parameters": {"max_iter": 3},
                              "models": [{"model": m} for m in (m1, m2)]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "parameters": {"epsilon": 0.01, "r": 0.5},
                       "models": [{"model": m} for m in (m1, m2, m3)]},
    }


CASES = list(recipes("b", ["1", "2", "3"]))


def assert_equal_tensors(ours: dict, theirs: dict, case: str) -> None:
    assert set(ours) == set(theirs), case
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, f"{case}: {name}"
        bad = int((ours[name] != theirs[name]).sum())
        assert bad == 0, f"{case}: {name}: {bad} of {theirs[name].numel()} entries differ"


def assert_karcher_close(ours: dict, theirs: dict, case: str) -> None:
    """Karcher in 16 bits: mergekit's ops in mergekit's order give its bits, except where a float32
    norm (of a point, the tangent, the moved mean) is summed in torch's float32 order, which a
    row-block stream cannot follow: ours is the correctly rounded float32 sum, a few float32 steps
    away. The 16-bit iteration never settles (its tangent stays at rounding noise), so in a few
    tensors that difference grows over the iterations into one of the size of the noise itself."""
    assert set(ours) == set(theirs), case
    same = 0
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, f"{case}: {name}"
        if torch.equal(ours[name], theirs[name]):
            same += 1
            continue
        ours32, theirs32 = ours[name].float(), theirs[name].float()
        relative = float((ours32 - theirs32).norm() / theirs32.norm())
        assert relative < 2**-6, f"{case}: {name}: {relative:.2e} relative to the tensor's norm"
    assert same >= 0.8 * len(theirs), f"{case}: only {same} of {len(theirs)} tensors are mergekit's bit for bit"


FLOAT16 = {"linear", "task_arithmetic", "ties", "slerp", "model_stock", "sce", "nuslerp", "nuslerp_rows_no_base",
           "nuslerp_columns", "multislerp", "multislerp_unnormalized_no_base", "arcee_fusion", "ramplus_tl", "karcher",
           "karcher_with_base"}
MATRIX = [(case, "bfloat16") for case in CASES] + [(case, "float16") for case in CASES if case in FLOAT16]
# mergekit returns float32 tensors for these in a 16-bit dtype (a float32 mask or boost lifts
# them midway) and writes them so unless `out_dtype` says otherwise: compared with out_dtype set
FLOAT32_RESULT = {"arcee_fusion", "ramplus_tl"}


@pytest.mark.parametrize(("case", "dtype"), MATRIX)
def test_same_bits_as_mergekit_in_16_bits(case, dtype, family, tmp_path):
    """bfloat16 checkpoints (several shards) merged with `dtype: bfloat16` or `float16`."""
    base, models = family
    recipe = recipes(base, models)[case] | {"dtype": dtype}
    if case in FLOAT32_RESULT:
        recipe["out_dtype"] = dtype
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = run_ours(recipe, tmp_path)
    if case == "slerp" and dtype == "float16":  # float32 inside both; norms summed in other orders
        for name in theirs:
            torch.testing.assert_close(ours[name], theirs[name], rtol=2**-10, atol=1e-5, msg=f"{case}: {name}")
    elif case.startswith("karcher"):
        assert_karcher_close(ours, theirs, f"{case} {dtype}")
    else:
        assert_equal_tensors(ours, theirs, f"{case} {dtype}")
    blocked = run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK)
    assert_equal_tensors(blocked, ours, f"{case} {dtype} streamed")


@pytest.mark.parametrize("case", ["linear", "ties", "task_arithmetic"])
def test_float32_checkpoints_are_rounded_to_dtype_first(case, fp32_family, tmp_path):
    """float32 files and `dtype: bfloat16`: mergekit casts on load, then computes (linear upcasts
    again); so do we, whether the strategy computes in bfloat16 or float32."""
    base, models = fp32_family
    recipe = recipes(base, models)[case] | {"dtype": "bfloat16", "out_dtype": "float32"}
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = run_ours(recipe, tmp_path)
    assert_equal_tensors(ours, theirs, case)
    assert_equal_tensors(run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK), ours, f"{case} streamed")
    # compute_dtype: float32 skips the rounding: other numbers, as float32 arithmetic gives
    precise = run_ours(recipe | {"compute_dtype": "float32"}, tmp_path, "precise")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(precise[name], theirs[name])


def test_no_dtype_computes_in_the_stored_dtype(family, tmp_path):
    """Without `dtype`, mergekit computes in the checkpoints' own dtype (bfloat16 here)."""
    base, models = family
    recipe = recipes(base, models)["ties"]
    assert_equal_tensors(run_ours(recipe, tmp_path), run_mergekit(recipe, tmp_path / "mergekit"), "ties, no dtype")


def test_ties_trim_differs_only_at_entries_tied_with_the_threshold(family, tmp_path):
    base, models = family
    density = 0.5
    recipe = recipes(base, models)["ties"] | {"dtype": "bfloat16"}
    for entry in recipe["models"]:
        entry["parameters"]["density"] = density
    theirs, ours = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path)
    blocked = run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK)
    assert_equal_tensors(blocked, ours, "ties streamed")
    b, ms = load_tensors(base), [load_tensors(m) for m in models]
    differing = total = 0
    for name in theirs:
        tied = torch.zeros(b[name].shape, dtype=torch.bool)
        for m in ms:
            magnitude = (m[name] - b[name]).abs().float()
            k = max(1, int(density * magnitude.numel()))
            threshold = magnitude.reshape(-1).topk(k).values[-1]
            if int((magnitude >= threshold).sum()) > k:  # more entries reach it than are kept
                tied |= magnitude == threshold
        wrong = ours[name] != theirs[name]
        assert not (wrong & ~tied).any(), f"{name}: differs away from a tie with the threshold"
        differing, total = differing + int(wrong.sum()), total + wrong.numel()
    assert differing < 0.01 * total, (differing, total)


def test_sce_selection_differs_only_in_tensors_with_variances_tied_at_the_threshold(family, tmp_path):
    """SCE's select_topk in bfloat16: mergekit's topk keeps k of the entries whose variance ties
    with the k-th largest, we keep them all; the weights are mean squares over the selection, so
    such a tensor differs beyond the tied entries. Every tensor without such a tie is mergekit's."""
    base, models = family
    topk = 0.3
    recipe = {"merge_method": "sce", "base_model": str(base), "dtype": "bfloat16", "parameters": {"select_topk": topk},
              "models": [{"model": str(m)} for m in models]}
    theirs, ours = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path)
    assert_equal_tensors(run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK), ours, "sce streamed")
    b, ms = load_tensors(base), [load_tensors(m) for m in models]
    untied = 0
    for name in theirs:
        variance = torch.var(torch.stack([m[name] - b[name] for m in ms]), dim=0, unbiased=False)  # mergekit's
        k = int(torch.count_nonzero(variance) * topk)
        if k == 0:
            continue
        threshold = variance.reshape(-1).topk(k).values[-1]
        if int((variance >= threshold).sum()) == k:  # no tie at the threshold
            untied += 1
            assert torch.equal(ours[name], theirs[name]), f"{name}: differs without a tie at the threshold"
    assert untied >= len(theirs) // 2, (untied, len(theirs))


ELECTED = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def cancelling(tmp_path_factory):
    """float32 checkpoints built so that rounding to bfloat16 changes TIES' elected sign.

    In row 0 the base is 0 and the task vectors are +(1 + 2**-10) and -(1 + 2**-9): in float32
    the negative one is larger, so the sign is -; in bfloat16 both are 1.0 and cancel, and a sum
    of 0 elects +. In row 1 the base is 1: model 1 moves it by -2**-10, a delta that rounds to 0
    in bfloat16 (so it no longer votes), model 2 by +2**-7 with weight 0.1 (smaller in float32,
    the only vote left in bfloat16)."""
    root = tmp_path_factory.mktemp("cancelling")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    models = [make_checkpoint(root / f"m{i}", "llama", seed=i, base=base, shards=False) for i in (1, 2)]
    rows = {base: (0.0, 1.0), models[0]: (1 + 2**-10, 1 - 2**-10), models[1]: (-(1 + 2**-9), 1 + 2**-7)}
    for folder, (row0, row1) in rows.items():
        tensors = load_tensors(folder)
        tensors[ELECTED][0] = row0
        tensors[ELECTED][1] = row1
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return base, models


def test_bfloat16_elects_signs_as_mergekit_and_float32_arithmetic_does_not(cancelling, tmp_path):
    base, (m1, m2) = cancelling
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16", "out_dtype": "float32",
              "models": [{"model": str(m1), "parameters": {"weight": 1.0, "density": 1.0}},
                         {"model": str(m2), "parameters": {"weight": 1.0, "density": 1.0}}]}
    theirs = run_mergekit(recipe, tmp_path / "mergekit")
    ours = run_ours(recipe, tmp_path)
    assert_equal_tensors(ours, theirs, "ties bfloat16")
    assert_equal_tensors(run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK), ours, "ties streamed")
    assert torch.all(theirs[ELECTED][0] == 1.0)  # + elected: model 1's delta, as bfloat16 rounds it
    precise = run_ours(recipe | {"compute_dtype": "float32"}, tmp_path, "precise")
    assert torch.all(precise[ELECTED][0] == -(1 + 2**-9))  # - elected: model 2's delta, unrounded
    # row 1: with weight 0.1 on model 2, float32 elects model 1's tiny -2**-10, bfloat16 model 2's +2**-7
    recipe["models"][1]["parameters"]["weight"] = 0.1
    theirs = run_mergekit(recipe, tmp_path / "mergekit_row1")
    assert_equal_tensors(run_ours(recipe, tmp_path, "row1"), theirs, "ties bfloat16, row 1")
    assert torch.all(theirs[ELECTED][1] == 1 + 2**-7)
    precise = run_ours(recipe | {"compute_dtype": "float32"}, tmp_path, "precise_row1")
    assert torch.all(precise[ELECTED][1] == 1 - 2**-10)


def test_dare_ties_in_bfloat16_matches_mergekit_statistically(family, tmp_path):
    base, models = family
    density = 0.5
    recipe = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "bfloat16", "seed": 3,
              "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": density}} for m in models]}
    theirs, ours, b = run_mergekit(recipe, tmp_path / "mergekit"), run_ours(recipe, tmp_path), load_tensors(base)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    big = [n for n in b if b[n].numel() >= 2048]
    kept = [torch.cat([(out[n] != b[n]).float().reshape(-1) for n in big]).mean() for out in (ours, theirs)]
    l1 = [sum(float((out[n].float() - b[n].float()).abs().sum()) for n in big) for out in (ours, theirs)]
    assert abs(kept[0] - kept[1]) < 0.02, kept
    assert abs(l1[0] / l1[1] - 1) < 0.05, l1
    assert_equal_tensors(run_ours(recipe, tmp_path, "blocked", chunk_elements=BLOCK), ours, "dare_ties streamed")


# -- the rule, the key, the memory it saves


def test_arithmetic_dtype_rule(family):
    base, models = family
    text = f"merge_method: linear\nmodels: [{models[0]}, {models[1]}]\n"
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert arithmetic_dtype(parse_recipe(text), [bf16, bf16]) == bf16  # mergekit: the stored dtype
    assert arithmetic_dtype(parse_recipe(text), [bf16, fp16]) == fp32  # ... promoted, as mergekit does
    assert arithmetic_dtype(parse_recipe(text + "dtype: float16\n"), [bf16, bf16]) == fp16
    assert arithmetic_dtype(parse_recipe(text + "dtype: float16\ncompute_dtype: float32\n"), [bf16]) == fp32
    assert arithmetic_dtype(parse_recipe(text + "compute_dtype: bfloat16\n"), [fp32]) == bf16


def test_compute_dtype_is_validated_with_its_line(family):
    _, models = family
    text = f"merge_method: linear\nmodels: [{models[0]}, {models[1]}]\ncompute_dtype: float8\n"
    with pytest.raises(MergeLabError, match=r"line 3.*compute_dtype"):
        parse_recipe(text, "r.yaml")


def test_bfloat16_arithmetic_predicts_less_memory(family, tmp_path):
    """TIES computing in bfloat16 holds its inputs in bfloat16: the plan's prediction and notes say so."""
    base, models = family
    recipe = recipes(base, models)["ties"] | {"dtype": "bfloat16"}
    low = make_plan(load_recipe(write_recipe(tmp_path / "low.yaml", recipe)))
    high = make_plan(load_recipe(write_recipe(tmp_path / "high.yaml", recipe | {"compute_dtype": "float32"})))
    assert low.predicted_peak_bytes(chunk_elements=BLOCK) < high.predicted_peak_bytes(chunk_elements=BLOCK)
    assert any("arithmetic in bfloat16 (the recipe's dtype)" in n for n in low.notes), low.notes  # `validate` says so
    assert not any("arithmetic in" in n for n in high.notes), high.notes


def test_our_shipped_merges_compute_in_float32():
    """Our recipes keep float32 arithmetic (and their numbers) by saying so."""
    root = Path(__file__).resolve().parents[1]
    shipped = [*root.glob("recipes/**/*.y*ml"), *root.glob("merge_lab/demo/recipes/*.y*ml")]
    tensorwise = []
    for path in shipped:
        data = yaml.safe_load(path.read_text()) or {}
        if "merge_method" in data and not registry.get(data["merge_method"]).structural:
            tensorwise.append(path.name)
            assert parse_recipe(path.read_text(), str(path)).compute_dtype == "float32", path
    assert {"04_merge_linear.yaml", "06_merge_ties.yaml"} <= set(tensorwise), tensorwise  # the glob found the demo's merges


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["nuslerp", "multislerp", "karcher"])
def test_each_tensor_gets_the_statistics_passes_of_its_own_dtype(method, dtype):
    """nuslerp, multislerp and karcher take more statistics passes in 16 bits: the count follows
    the dtype the tensor computes in (whatever other tensors of the plan do), and streaming a
    tensor with that many passes gives its whole-tensor merge."""
    from dataclasses import replace

    from merge_lab.core.architecture import classify
    from merge_lab.merge.interface import TensorContext

    g = torch.Generator().manual_seed(5)
    base = torch.randn(12, 8, generator=g).to(dtype)
    tensors = [(base.float() + 0.1 * torch.randn(12, 8, generator=g)).to(dtype) for _ in range(2)]
    strategy = registry.get(method)()
    params = strategy.Params()
    model_params = [strategy.ModelParams() for _ in tensors] if strategy.ModelParams is not registry.NoParams else []
    assert strategy.stats_passes(params, model_params, torch.bfloat16) > strategy.stats_passes(
        params, model_params, torch.float32) > 0
    assert strategy.stats_passes(params, model_params, torch.float16) == strategy.stats_passes(
        params, model_params, torch.bfloat16)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", classify("model.layers.0.mlp.up_proj.weight"), 0, ("a", "b"))
    alone = strategy.merge([t.clone() for t in tensors], base.clone(), params, model_params, ctx)
    stats = None
    for p in range(strategy.stats_passes(params, model_params, dtype)):
        for s in range(0, 12, 5):
            stats = strategy.fold_stats(p, stats, [t[s : s + 5] for t in tensors], base[s : s + 5], params, model_params, ctx)
        stats = strategy.finish_stats(p, stats, params, model_params)
    streamed = torch.cat([strategy.merge([t[s : s + 5].clone() for t in tensors], base[s : s + 5].clone(), params,
                                         model_params, replace(ctx, stats=stats)) for s in range(0, 12, 5)])
    torch.testing.assert_close(streamed.float(), alone.float(), rtol=1e-6, atol=1e-7)
