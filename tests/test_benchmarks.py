"""Smoke test of the merge benchmark harness at a tiny size (figures are not checked: they
live in benchmarks/RESULTS.md, made by `make bench`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

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


# the rows issue 12 part 7 added (model_stock, della, nuslerp, breadcrumbs_ties, passthrough slices)
NEW_ROWS = ("model_stock", "della", "nuslerp", "breadcrumbs_ties", "passthrough")


def test_new_rows_are_recipes_both_tools_plan_alike(tmp_path):
    """Each new row's recipe is one both tools accept as is (mergekit's schema, our planner), and the
    I/O floor writes as many bytes as merge_lab's plan does (the frankenmerge is deeper)."""
    from mergekit.config import MergeConfiguration

    from benchmarks.run import out_bytes
    from benchmarks.runners import frankenmerge_ranges, recipe
    from benchmarks.synth import SHAPES, ensure_family
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import parse_recipe

    shape = SHAPES["tiny"]
    base, *fts = ensure_family(tmp_path / "models", shape, 2, 200_000)
    assert set(NEW_ROWS) <= set(METHODS)
    for method in NEW_ROWS:
        r = recipe(method, base, fts, shape.layers)
        theirs = MergeConfiguration.model_validate(r)
        assert theirs.merge_method == method
        plan = make_plan(parse_recipe(yaml.safe_dump(r), source=method))
        assert plan.strategy == method
        written = sum(t.dtype.itemsize * math.prod(t.shape) for t in plan.tasks)
        assert written == out_bytes("tiny", method), method
        layers = {int(t.output.split(".")[2]) for t in plan.tasks if t.output.startswith("model.layers.")}
        depth = sum(b - a for a, b in frankenmerge_ranges(shape.layers)) if method == "passthrough" else shape.layers
        assert layers == set(range(depth)), method
    assert frankenmerge_ranges(16) == [(0, 12), (4, 16)]  # the 0.5B / 1.5B sets: 24 layers out
