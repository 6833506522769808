"""Smoke test of the fusion cost benchmark on a tiny random llama (figures are not checked against
any bound: they live in benchmarks/FUSION_RESULTS.md, made by `python -m benchmarks.fusion`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.fusion import CANDIDATES, TITLES, main  # noqa: E402
from merge_lab.testing import make_checkpoint  # noqa: E402


def _cells(table: str, header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose header row starts with `header`."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def _number(cell: str) -> float:
    return float(cell.split(" ")[0].rstrip("x"))


def test_fusion_benchmark_end_to_end(tmp_path):
    """One repetition, the router+lora mode only (each probe is a process importing torch and
    transformers: the full grid is `python -m benchmarks.fusion`)."""
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, shards=False)
    out, work = tmp_path / "FUSION.md", tmp_path / "work"
    assert main(["--base", str(base), "--reps", "1", "--modes", "router+lora", "--train-steps", "3",
                 "--train-batch", "4", "--max-length", "32", "--score-rows", "6", "--gen-prompts", "3",
                 "--batch-size", "3", "--max-new-tokens", "4", "--rows-per-block", "3",
                 "--work", str(work), "--out", str(out)]) == 0

    raw = json.loads((work / "fusion_results.json").read_text())
    (train,) = raw["train"]["router+lora"]
    assert train["steps"] == 3 and train["timed_steps"] == 1 and train["tokens"] > 0
    for key in ("tokens_per_s", "setup_s", "step_s", "rss_mb", "cpu_s"):
        assert train[key] > 0, key
    infer = {c: raw["infer"][c][0] for c in CANDIDATES}
    for cand, f in infer.items():
        for key in ("score_tokens_per_s", "gen_tokens_per_s", "rss_mb", "load_s", "params_total"):
            assert f[key] > 0, (cand, key)
    # the same requests for all: the ensemble counts each input token once, like the others
    assert len({f["score_tokens"] for f in infer.values()}) == 1
    assert infer["ensemble"]["members"] == 3 and infer["moe"]["members"] == infer["expert"]["members"] == 1
    assert infer["moe"]["params_total"] > infer["expert"]["params_total"]
    assert infer["moe"]["params_active"] < infer["moe"]["params_total"]

    table = out.read_text()
    assert "cores" in table and "GiB memory" in table and "load average" in table
    (row,) = _cells(table, "| trainable |")
    assert row[0] == "router+lora" and all(_number(c) > 0 for c in row[1:])
    rows = _cells(table, "| candidate |")
    assert [r[0] for r in rows] == [TITLES[c] for c in CANDIDATES]
    assert all(_number(c) > 0 for r in rows for c in r[1:])
    ratios = {r[0]: r[1:] for r in _cells(table, "| figure |")}
    assert _number(ratios["parameters, total"][1]) > 1  # the MoE holds more than one expert
    assert all(_number(c) > 0 for cells in ratios.values() for c in cells)
