"""NaN / Inf: refused in the inputs (naming model, tensor and count) unless allowed; never made."""

from __future__ import annotations

import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.errors import MergeLabError
from merge_lab.merge import interface as registry
from merge_lab.merge.engine import merge
from merge_lab.merge.finite import non_finite_count
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe
from merge_lab.testing.moe import lora_expert

runner = CliRunner()
NAN_TENSOR = "model.layers.0.self_attn.q_proj.weight"  # (32, 32): before INF_TENSOR in plan order
INF_TENSOR = "model.layers.1.mlp.down_proj.weight"  # (32, 64)


def _plant(folder, tensor: str, flat_indices: list[int], value: float) -> None:
    """Overwrite float32 elements of a stored tensor in place: the checkpoint stays a real one."""
    info = Checkpoint(folder).info(tensor)
    assert info.dtype == torch.float32
    with open(info.file, "r+b") as f:
        for i in flat_indices:
            f.seek(info.begin + 4 * i)
            f.write(struct.pack("<f", value))


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """A float32 base and two fine-tunes: 3 NaN in one tensor of m1, 2 Inf in another of m2."""
    root = tmp_path_factory.mktemp("poisoned")
    base = make_checkpoint(root / "base", "llama", seed=0)
    m1 = make_checkpoint(root / "m1", "llama", seed=1, base=base)
    m2 = make_checkpoint(root / "m2", "llama", seed=2, base=base)
    _plant(m1, NAN_TENSOR, [5, 32 * 17 + 3, 32 * 31], math.nan)  # rows 0, 17 and 31: several blocks
    _plant(m2, INF_TENSOR, [64 * 2, 64 * 30 + 1], math.inf)
    return base, m1, m2


def _recipe(tmp_path, method, base, models, **extra):
    r = {"merge_method": method, "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models], **extra}
    if method != "linear":
        r["base_model"] = str(base)
        for m in r["models"]:
            m["parameters"]["density"] = 0.5
    return write_recipe(tmp_path / f"{method}.yaml", r)


def test_nan_input_is_refused_through_the_cli_naming_model_tensor_and_count(poisoned, tmp_path):
    base, m1, m2 = poisoned
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(_recipe(tmp_path, "linear", base, [m1, m2])), "-o", str(out),
                                 "--no-progress"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert str(m1) in text and f"'{NAN_TENSOR}'" in text and "3 non-finite value(s)" in text, text
    assert "allow_non_finite" in text and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_count_is_the_whole_tensors_when_found_in_one_row_block(poisoned, tmp_path, method):
    """Streamed in 2-row blocks (TIES with statistics passes), the message still counts all 3."""
    base, m1, m2 = poisoned
    with pytest.raises(MergeLabError, match=r"'model.layers.0.self_attn.q_proj.weight' holds 3 non-finite"):
        merge(_recipe(tmp_path, method, base, [m1, m2]), tmp_path / "out", progress=False, hash_inputs=False,
              chunk_elements=64)
    assert not (tmp_path / "out").exists()
    # the Inf alone (m2 without m1) is refused the same way, naming its model
    with pytest.raises(MergeLabError, match=r"m2: tensor 'model.layers.1.mlp.down_proj.weight' holds 2 non-finite "
                                            r"value\(s\) of 2048 \(0 NaN, 2 infinite\)"):
        merge(_recipe(tmp_path, method, base, [m2]), tmp_path / "out2", progress=False, hash_inputs=False)


def test_allowed_through_the_cli_the_card_counts_them(poisoned, tmp_path):
    base, m1, m2 = poisoned
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(_recipe(tmp_path, "linear", base, [m1, m2])), "-o", str(out),
                                 "--no-progress", "--allow-non-finite", "--no-hash-inputs"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "merge complete" in text and "5 NaN / Inf value(s) in 2 tensor(s)" in text and "warning" in text
    card = (out / "README.md").read_text()
    assert "## Non-finite input values" in card
    assert f"- `{m1}`: `{NAN_TENSOR}`: 3 value(s)" in card and f"- `{m2}`: `{INF_TENSOR}`: 2 value(s)" in card
    merged = load_tensors(out)
    assert int(merged[NAN_TENSOR].isnan().sum()) == 3 and int(merged[INF_TENSOR].isinf().sum()) == 2
    assert all(torch.isfinite(t).all() for n, t in merged.items() if n not in (NAN_TENSOR, INF_TENSOR))


@pytest.mark.parametrize("chunk", [None, 64])
def test_allowed_by_the_recipe_counts_each_value_once(poisoned, tmp_path, chunk):
    """Row blocks read once per statistics pass (TIES: 2) and merged once are counted once, and
    the NaN spreading through TIES' statistics is not blamed on the strategy."""
    base, m1, m2 = poisoned
    recipe = _recipe(tmp_path, "ties", base, [m1, m2], allow_non_finite=True)
    result = merge(recipe, tmp_path / "out", progress=False, hash_inputs=False, chunk_elements=chunk)
    assert result.non_finite == {(str(m1), NAN_TENSOR): 3, (str(m2), INF_TENSOR): 2}
    assert "`allow_non_finite`" in (result.path / "README.md").read_text()


class CentreOnMean(registry.Strategy):
    """A plugin streamed with one statistics pass: subtracts the tensor's mean (a whole-tensor
    statistic), so one NaN anywhere makes every output row NaN."""

    name = "test_centre_on_mean"
    row_separable = True

    def stats_passes(self, params, model_params, dtype) -> int:
        return 1

    def fold_stats(self, pass_index, stats, tensors, base, params, model_params, ctx):
        total, count = stats or (0.0, 0)
        return total + float(tensors[0].sum()), count + tensors[0].numel()

    def merge(self, tensors, base, params, model_params, ctx):
        total, count = ctx.stats or self.tensor_stats(tensors, base, params, model_params, ctx)
        return tensors[0] - total / count


@pytest.fixture()
def centre_on_mean():
    registry.register(CentreOnMean)
    yield CentreOnMean.name
    registry.STRATEGIES.unregister(CentreOnMean.name)


def test_nan_in_a_later_block_spreading_through_statistics_is_not_blamed_on_the_strategy(
    poisoned, tmp_path, centre_on_mean
):
    """One NaN in row 17 reaches rows 0-1 through the statistics, though their own inputs are
    finite: inputs are checked at each block's first read (the statistics pass), so the engine
    knows the tensor's inputs held NaN before it merges any block."""
    model = make_checkpoint(tmp_path / "m", "llama", seed=4)
    _plant(model, NAN_TENSOR, [32 * 17 + 3], math.nan)
    recipe = write_recipe(tmp_path / "c.yaml", {"merge_method": centre_on_mean, "models": [str(model)],
                                                "allow_non_finite": True})
    result = merge(recipe, tmp_path / "out", progress=False, hash_inputs=False, chunk_elements=64)
    assert result.non_finite == {(str(model), NAN_TENSOR): 1}
    assert load_tensors(result.path)[NAN_TENSOR][:2].isnan().all()  # spread to the first block


def test_the_base_read_by_every_adapter_expert_is_counted_once(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0)
    experts = [lora_expert(base, tmp_path / f"e{i}", seed=i + 1) for i in range(2)]
    gate = "model.layers.0.mlp.gate_proj.weight"
    _plant(base, gate, [0, 1], math.nan)
    recipe = write_recipe(tmp_path / "moe.yaml", {
        "merge_method": "h3_moe", "base_model": str(base), "allow_non_finite": True,
        "models": [{"model": str(e), "label": f"l{i}"} for i, e in enumerate(experts)]})
    result = merge(recipe, tmp_path / "moe", progress=False, hash_inputs=False)
    assert result.non_finite == {(str(base), gate): 2}
    with pytest.raises(MergeLabError, match=f"{base}: tensor '{gate}' holds 2 non-finite"):
        merge(recipe, tmp_path / "refused", progress=False, hash_inputs=False, allow_non_finite=False)


class ZeroNormDivide(registry.Strategy):
    """A plugin with a bug: normalises the delta by its norm, which is 0 for identical inputs."""

    name = "test_zero_norm_divide"

    def merge(self, tensors, base, params, model_params, ctx):
        delta = tensors[0] - tensors[-1]
        return delta / delta.norm()


@pytest.fixture()
def buggy_strategy():
    registry.register(ZeroNormDivide)
    yield ZeroNormDivide.name
    registry.STRATEGIES.unregister(ZeroNormDivide.name)


def test_strategy_making_nan_from_finite_inputs_is_an_error(buggy_strategy, tmp_path):
    model = make_checkpoint(tmp_path / "m", "llama", seed=3)
    other = Path(shutil.copytree(model, tmp_path / "copy"))  # the same weights in another folder
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": buggy_strategy, "models": [str(model), str(other)]})
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(recipe), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"strategy '{buggy_strategy}' produced" in text and "from finite inputs" in text, text
    assert "model.embed_tokens.weight" in text and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    # allowing non-finite inputs does not excuse it: these inputs are finite
    result = runner.invoke(app, ["merge", str(recipe), "-o", str(out), "--no-progress", "--allow-non-finite"])
    assert result.exit_code == 2 and "from finite inputs" in " ".join(result.output.split())


def test_non_finite_count_is_exact_and_an_overflowing_sum_is_no_false_alarm():
    big = torch.full((10,), 3e38)  # finite values whose sum overflows to inf
    assert non_finite_count(big) == 0
    big[3], big[7] = math.nan, -math.inf
    assert non_finite_count(big) == 2
    mixed = torch.zeros(6)
    mixed[0], mixed[1] = math.inf, -math.inf  # their sum is NaN
    assert non_finite_count(mixed) == 2
    assert non_finite_count(torch.arange(5)) == 0 and non_finite_count(torch.zeros(0)) == 0
