"""Checks `merge-lab plan`'s predicted peak against the peak RSS growth of the real merge.

Run as `python -m benchmarks.plan_probe RECIPE OUT`: plans, records the resident memory, resets
the kernel's peak-RSS mark (/proc/self/clear_refs), merges, and prints JSON with the prediction
and the measured growth of the peak over the pre-merge resident memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def main(recipe: str, out: str) -> None:
    from merge_lab.merge.engine import run_plan
    from merge_lab.merge.planner import make_plan
    from merge_lab.merge.recipe import load_recipe

    plan = make_plan(load_recipe(recipe))
    before = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    run_plan(plan, out, progress=False, hash_inputs=False)
    peak = _status("VmHWM")
    print(json.dumps({"predicted": plan.predicted_peak_bytes(), "before": before, "peak": peak,
                      "growth": peak - before}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
