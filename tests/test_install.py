"""A non-editable install is whole: `pip install .` puts merge_lab (with merge_lab.strategies and the
demo's recipes as package data) into site-packages, no bare `strategies` package, and the demo runs
from it in a fresh interpreter outside the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
from pathlib import Path
import merge_lab, merge_lab.strategies
from merge_lab.demo.pipeline import DEMO_RECIPES, STEPS, run_demo
from merge_lab.merge import interface
from merge_lab.testing import make_checkpoint

site = Path(sys.argv[1]).resolve()
assert Path(merge_lab.__file__).resolve().is_relative_to(site), merge_lab.__file__
assert Path(merge_lab.strategies.__file__).resolve().is_relative_to(site), merge_lab.strategies.__file__
assert sorted(p.name for p in DEMO_RECIPES.glob("*.yaml")) == [s.recipe for s in STEPS]
builtin = {n for n, cls in interface.available().items() if cls.__module__.startswith("merge_lab.")}
tiny = {
    "align": {"train": {"steps": 1, "batch_size": 2, "max_tokens": 48}, "data_limit": 2},
    "fuse": {"train": {"steps": 1, "batch_size": 2, "max_length": 48, "eval_rows": 2}, "data_limit": 2},
    "compare": {"settings": {"limit": 1, "max_new_tokens": 2, "bootstrap": 10},
                "suites": ["harmless_refusal"]},
}
work = Path(sys.argv[2])
base = make_checkpoint(work / "tiny-base", "llama", seed=0, shards=False)
result = run_demo(work / "runs", profile="quick", base=str(base), overrides=tiny, progress=False)
print(json.dumps({"builtin": sorted(builtin), "ran": result.ran,
                  "report": str(result.report)}))
"""


def packages_on_disk() -> set[str]:
    """Every package folder of the source tree, by the name it installs under."""
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "merge_lab").rglob("__init__.py")}
    return found | {"merge_lab.strategies"}


def test_every_package_folder_is_listed_in_pyproject():
    block = re.search(r"^packages = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)
    listed = set(re.findall(r'"([\w.]+)"', block.group(1)))
    assert listed == packages_on_disk(), "pyproject.toml [tool.setuptools] packages must list every package folder"


def test_non_editable_install_has_the_strategies_and_runs_the_demo(tmp_path):
    wheels, site, src = tmp_path / "wheels", tmp_path / "site", tmp_path / "src"
    # build from a copy of the files git knows: a stale build/ folder in the checkout must not leak in
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    for rel in files:
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True)
    (wheel,) = wheels.glob("merge_lab-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    assert (site / "merge_lab" / "strategies" / "ties.py").is_file()
    assert (site / "merge_lab" / "demo" / "recipes" / "09_compare.yaml").is_file()
    assert not (site / "strategies").exists(), "a bare `strategies` package would collide with other projects'"
    env = {**os.environ, "PYTHONPATH": str(site), "MERGE_LAB_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"linear", "ties", "slerp", "h3_moe"} <= set(out["builtin"])
    from merge_lab.demo.pipeline import STEPS

    assert out["ran"] == [s.recipe.removesuffix(".yaml") for s in STEPS]  # every step, the ablations included
    assert (Path(out["report"]) / "report.html").is_file()
