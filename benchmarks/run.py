"""`make bench`: merge_lab against mergekit and the I/O floor on synthetic Llama-shaped checkpoints.

    python -m benchmarks.run              # 0.5B and 1.5B sets, 3 repetitions each, all methods (the first five
                                          # took 35 min on 2 idle cores; mergekit's della alone took 16 min
                                          # for one 0.5B run on shared cores)
    python -m benchmarks.run --quick      # 0.5B only, 1 repetition
    python -m benchmarks.run --sizes tiny --reps 1 --out /tmp/R.md --work /tmp/w   # smoke test

Runs alternate (repetition, method, runner), each a fresh child process with the inputs read
once beforehand (warm page cache for every runner). Writes the Markdown table to --out and the
raw figures to <work>/results.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.runners import RUNNERS, frankenmerge_ranges, recipe, run_one
from benchmarks.synth import SHAPES, ensure_family

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp",
           "model_stock", "della", "nuslerp", "breadcrumbs_ties", "passthrough")
# wall time targets against mergekit (issue 5; the last five rows: issue 12 part 7)
WALL_TARGET = {"ties": 0.5, "dare_ties": 0.5, "linear": 0.8, "task_arithmetic": 0.8, "slerp": 0.8,
               "model_stock": 0.5, "della": 0.5, "nuslerp": 0.5, "breadcrumbs_ties": 0.5, "passthrough": 0.5}
FLOOR_TARGET = {"linear": 1.5}


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB memory, Python {platform.python_version()}"


def out_bytes(shape_name: str, method: str = "linear") -> int:
    """bf16 bytes of the merge's output: one model of the set, or the frankenmerge's deeper one."""
    shape = SHAPES[shape_name]
    if method == "passthrough":
        depth = sum(b - a for a, b in frankenmerge_ranges(shape.layers))
        shape = dataclasses.replace(shape, layers=depth)
    return 2 * shape.params


def probe_plan(r: dict, work: Path) -> dict | None:
    """Untimed: merge_lab's predicted peak vs the measured peak RSS growth of the same merge."""
    path = work / "probe.yml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    out = work / "out-probe"
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, "-m", "benchmarks.plan_probe", str(path), str(out)],
                       capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode != 0:
        print(p.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _measure(size: str, rep: int, method: str, runner: str, models: tuple[Path, ...], rows: dict, args) -> None:
    r = recipe(method, models[0], list(models[1:]), SHAPES[size].layers)
    m = run_one(runner, r, args.work / "runs" / method, out_bytes(size, method), sync=not args.no_sync)
    d = rows[method][runner]
    d.setdefault("load", []).append(os.getloadavg()[0])
    if m.ok:
        d["wall"].append(m.wall)
        d["cpu"].append(m.cpu)
        d["rss"].append(m.rss_mb)
    else:
        d["failed"] += 1
        print(f"[bench] {runner} {method} FAILED:\n{m.log}", file=sys.stderr)
    print(f"[bench] {size} rep {rep + 1} {method:16s} {runner:10s} wall {m.wall:7.2f} s  "
          f"cpu {m.cpu:7.2f} s  rss {m.rss_mb:7.0f} MB{'' if m.ok else '  FAILED'}", file=sys.stderr, flush=True)


def spread(values: list[float], digits: int = 1) -> str:
    """Median (min–max, n=) of repeated measurements; the one format of every benchmark table."""
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f}, n={len(values)})"


def load_line(loads: list[float], when: str) -> str:
    """The 1-minute load averages sampled `when`, and whether other work shared the cores."""
    if not loads:
        return ""
    median, cores = statistics.median(loads), os.cpu_count() or 1
    who = ("the machine was shared with other work" if median > cores + 0.5
           else "the benchmark's own runs; no other work of note")
    return f"1-minute load average {when}: {min(loads):.1f}–{max(loads):.1f} (median {median:.1f}; {who}).  "


def figure(rows: list[dict], key: str, digits: int = 1) -> str:
    """One table cell: the `spread` of `key` over the repetitions that measured it."""
    return spread([r[key] for r in rows if r.get(key) is not None], digits)


def median_of(rows: list[dict], key: str) -> float | None:
    """The median of `key` over the repetitions that measured it (None: none did)."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    """a / b as a table cell ("—" when either is missing or zero)."""
    return f"{a / b:.2f}x" if a and b else "—"


def table(header: list[str], body: list[list[str]]) -> list[str]:
    """The lines of one markdown table: the header, its rule, a line per row of cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in body)]


def render(results: dict) -> str:
    lines = [
        "# Merge benchmark",
        "",
        f"Machine: {results['machine']}.  ",
        "Commands (their repetitions add up): " + "; ".join(f"`{c}`" for c in results["commands"])
        + f". Total {results['minutes']:.0f} min; repetitions done: "
        + ", ".join(f"{k}: {v}" for k, v in results.get("done", {}).items()) + ".  ",
        load_line([x for rows in results["sizes"].values() for m in rows.values() for d in m.values()
                   for x in d.get("load", [])], "at the end of each run"),
        "Inputs: synthetic Llama-shaped bf16 checkpoints (vocabulary 128256, untied embeddings), sharded in "
        "1 GB files; base + 2 fine-tunes per set (linear averages all three, slerp uses base + 1, the others "
        "merge the 2 fine-tunes onto the base; passthrough is a frankenmerge: the base's first 3/4 of the "
        "layers, then the first fine-tune's last 3/4, 1.5x the layers and output). "
        "Recipe: `dtype: float32, out_dtype: bfloat16` for both tools (float32 arithmetic, bf16 output). "
        "merge_lab runs with `--no-hash-inputs` (hashing re-reads every input for the model card).  ",
        "Each run is a fresh process started with the inputs already in the page cache (read once "
        "just before); wall time runs until an `os.sync()` after the process exits returns, so all "
        "runners are timed until their output is on disk. CPU = user + system time of the process; "
        "RSS = its peak resident set. Figures: median (min–max) over the repetitions.",
        "",
    ]
    for size, rows in results["sizes"].items():
        lines += [f"## {size} set ({SHAPES[size].params / 1e9:.2f} B parameters per model, "
                  f"{out_bytes(size) / 1e9:.2f} GB output)", ""]
        lines += ["| method | runner | wall s | CPU s | peak RSS MB | wall vs mergekit | CPU vs mergekit | target | met |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for method in results["methods"]:
            m = rows.get(method, {})
            med = {r: statistics.median(m[r]["wall"]) if m.get(r, {}).get("wall") else None for r in RUNNERS}
            rss = {r: statistics.median(m[r]["rss"]) if m.get(r, {}).get("rss") else None for r in RUNNERS}
            cpu = {r: statistics.median(m[r]["cpu"]) if m.get(r, {}).get("cpu") else None for r in RUNNERS}
            for runner in RUNNERS:
                d = m.get(runner, {"wall": [], "cpu": [], "rss": [], "failed": 0})
                ratio, target, met = "", "", ""
                cpu_ratio = f"{cpu[runner] / cpu['mergekit']:.2f}x" if cpu[runner] and cpu["mergekit"] else ""
                if runner == "merge_lab" and med["merge_lab"] and med["mergekit"]:
                    x = med["merge_lab"] / med["mergekit"]
                    ratio = f"{x:.2f}x"
                    goal = WALL_TARGET[method]
                    target = f"≤ {goal}x mergekit"
                    met = "yes" if x <= goal else f"no ({x / goal:.2f}x over)"
                    if method in FLOOR_TARGET and med["io_floor"]:
                        f = med["merge_lab"] / med["io_floor"]
                        target += f"; ≤ {FLOOR_TARGET[method]}x floor ({f:.2f}x)"
                        met += "; " + ("yes" if f <= FLOOR_TARGET[method] else f"no ({f / FLOOR_TARGET[method]:.2f}x over)")
                    if rss["merge_lab"] and rss["mergekit"]:
                        rr = rss["merge_lab"] / rss["mergekit"]
                        target += "; RSS ≤ mergekit"
                        met += f"; RSS {rr:.2f}x " + ("yes" if rr <= 1 else "no")
                elif runner == "mergekit" and med["mergekit"] and med["io_floor"]:
                    ratio = "1.00x"
                fail = f" ({d['failed']} failed)" if d.get("failed") else ""
                if not d["wall"] and not d.get("failed"):
                    fail = " (not run)"
                lines.append(f"| {method} | {runner}{fail} | {spread(d['wall'])} | {spread(d['cpu'])} | "
                             f"{spread(d['rss'], 0)} | {ratio} | {cpu_ratio} | {target} | {met} |")
        lines.append("")
        probes = results.get("probes", {}).get(size, {})
        if probes:
            lines += ["Predicted peak (`merge-lab plan`) against the measured peak RSS growth of the same merge "
                      "(peak minus resident memory once planned):", "",
                      "| method | predicted MB | measured growth MB | upper bound |", "|---|---|---|---|"]
            for method, p in probes.items():
                if p:
                    ok = "yes" if p["predicted"] >= p["growth"] else "NO"
                    lines.append(f"| {method} | {p['predicted'] / 2**20:.0f} | {p['growth'] / 2**20:.0f} | {ok} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _save(results: dict, args: argparse.Namespace, started: float) -> None:
    """Write raw figures and the table after every repetition, so a cut-short run still reports."""
    results["minutes"] = (time.time() - started) / 60
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.5B", "1.5B"], choices=sorted(SHAPES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    ap.add_argument("--reps", type=int, nargs="+", default=[3],
                    help="repetitions per size, in --sizes order (the last value holds for the rest)")
    ap.add_argument("--quick", action="store_true", help="0.5B set only, 1 repetition")
    ap.add_argument("--jobs", type=int, default=1,
                    help="measurements run at once; only 1 gives comparable figures (more: smoke tests)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="[SIZE:]RUNNER:METHOD",
                    help="combinations not to run (shown as 'not run'), e.g. mergekit:ties or 1.5B:mergekit:ties; "
                    "default: none (mergekit's 1.5B ties takes about 6 min on 2 idle cores)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's repetitions to <work>/results.json instead of starting afresh")
    ap.add_argument("--no-sync", action="store_true", help="skip the os.sync() around runs (smoke tests only)")
    ap.add_argument("--no-probe", action="store_true", help="skip the plan-vs-measured memory check")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"))
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.reps = ["0.5B"], [1]
    reps = {size: args.reps[min(i, len(args.reps) - 1)] for i, size in enumerate(args.sizes)}
    started = time.time()
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    previous = args.work / "results.json"
    if args.append and previous.exists():
        results = json.loads(previous.read_text())
        if "command" in results:  # written before runs could be appended
            results["commands"] = [f"{results.pop('command')}  (started {results.pop('started', '?')})"]
        results["commands"].append(f"{command}  (started {stamp})")
        results["methods"] = list(dict.fromkeys(results["methods"] + args.methods))
        started -= 60 * results["minutes"]
    else:
        results = {
            "machine": machine(), "commands": [f"{command}  (started {stamp})"], "reps": reps, "jobs": args.jobs,
            "sync": not args.no_sync, "methods": args.methods, "sizes": {}, "probes": {}, "done": {},
        }
    for size in args.sizes:
        shard = 1 << 30 if size != "tiny" else 200_000
        print(f"[bench] generating the {size} set", file=sys.stderr, flush=True)
        base, *fts = ensure_family(args.work / "models", SHAPES[size], 2, shard)
        rows = results["sizes"].setdefault(size, {})
        for m in args.methods:
            for r in args.runners:
                rows.setdefault(m, {}).setdefault(r, {"wall": [], "cpu": [], "rss": [], "failed": 0})
        done = results["done"].get(size, 0)
        for rep in range(reps[size]):
            jobs = []
            for i, method in enumerate(args.methods):
                order = [args.runners[(k + i + rep) % len(args.runners)] for k in range(len(args.runners))]
                jobs += [(method, runner) for runner in order
                         if f"{runner}:{method}" not in args.skip and f"{size}:{runner}:{method}" not in args.skip]

            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda job, rep=rep, models=(base, *fts), rows=rows, size=size:
                              _measure(size, rep, *job, models, rows, args), jobs))
            results["done"][size] = done + rep + 1
            _save(results, args, started)
        if not args.no_probe and "merge_lab" in args.runners and size == args.sizes[0]:
            results["probes"][size] = {m: probe_plan(recipe(m, base, fts, SHAPES[size].layers), args.work / "runs" / m)
                                       for m in args.methods}
            _save(results, args, started)
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
