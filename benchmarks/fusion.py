"""`python -m benchmarks.fusion`: what H3 fusion costs, on the demo's model (SmolLM2-135M-Instruct).

    python -m benchmarks.fusion                 # 3 repetitions (about 30 min a repetition on 2 busy cores)
    python -m benchmarks.fusion --reps 1        # one of each
    python -m benchmarks.fusion --append --reps 1   # add a repetition to the last table (same options)
    python -m benchmarks.fusion --base DIR --reps 1 --out /tmp/F.md --work /tmp/w   # any base (smoke tests)

Builds its own inputs from the base (three FFN experts, their top-2 H3 MoE: benchmarks.fusion_inputs),
then measures, each in a fresh process (benchmarks.measure: wall, CPU, peak RSS of that process):
- router training throughput of merge_lab.moe.train, per trainable mode (router, router+lora);
- scoring (batched log-likelihood) and greedy generation throughput and memory of the fused MoE,
  the token-level ensemble of its three experts, and one expert, through the comparison's candidates.
Repetitions alternate the order of modes and candidates. Writes the Markdown table to --out
(benchmarks/FUSION_RESULTS.md: the merge benchmark's RESULTS.md is never touched) and the raw
figures to <work>/fusion_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.fusion_inputs import LABELS, build
from benchmarks.run import figure, load_line, machine, median_of, ratio, table
from benchmarks.runners import ROOT

MODES = ("router", "router+lora")
CANDIDATES = ("moe", "ensemble", "expert")
TITLES = {"moe": "fused MoE (top-2 of 3)", "ensemble": "token ensemble of the 3 experts", "expert": "single expert"}
# labelled rows from the shipped data, as the demo's fusion recipe draws them (train split)
DATA = [
    {"expert": "helpful", "source": "refusal_pairs", "split": "train", "label": "answer"},
    {"expert": "helpful", "source": "benign_requests", "split": "train"},
    {"expert": "harmless", "source": "advbench", "split": "train", "response_template": "{refusal}"},
    {"expert": "harmless", "source": "donotanswer", "split": "train", "response_template": "{refusal}"},
    {"expert": "honest", "source": "truthfulqa_qa", "split": "train"},
]


def data_blocks(limit: int) -> list[dict]:
    return [dict(b, limit=limit) for b in DATA]


def inference_rows(limit: int, n_score: int, n_warm: int, n_gen: int) -> tuple[list, list, list[str]]:
    """(prompt, response) pairs to score, others to warm up on, and prompts to answer, drawn in
    turn from every block."""
    from merge_lab.moe.data import load_rows

    per_block = [load_rows([b], list(LABELS)) for b in data_blocks(limit)]
    mixed = [[e.prompt, e.response] for group in zip(*per_block) for e in group]
    return mixed[:n_score], mixed[n_score:n_score + n_warm], [p for p, _ in mixed[:n_gen]]


def measured(what: str, spec: dict, work: Path) -> dict:
    """Run one probe in a fresh process under benchmarks.measure; its figures plus wall, CPU, peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path, result, log = work / "spec.json", work / "result.json", work / "probe.log"
    spec_path.write_text(json.dumps(spec))
    result.unlink(missing_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "benchmarks.fusion_probe", what, str(result), str(spec_path)]
    p = subprocess.run([sys.executable, "-m", "benchmarks.measure", str(log), "nosync", *cmd],
                       capture_output=True, text=True, env=env)
    try:
        m = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        m = {"rc": -1}
    if m["rc"] != 0 or not result.exists():
        text = log.read_text()[-3000:] if log.exists() else p.stderr[-3000:]
        raise RuntimeError(f"fusion probe {what} {spec.get('kind', spec.get('train', {}).get('trainable'))} failed:\n{text}")
    figures = json.loads(result.read_text())
    figures.update(wall_s=m["wall"], cpu_s=m["cpu"], rss_mb=m["rss_kb"] / 1024, load=os.getloadavg()[0])
    return figures


# ------------------------------------------------------------------ the table


def _threads(results: dict) -> str:
    used = {r.get("threads") for group in ("train", "infer") for rows in results[group].values() for r in rows}
    return "/".join(str(t) for t in sorted(used - {None})) or "?"


def render(results: dict) -> str:
    s = results["settings"]
    loads = [r["load"] for group in ("train", "infer") for rows in results[group].values() for r in rows]
    reps = max((len(rows) for rows in results["infer"].values()), default=0)
    lines = [
        "# Fusion cost benchmark",
        "",
        f"Machine: {results['machine']}.  ",
        "Commands (their repetitions add up): " + "; ".join(f"`{c}`" for c in results["commands"])
        + f". Total {results['minutes']:.0f} min.  ",
        load_line(loads, "after each measurement"),
        f"Model: the base `{results['base']}`; three experts = the base with seeded noise "
        f"(2% of each tensor's spread) on its FFN weights; the MoE = their `h3_moe` assembly "
        f"(top_k {s['top_k']} of {len(LABELS)}, attention and embeddings from the base). float32 on CPU, "
        f"{_threads(results)} torch threads. Each figure is one fresh process; median (min–max) over {reps} "
        "repetitions, the order of candidates and modes rotated between repetitions. Peak RSS is the "
        "whole process (Python, torch and the model).",
        "",
        "## Router training (`merge_lab.moe.train`)",
        "",
        f"{s['train_steps']} steps of batch {s['train_batch']} (max_length {s['max_length']}) on labelled rows "
        "of the shipped data (the demo's fusion blocks, train split), lambda 0.5, gamma 1e-3 as in the demo. "
        "Tokens/s counts real (non-pad) tokens of the timed steps (all but the first and the last); "
        "setup = model load, tokenising and optimizer, before the first step.",
        "",
    ]
    lines += table(["trainable", "tokens/s", "s per step", "setup s", "process wall s", "CPU s", "peak RSS MB"],
                   [[mode, figure(rows, "tokens_per_s"), figure(rows, "step_s", 2), figure(rows, "setup_s"),
                     figure(rows, "wall_s"), figure(rows, "cpu_s"), figure(rows, "rss_mb", 0)]
                    for mode, rows in results["train"].items()])
    lines += [
        "",
        "## Inference (`merge_lab.evaluation.candidates`)",
        "",
        f"Scoring: the log-likelihood of {s['score_rows']} (prompt, response) pairs, chat-formatted, batch "
        f"{s['batch_size']}, after one untimed warm-up batch of other pairs; tokens/s = prompt + response tokens scored per "
        f"second (an ensemble runs each token through every member). Generation: greedy answers to "
        f"{s['gen_prompts']} prompts, batch {s['batch_size']}, up to {s['max_new_tokens']} new tokens; "
        "tokens/s = new tokens per second. Same prompts, batch size and dtype for all. RSS rise = peak "
        "resident memory above the level before the model loaded (sampled every 10 ms).",
        "",
    ]
    lines += table(["candidate", "params total M", "active per token M", "scoring tokens/s", "generation new tokens/s",
                    "new tokens", "load s", "process CPU s", "peak RSS MB", "RSS rise MB"],
                   [[TITLES[cand], f"{median_of(rows, 'params_total') / 1e6:.4g}",
                     f"{median_of(rows, 'params_active') / 1e6:.4g}", figure(rows, "score_tokens_per_s"),
                     figure(rows, "gen_tokens_per_s"), figure(rows, "gen_tokens", 0), figure(rows, "load_s"),
                     figure(rows, "cpu_s"), figure(rows, "rss_mb", 0), figure(rows, "rise_mb", 0)]
                    for cand, rows in results["infer"].items()])
    inf = results["infer"]
    if all(inf.get(c) for c in CANDIDATES):
        lines += ["", "Ratios of the medians (above 1: the MoE has more of it):", ""]
        lines += table(["figure", "MoE vs ensemble", "MoE vs single expert"],
                       [[title, ratio(median_of(inf["moe"], key), median_of(inf["ensemble"], key)),
                         ratio(median_of(inf["moe"], key), median_of(inf["expert"], key))]
                        for key, title in (("score_tokens_per_s", "scoring tokens/s"),
                                           ("gen_tokens_per_s", "generation tokens/s"), ("rss_mb", "peak RSS"),
                                           ("rise_mb", "RSS rise"), ("params_total", "parameters, total"),
                                           ("params_active", "parameters, active per token"))])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the run


def _upgrade(results: dict) -> dict:
    """Results written before runs could be appended had one command."""
    if "command" in results:
        results["commands"] = [f"{results.pop('command')}  (started {results.pop('started', '?')})"]
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None, help="base checkpoint folder (default: the shipped SmolLM2-135M-Instruct)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="trainable modes to time")
    ap.add_argument("--train-steps", type=int, default=4, help="steps per training run (>= 3: first and last are not timed)")
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=64, help="tokens per training example")
    ap.add_argument("--score-rows", type=int, default=16)
    ap.add_argument("--gen-prompts", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="inference batch size")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--rows-per-block", type=int, default=16, help="rows drawn from each shipped data block")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each probe (default: torch's)")
    ap.add_argument("--append", action="store_true",
                    help="add this run's repetitions to <work>/fusion_results.json (same options) instead of starting afresh")
    ap.add_argument("--render-only", action="store_true", help="rewrite --out from <work>/fusion_results.json, measuring nothing")
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/fusion"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/FUSION_RESULTS.md"))
    args = ap.parse_args(argv)
    if args.train_steps < 3:
        ap.error("--train-steps must be at least 3 (the first and last steps are not timed)")
    if args.render_only:
        args.out.write_text(render(_upgrade(json.loads((args.work / "fusion_results.json").read_text()))))
        return 0
    started = time.time()
    from merge_lab.core.bases import smollm2_base

    base = (args.base or smollm2_base()).resolve()
    print(f"[fusion] building experts and the MoE from {base}", file=sys.stderr, flush=True)
    experts, moe = build(base, args.work)
    rows, warmup, prompts = inference_rows(args.rows_per_block, args.score_rows, args.batch_size, args.gen_prompts)
    settings = {"seed": 0, "max_new_tokens": args.max_new_tokens, "max_length": 512, "batch_size": args.batch_size,
                "device": "cpu", "dtype": "float32", "chat_template": True}
    paths = {"moe": [str(moe)], "ensemble": [str(e) for e in experts], "expert": [str(experts[0])]}
    train = {"data": data_blocks(args.rows_per_block), "steps": args.train_steps, "batch_size": args.train_batch,
             "max_length": args.max_length, "lr": 5e-3, "lambda": 0.5, "gamma": 1e-3, "eval_rows": 0,
             "cpu": True, "seed": 0}
    command = "python -m benchmarks.fusion " + " ".join(argv if argv is not None else sys.argv[1:])
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    settings_row = {"top_k": 2, "train_steps": args.train_steps, "train_batch": args.train_batch,
                    "max_length": args.max_length, "score_rows": len(rows), "gen_prompts": len(prompts),
                    "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "threads": args.threads}
    previous = args.work / "fusion_results.json"
    if args.append and previous.exists():
        results = _upgrade(json.loads(previous.read_text()))
        if results["settings"] != settings_row or results["base"] != str(base):
            ap.error(f"--append: {previous} was measured with other settings or another base "
                     f"({results['settings']}); run without --append, or with the same options")
        results["commands"].append(f"{command}  (started {stamp})")
        started -= 60 * results["minutes"]
    else:
        results = {"machine": machine(), "base": str(base), "commands": [f"{command}  (started {stamp})"],
                   "settings": settings_row, "train": {}, "infer": {}}
    for m in args.modes:
        results["train"].setdefault(m, [])
    for c in CANDIDATES:
        results["infer"].setdefault(c, [])
    done = max(len(v) for v in results["infer"].values())
    for rep in range(done, done + args.reps):
        for k in range(len(args.modes)):
            mode = args.modes[(k + rep) % len(args.modes)]
            spec = {"moe": str(moe), "state": str(args.work / "state"), "train": dict(train, trainable=mode),
                    "threads": args.threads}
            f = measured("train", spec, args.work / "probe")
            results["train"][mode].append(f)
            print(f"[fusion] rep {rep + 1} train {mode:12s} {f['tokens_per_s']:8.1f} tokens/s  setup {f['setup_s']:5.1f} s  "
                  f"rss {f['rss_mb']:6.0f} MB  load {f['load']:.1f}", file=sys.stderr, flush=True)
        for k in range(len(CANDIDATES)):
            cand = CANDIDATES[(k + rep) % len(CANDIDATES)]
            spec = {"kind": cand, "paths": paths[cand], "settings": settings, "rows": rows, "warmup": warmup, "prompts": prompts,
                    "threads": args.threads}
            f = measured("infer", spec, args.work / "probe")
            results["infer"][cand].append(f)
            print(f"[fusion] rep {rep + 1} infer {cand:9s} score {f['score_tokens_per_s']:8.1f} tokens/s  "
                  f"generate {f['gen_tokens_per_s']:6.1f} tokens/s  rss {f['rss_mb']:6.0f} MB  load {f['load']:.1f}",
                  file=sys.stderr, flush=True)
        results["minutes"] = (time.time() - started) / 60
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "fusion_results.json").write_text(json.dumps(results, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results))
    print(f"[fusion] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
