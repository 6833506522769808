"""The scaling benchmark's table and its record-by-record comparison, on made-up figures (the
figures themselves live in benchmarks/SCALING_RESULTS.md, made by `make bench-scaling`; its runs
start processes, too slow for the test suite)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.scaling import differences, render  # noqa: E402


def _results(diff: dict) -> dict:
    train = {"1x2": [{"tokens_per_s": 100.0, "step_s": 2.0, "wall_s": 30.0, "load": 1.0}],
             "2x1": [{"tokens_per_s": 150.0, "step_s": 1.5, "wall_s": 40.0, "load": 1.0}]}
    compare = {"1x2": [{"items_per_s": 10.0, "eval_s": 9.6, "wall_s": 50.0, "items": 96, "load": 3.5}],
               "2x1": [{"items_per_s": 20.0, "eval_s": 4.8, "wall_s": 60.0, "items": 96, "load": 3.5}]}
    settings = {"hidden": 256, "layers": 4, "train_steps": 6, "train_batch": 8, "max_length": 128, "limit": 24,
                "batch_size": 4, "max_new_tokens": 16}
    return {"machine": "2 cores", "command": "python -m benchmarks.scaling", "started": "now", "minutes": 4.0,
            "settings": settings, "train": train, "compare": compare, "differences": [diff]}


def test_differences_count_records_and_the_largest_score_gap():
    a = {"s": {"c": [{"id": "1", "score": 0.5}, {"id": "2", "score": 1.0, "answer": "x"}]}}
    b = {"s": {"c": [{"id": "1", "score": 0.5}, {"id": "2", "score": 0.75, "answer": "y"}]}}
    assert differences(a, a) == {"records_differing": 0, "largest_score_difference": 0.0}
    assert differences(a, b) == {"records_differing": 1, "largest_score_difference": 0.25}


def test_table_has_both_layouts_their_ratio_and_says_whether_results_matched():
    table = render(_results({"records_differing": 0, "largest_score_difference": 0.0}))
    assert "identical in every repetition" in table and "load average" in table
    row = next(line for line in table.splitlines() if line.startswith("| compare, items/s"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["compare, items/s", "10.0", "20.0", "2.00x"]
    row = next(line for line in table.splitlines() if line.startswith("| router training, tokens/s"))
    assert row.endswith("| 1.50x |")
    table = render(_results({"records_differing": 3, "largest_score_difference": 1e-6}))
    assert "3 of 96 records differ (largest score difference 1e-06" in table
