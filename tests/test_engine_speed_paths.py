"""The per-byte fast paths (memory-mapped reads into reused buffers, the writer's reused
conversion buffer, skipped multiplications by 1) give exactly what the plain operations give."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from safetensors.torch import save_file

from merge_lab.cli import _import_frozen
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.writer import ShardWriter, TensorSpec
from merge_lab.errors import MergeLabError
from merge_lab.strategies.common import combine
from merge_lab.strategies.linear import Linear, LinearModel, LinearParams


def _special_values(n: int, seed: int) -> torch.Tensor:
    """float32 values with signed zeros, infinities, subnormals and large and small magnitudes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.logspace(-40, 30, n).roll(seed)
    x[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-41, -3e38])
    return x


@pytest.fixture()
def folder(tmp_path):
    t = {"w": _special_values(37 * 11, 1).reshape(37, 11).to(torch.bfloat16), "i": torch.arange(5)}
    save_file(t, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return tmp_path, t


def test_read_converts_rows_from_the_map_like_a_plain_copy(folder):
    path, t = folder
    c = Checkpoint(path)
    assert torch.equal(c.read("w"), t["w"]) and c.read("w").dtype == torch.bfloat16
    assert torch.equal(c.read("i"), t["i"])
    buf = torch.full((500,), 7.0)
    for rows in [(0, 37), (3, 19), (36, 37), (5, 5)]:
        want = t["w"][rows[0]:rows[1]].to(torch.float32)
        assert torch.equal(c.read("w", rows, torch.float32), want), rows
        got = c.read("w", rows, torch.float32, out=buf)  # reused buffer: same values, shaped
        assert got.shape == want.shape and torch.equal(got, want), rows
    got = c.read("w", (0, 37), torch.float32)
    got.add_(1.0)  # the result is owned: writing it changes neither the file nor the next read
    assert torch.equal(c.read("w", (0, 37), torch.float32), t["w"].to(torch.float32))
    with pytest.raises(MergeLabError, match="'w'"):
        c.read("w", (0, 37), torch.float32, out=torch.empty(10))
    c.close()


def test_read_names_the_tensor_of_a_file_cut_after_planning(folder):
    path, _ = folder
    c = Checkpoint(path)
    info = c.info("w")  # header parsed while the file was whole
    with open(info.file, "r+b") as f:
        f.truncate(info.end - 10)
    with pytest.raises(MergeLabError, match="'w' is cut short"):
        c.read("w", None, torch.float32)
    c.close()


def test_writer_reused_conversion_buffer_gives_the_bytes_of_to(tmp_path):
    """Blocks of different sizes through one reused buffer: each lands as its own .to(bf16)."""
    x = _special_values(40 * 6, 2).reshape(40, 6)
    specs = [TensorSpec("a", (40, 6), torch.bfloat16), TensorSpec("b", (40, 6), torch.float32)]
    with ShardWriter(tmp_path / "out", specs) as w:
        for start, stop in [(0, 25), (25, 27), (27, 40)]:  # big, small, middle: stale bytes would show
            w.write_part("a", start * 6, x[start:stop])
        w.write_part("b", 0, x.t().contiguous().t())  # a non-contiguous float32 source
        out = w.finish()
    c = Checkpoint(out)
    assert torch.equal(c.read("a").view(torch.int16), x.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(c.read("b").view(torch.int32), x.view(torch.int32))
    c.close()


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [1.0, 0.3, -2.5], [0.7, 1.0, 1.0]])
def test_linear_skipping_multiplications_by_one_is_exact(weights):
    xs = [_special_values(4096, s) for s in range(3)]
    ref = xs[0].clone().mul_(weights[0])  # the operations before the skip, literally
    for x, w in zip(xs[1:], weights[1:]):
        ref.add_(x, alpha=w)
    ref.div_(sum(weights))
    got = Linear().merge([x.clone() for x in xs], None, LinearParams(), [LinearModel(weight=w) for w in weights], None)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def test_combine_sums_in_place_exactly_as_into_a_copy():
    base = _special_values(2048, 7).clamp(-1e30, 1e30)
    deltas = [_special_values(2048, s).clamp(-1e30, 1e30) for s in (3, 4)]
    weights = [1.0, 0.5]
    ref = [d.clone().mul_(w) for d, w in zip(deltas, weights)]
    total = ref[0].clone().add_(ref[1]).div_(sum(weights)).mul_(0.8).add_(base)
    got = combine([d.clone() for d in deltas], weights, base, 0.8, True, False)
    assert torch.equal(got.view(torch.int32), total.view(torch.int32))


def test_cli_import_leaves_the_collector_on():
    _import_frozen()
    assert gc.isenabled()
