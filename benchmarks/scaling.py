"""`python -m benchmarks.scaling` (`make bench-scaling`): what a second process buys, on the same cores.

    python -m benchmarks.scaling                   # 1 repetition (about 5 min on 2 busy cores)
    python -m benchmarks.scaling --reps 3
    python -m benchmarks.scaling --hidden 32 --layers 1 --train-steps 3 --limit 4 --out /tmp/S.md --work /tmp/w

Two jobs, each run twice with the same total of threads: once as one process with 2 torch threads
(`python -m ...`, OMP_NUM_THREADS=2), once as 2 processes with 1 thread each (`accelerate launch
--multi_gpu --num_processes 2`, OMP_NUM_THREADS=1; CPU processes join one gloo group):

- router training (`merge_lab.moe.train.train`, through benchmarks.fusion_probe's timed collate) of
  a top-2-of-3 H3 MoE assembled from a synthetic Llama base with three FFN experts
  (benchmarks.fusion_inputs); the global batch is the same for both, so are the tokens per step;
  tokens/s = real tokens of the timed steps (all but the first and last) over their seconds;
- `merge-lab compare` of the MoE and one expert on a scoring suite and a generation suite;
  items/s = (candidate, item) results over the seconds the evaluation took (model loads and
  imports excluded: every cache entry's own seconds), and the two runs' per-example results are
  compared (they must be identical).

Repetitions alternate which layout runs first. Writes --out (benchmarks/SCALING_RESULTS.md) and the
raw figures to <work>/scaling_results.json. No GPU is used (CUDA_VISIBLE_DEVICES is emptied).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.fusion import data_blocks
from benchmarks.fusion_inputs import LABELS, build
from benchmarks.run import figure, load_line, machine, median_of, ratio, table
from benchmarks.runners import ROOT
from merge_lab.testing.launch import accelerate_command, cpu_env

LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}  # name: (processes, threads per process)
TITLES = {"1x2": "1 process × 2 threads", "2x1": "2 processes × 1 thread"}
SUITES = ["helpful_likelihood", "harmless_refusal"]


def synthetic_base(folder: Path, hidden: int, layers: int) -> Path:
    """A seeded random Llama with the tiny character tokenizer (ChatML template), reused when complete."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from merge_lab.testing.tiny import save_tiny_tokenizer

    key = json.dumps({"hidden": hidden, "layers": layers, "intermediate": "x8/3 to 16"})
    stamp = folder / ".complete"
    if stamp.exists() and stamp.read_text() == key:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    import torch

    torch.manual_seed(0)  # intermediate: a multiple of 16 (the grouped expert matmul wants 16-byte strides)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=-(-hidden * 8 // 3 // 16) * 16, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    save_tiny_tokenizer(folder, 96)
    stamp.write_text(key)
    return folder


def launch(args: list[str], layout: str, work: Path, log: Path) -> float:
    """Run `python ARGS` in `layout` (see LAYOUTS); its wall seconds. A failure raises with its log."""
    processes, threads = LAYOUTS[layout]
    env = cpu_env(work, threads, PYTHONPATH=str(ROOT))
    cmd = accelerate_command(processes, *args) if processes > 1 else [sys.executable, *args]
    start = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work)
    wall = time.perf_counter() - start
    if p.returncode:
        raise RuntimeError(f"{' '.join(args[:4])} ({TITLES[layout]}) failed:\n{log.read_text()[-3000:]}")
    return wall


# ------------------------------------------------------------------ the measured jobs


def probe_train(result: Path, spec_path: Path) -> None:
    """In each launched process: train, then sum the processes' tokens; the main process writes."""
    import torch

    from benchmarks.fusion_probe import train_probe

    spec = json.loads(spec_path.read_text())
    figures = train_probe(spec)
    seconds = figures["step_s"] * figures["timed_steps"]
    tokens = torch.tensor([figures["tokens"], figures["padded_tokens"]], dtype=torch.float64)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tokens)
        world = torch.distributed.get_world_size()
        if torch.distributed.get_rank():
            return
    figures.update(tokens=int(tokens[0]), padded_tokens=int(tokens[1]), tokens_per_s=float(tokens[0]) / seconds,
                   processes=world, threads=torch.get_num_threads())
    result.write_text(json.dumps(figures))


def train_run(layout: str, moe: Path, args, work: Path) -> dict:
    run = work / f"train-{layout}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    train = {"data": data_blocks(args.rows_per_block), "steps": args.train_steps, "batch_size": args.train_batch,
             "max_length": args.max_length, "lr": 5e-3, "lambda": 0.5, "gamma": 1e-3, "eval_rows": 0,
             "cpu": True, "seed": 0, "trainable": "router"}
    spec = run / "spec.json"
    spec.write_text(json.dumps({"moe": str(moe), "state": str(run / "state"), "train": train}))
    wall = launch(["-m", "benchmarks.scaling", "probe-train", str(run / "result.json"), str(spec)], layout, run,
                  run / "log.txt")
    figures = json.loads((run / "result.json").read_text())
    figures.update(wall_s=wall, load=os.getloadavg()[0])
    return figures


def compare_file(folder: Path, moe: Path, expert: Path, args) -> Path:
    spec = {"settings": {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                         "generate_batch_size": args.batch_size, "bootstrap": 200},
            "suites": SUITES,
            "candidates": [{"name": "moe", "checkpoint": str(moe)}, {"name": "expert", "checkpoint": str(expert)}]}
    path = folder / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def compare_run(layout: str, spec: Path, work: Path) -> tuple[dict, dict]:
    """(figures, per-example results) of one `merge-lab compare` with a fresh cache."""
    run = work / f"compare-{layout}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    wall = launch(["-m", "merge_lab", "compare", str(spec), "-o", str(run / "report"), "--no-progress"], layout, run,
                  run / "log.txt")
    entries = [json.loads(p.read_text()) for p in sorted((run / "report" / "cache" / "results").glob("*.json"))]
    entries = [e for e in entries if "records" in e]  # not the reference's answers
    items, seconds = sum(len(e["records"]) for e in entries), sum(e["seconds"] for e in entries)
    results = json.loads((run / "report" / "results.json").read_text())
    figures = {"items": items, "eval_s": seconds, "items_per_s": items / seconds, "wall_s": wall,
               "processes": results.get("processes", 1), "load": os.getloadavg()[0]}
    return figures, results["per_example"]


def differences(a: dict, b: dict) -> dict:
    """Per-example records of two runs: how many differ, and the largest difference of a score."""
    differ, largest = 0, 0.0
    for suite, per_candidate in a.items():
        for cand, records in per_candidate.items():
            for x, y in zip(records, b[suite][cand]):
                differ += x != y
                largest = max(largest, abs(float(x["score"]) - float(y["score"])))
    return {"records_differing": differ, "largest_score_difference": largest}


# ------------------------------------------------------------------ the table


def render(results: dict) -> str:
    s = results["settings"]
    loads = [r["load"] for job in ("train", "compare") for rows in results[job].values() for r in rows]
    reps = max(len(rows) for rows in results["compare"].values())
    diff = results["differences"]
    n = sum(r["items"] for r in results["compare"]["1x2"])
    same = ("identical in every repetition." if not any(d["records_differing"] for d in diff) else
            f"{sum(d['records_differing'] for d in diff)} of {n} records differ (largest score difference "
            f"{max(d['largest_score_difference'] for d in diff):.2g}: the two layouts run different thread counts).")
    lines = [
        "# Scaling benchmark: one process or two on the same cores",
        "",
        f"Machine: {results['machine']}; no GPU (CUDA_VISIBLE_DEVICES emptied).  ",
        f"Command: `{results['command']}` (started {results['started']}). Total {results['minutes']:.1f} min.  ",
        load_line(loads, "after each run"),
        f"Model: a synthetic Llama base (hidden {s['hidden']}, {s['layers']} layers, the 96-symbol character "
        "tokenizer), three FFN experts (the base with seeded noise on its FFN weights) and their `h3_moe` assembly "
        "(top-2 of 3), float32 on CPU. Each figure is one fresh run (processes started, models loaded); median "
        f"(min–max) over {reps} repetition(s), which layout runs first alternating.",
        "",
        f"- Router training: `merge_lab.moe.train`, trainable `router`, {s['train_steps']} steps of a global batch "
        f"of {s['train_batch']} (max_length {s['max_length']}), labelled rows of the shipped data; with 2 processes "
        f"each takes {s['train_batch'] // 2} rows of every batch. Tokens/s = real tokens of all processes in the "
        "timed steps (all but the first and the last) over their seconds.",
        f"- Compare: `merge-lab compare`, the MoE and one expert on {', '.join(SUITES)} (limit {s['limit']}, batch "
        f"{s['batch_size']}, up to {s['max_new_tokens']} new tokens), a fresh cache each run. Items/s = (candidate, "
        "item) results over the seconds of evaluation (each cache entry's own seconds: imports and model loads "
        "excluded). Per-example results of the two layouts: " + same,
        "",
    ]
    figures = [("router training, tokens/s", "train", "tokens_per_s", 1),
               ("router training, s per step", "train", "step_s", 2),
               ("router training, run wall s (start-up included)", "train", "wall_s", 1),
               ("compare, items/s", "compare", "items_per_s", 1),
               ("compare, evaluation s", "compare", "eval_s", 1),
               ("compare, run wall s (start-up included)", "compare", "wall_s", 1)]
    one, two = LAYOUTS
    lines += table(["measurement", TITLES[one], TITLES[two], "2 processes / 1 process"],
                   [[title, *(figure(results[job][name], key, digits) for name in LAYOUTS),
                     ratio(median_of(results[job][two], key), median_of(results[job][one], key))]
                    for title, job, key, digits in figures])
    lines += ["", "Last column: the ratio of the medians (above 1: more tokens or items per second, or more seconds)."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["probe-train"]:  # inside a measured run (one of the launched processes)
        probe_train(Path(argv[1]), Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the synthetic base")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=6, help="training steps (>= 3: first and last are not timed)")
    ap.add_argument("--train-batch", type=int, default=8, help="global batch (even: 2 processes split it)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows-per-block", type=int, default=16, help="rows drawn from each shipped data block")
    ap.add_argument("--limit", type=int, default=24, help="items per compare suite")
    ap.add_argument("--batch-size", type=int, default=4, help="compare scoring and generation batch")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/scaling"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/SCALING_RESULTS.md"))
    args = ap.parse_args(argv)
    if args.train_steps < 3:
        ap.error("--train-steps must be at least 3 (the first and last steps are not timed)")
    if args.train_batch % 2:
        ap.error("--train-batch must be even (2 processes share each batch)")
    started = time.time()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = synthetic_base(work / "base", args.hidden, args.layers)
    experts, moe = build(base, work)
    spec = compare_file(work, moe, experts[0], args)
    keys = ("hidden", "layers", "train_steps", "train_batch", "max_length", "limit", "batch_size", "max_new_tokens")
    results = {"machine": machine(), "command": " ".join(["python -m benchmarks.scaling", *argv]),
               "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "settings": {k: getattr(args, k) for k in keys}, "labels": list(LABELS),
               "train": {name: [] for name in LAYOUTS}, "compare": {name: [] for name in LAYOUTS}, "differences": []}
    for rep in range(args.reps):
        order = list(LAYOUTS)[:: 1 if rep % 2 == 0 else -1]
        per_example = {}
        for name in order:
            f = train_run(name, moe, args, work)
            results["train"][name].append(f)
            print(f"[scaling] rep {rep + 1} train   {TITLES[name]:24s} {f['tokens_per_s']:8.1f} tokens/s  "
                  f"wall {f['wall_s']:6.1f} s  load {f['load']:.1f}", file=sys.stderr, flush=True)
        for name in order:
            f, per_example[name] = compare_run(name, spec, work)
            results["compare"][name].append(f)
            print(f"[scaling] rep {rep + 1} compare {TITLES[name]:24s} {f['items_per_s']:8.1f} items/s   "
                  f"wall {f['wall_s']:6.1f} s  load {f['load']:.1f}", file=sys.stderr, flush=True)
        results["differences"].append(differences(per_example["1x2"], per_example["2x1"]))
        results["minutes"] = (time.time() - started) / 60
        (work / "scaling_results.json").write_text(json.dumps(results, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results))
    print(f"[scaling] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
