"""The three runners (merge_lab, mergekit, the I/O floor) as child processes, measured alike.

Wall time runs from the start of the child to the end of an `os.sync()` after it exits, so every
runner is timed until its output is on disk whether or not it fsyncs itself. CPU time and peak
RSS come from the child's own rusage (os.wait4, in benchmarks.measure), which includes its threads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
RUNNERS = ("merge_lab", "mergekit", "io_floor")


@dataclass
class Measure:
    wall: float
    cpu: float
    rss_mb: float
    ok: bool
    log: str


def frankenmerge_ranges(layers: int) -> list[tuple[int, int]]:
    """The passthrough row's layer ranges: the base's first 3/4 then a fine-tune's last 3/4, so
    the middle half of the layers appears twice (1.5x the layers, as a self-stacked frankenmerge)."""
    return [(0, max(1, 3 * layers // 4)), (layers // 4, layers)]


def recipe(method: str, base: Path, fts: list[Path], layers: int = 16) -> dict:
    """One recipe both tools read as is; mergekit computes in float32 (as merge_lab does), both write bf16.

    `layers` (the set's depth) only shapes the passthrough frankenmerge's slices."""
    common = {"dtype": "float32", "out_dtype": "bfloat16"}
    if method == "linear":
        models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in [base, *fts]]
        return {"merge_method": "linear", "models": models, **common}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(base), "models": [{"model": str(fts[0])}],
                "parameters": {"t": 0.5}, **common}
    if method == "passthrough":
        (a0, b0), (a1, b1) = frankenmerge_ranges(layers)
        slices = [{"sources": [{"model": str(base), "layer_range": [a0, b0]}]},
                  {"sources": [{"model": str(fts[0]), "layer_range": [a1, b1]}]}]
        return {"merge_method": "passthrough", "slices": slices, **common}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": str(base),
                "models": [{"model": str(p)} for p in fts], **common}
    params: dict = {"weight": 0.5}
    if method in ("ties", "dare_ties", "della", "breadcrumbs_ties"):
        params["density"] = 0.5  # della: epsilon 0.15 and breadcrumbs: gamma 0.01, both tools' defaults
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(p), "parameters": dict(params)} for p in fts], **common}


def recipe_inputs(r: dict) -> list[Path]:
    if "slices" in r:
        refs = [src["model"] for s in r["slices"] for src in s["sources"]]
    else:
        refs = [m["model"] for m in r["models"]] + ([r["base_model"]] if r.get("base_model") else [])
    return [Path(p) for p in dict.fromkeys(refs)]


def warm(folders: list[Path]) -> None:
    """Read the inputs once so every runner starts with them in the page cache."""
    buf = bytearray(16 << 20)
    for folder in folders:
        for file in sorted(folder.glob("*.safetensors")):
            with open(file, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def command(runner: str, recipe_path: Path, out: Path, out_bytes: int, inputs: list[Path], threads: int | None) -> list[str]:
    if runner == "merge_lab":
        return [str(BIN / "merge-lab"), "merge", str(recipe_path), "-o", str(out), "--no-hash-inputs", "--no-progress"]
    if runner == "mergekit":
        cmd = [str(BIN / "mergekit-yaml"), str(recipe_path), str(out), "--no-copy-tokenizer", "--quiet"]
        return cmd + (["-j", str(threads)] if threads else [])
    if runner == "io_floor":
        return [sys.executable, "-m", "benchmarks.floor", str(out_bytes), str(out), *map(str, inputs)]
    raise ValueError(runner)


def run_one(runner: str, r: dict, work: Path, out_bytes: int, threads: int | None = None, sync: bool = True) -> Measure:
    """Warm the cache, run one child, wait for it and for the disk; return its figures."""
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / "recipe.yml"
    recipe_path.write_text(yaml.safe_dump(r, sort_keys=False))
    out = work / f"out-{runner}"
    shutil.rmtree(out, ignore_errors=True)
    if sync:
        os.sync()
    inputs = recipe_inputs(r)
    warm(inputs)
    cmd = command(runner, recipe_path, out, out_bytes, inputs, threads)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    log = work / f"{runner}.log"
    p = subprocess.run([sys.executable, "-m", "benchmarks.measure", str(log), "sync" if sync else "nosync", *cmd],
                       capture_output=True, text=True, env=env)
    try:
        m = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return Measure(0.0, 0.0, 0.0, False, p.stderr[-2000:])
    ok = m["rc"] == 0 and out.exists()
    shutil.rmtree(out, ignore_errors=True)
    return Measure(m["wall"], m["cpu"], m["rss_kb"] / 1024, ok, log.read_text()[-2000:])
