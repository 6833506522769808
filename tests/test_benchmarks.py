"""Smoke test of the merge benchmark harness at a tiny size (figures are not checked: they
live in benchmarks/RESULTS.md, made by `make bench`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.run import METHODS, main  # noqa: E402
from benchmarks.runners import RUNNERS  # noqa: E402


def test_harness_runs_every_method_and_runner(tmp_path):
    """Every method through merge_lab and the floor; mergekit (6 s of imports a run) on linear
    only, to stay in the test budget. The full grid is `make bench`."""
    out = tmp_path / "RESULTS.md"
    skip = [f"mergekit:{m}" for m in METHODS if m != "linear"]
    assert main(["--sizes", "tiny", "--reps", "1", "--jobs", "2", "--no-probe", "--no-sync",
                 "--work", str(tmp_path / "work"), "--out", str(out), "--skip", *skip]) == 0
    raw = json.loads((tmp_path / "work" / "results.json").read_text())
    rows = raw["sizes"]["tiny"]
    for method in METHODS:
        for runner in RUNNERS:
            figures = rows[method][runner]
            assert figures["failed"] == 0, (method, runner)
            if f"{runner}:{method}" in skip:
                assert not figures["wall"]
                continue
            assert len(figures["wall"]) == 1 and figures["wall"][0] > 0
            assert figures["rss"][0] > 1  # MB: a real process was measured
    table = out.read_text()
    assert "cores" in table and "GiB memory" in table
    body = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    cells = {(c[1].strip(), c[2].split("(")[0].strip()) for c in (line.split("|") for line in body[1:])}
    assert cells == {(m, r) for m in METHODS for r in RUNNERS}
    linear_ml = next(line for line in body if line.startswith("| linear | merge_lab |"))
    assert "x mergekit" in linear_ml and "x floor" in linear_ml and "RSS" in linear_ml
    assert "| ties | mergekit (not run) |" in table
