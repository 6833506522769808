"""The compare-speed benchmark runs end to end on a tiny base, its H3 MoE and the token ensemble of
its experts (figures are not checked: they live in benchmarks/COMPARE_RESULTS.md, made by
`make bench-compare`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.compare_speed import differences, main  # noqa: E402
from merge_lab.testing import make_checkpoint  # noqa: E402
from merge_lab.testing.toy import save_toy_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_benchmark_times_both_paths_and_finds_their_results_equal(tmp_path):
    model = make_checkpoint(tmp_path / "tiny", seed=3, dtype=torch.float32)
    save_toy_tokenizer(model)
    out, work = tmp_path / "COMPARE_RESULTS.md", tmp_path / "work"
    assert main(["--model", str(model), "--limit", "3", "--gen-limit", "2", "--max-new-tokens", "3",
                 "--threads", "1", "--work", str(work), "--out", str(out)]) == 0
    raw = json.loads((work / "compare_speed.json").read_text())
    assert len(raw["rows"]) == 6  # three candidates x (a scoring suite, a generation suite)
    for row in raw["rows"].values():
        assert row["items"] == (3 if row["kind"] == "scoring" else 2)
        assert all(len(row["seconds"][p]) == 1 for p in ("before", "after"))
        assert row["differences"][0]["largest_score_difference"] < 1e-5
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and ("scoring" in line or "generation" in line)]
    assert len(rows) == 6 and all("x |" in line for line in rows)
    assert any(line.startswith("| token ensemble") for line in rows)
    assert "load average" in table and "cores" in table


def test_differences_count_records_and_the_largest_score_gap():
    a = [{"id": "1", "score": 0.5}, {"id": "2", "score": 1.0}]
    b = [{"id": "1", "score": 0.5}, {"id": "2", "score": 0.75}]
    assert differences(a, a) == {"records_differing": 0, "largest_score_difference": 0.0}
    assert differences(a, b) == {"records_differing": 1, "largest_score_difference": 0.25}
