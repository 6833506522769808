"""`python -m benchmarks.compare_speed` (`make bench-compare`): `merge-lab compare`'s items/s before
and after the evaluation savings of issue 13 part 9, in one run.

    python -m benchmarks.compare_speed                      # the demo's base, an H3 MoE, a token ensemble (minutes)
    python -m benchmarks.compare_speed --reps 2 --limit 32
    python -m benchmarks.compare_speed --model ./tiny --limit 3 --gen-limit 2 --out /tmp/C.md --work /tmp/w

"before" turns off what runtime.py added (`LoadedModel.share_prefix`: a batch's shared chat prefix
runs once; `drop_stopped`: stopped rows leave a decoding batch; `reuse_summaries`: a token ensemble
scores from its members' remembered row summaries); "after" is the default. Candidates, built from
the demo's base (converted once into `.cache/merge_lab/`, as the demo does) by benchmarks.fusion_inputs
under --work: the base; its H3 MoE (three FFN experts = the base with 2% seeded noise, top-2 of 3);
the token ensemble of those three experts. Each runs a scoring suite and a generation suite through
the candidates of merge_lab.evaluation exactly as a comparison does, with a fresh memo each time, same
settings on both paths; the ensemble's members are first scored on the suite as candidates of their
own (as in a comparison, where they are; untimed), so "after" shows what the ensemble no longer
recomputes. items/s = the suite's items over the seconds its `evaluate` took (models loaded before
the clock starts). The two paths' per-item records are compared.

Repetitions alternate which path runs first. Writes --out (benchmarks/COMPARE_RESULTS.md) and the
raw figures to <work>/compare_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.fusion_inputs import build
from benchmarks.run import load_line, machine

PATHS = ("before", "after")


def candidate(members: list[Path], args, memo):
    """A ModelCandidate of one folder, or the token ensemble of several (equal weights)."""
    from merge_lab.evaluation.candidates import ModelCandidate, TokenEnsemble
    from merge_lab.evaluation.spec import Settings

    settings = Settings(limit=args.limit, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                        batch_size=args.batch_size)
    singles = [ModelCandidate(p.name, p, settings, memo) for p in members]
    return singles[0] if len(singles) == 1 else TokenEnsemble("ensemble", singles, None, settings, memo)


def timed_suite(members: list[Path], suite_name: str, limit: int, which: str,
                args) -> tuple[float, float, int, list[dict]]:
    """(wall seconds, CPU seconds of this process, items, records) of one suite on one candidate,
    on the `which` path."""
    import torch

    from merge_lab.evaluation.memo import Memo
    from merge_lab.evaluation.suites import EvalContext, make_suite

    suite = make_suite(suite_name, limit=limit)
    suite.items()
    memo = Memo()
    cand = candidate(members, args, memo)
    if len(members) > 1 and which == "after" and suite_name == args.score_suite:
        for m in cand.members:  # scored as candidates of their own first, as a comparison does
            suite.evaluate(m, EvalContext())
            m.unload()
    cand.load()
    for lm in cand.models:
        lm.share_prefix = lm.drop_stopped = lm.reuse_summaries = which == "after"
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    records = suite.evaluate(cand, EvalContext())
    return time.perf_counter() - start, time.process_time() - cpu, len(records), records


def differences(a: list[dict], b: list[dict]) -> dict:
    """How many records of two runs differ (any field), and the largest gap between their scores."""
    differing = sum(1 for x, y in zip(a, b) if x != y) + abs(len(a) - len(b))
    gap = max((abs(x["score"] - y["score"]) for x, y in zip(a, b)), default=0.0)
    return {"records_differing": differing, "largest_score_difference": gap}


def measure(models: dict[str, list[Path]], args, results: dict, save) -> None:
    """Every (candidate, suite) on both paths, --reps times, alternating which path goes first."""
    import torch

    torch.set_num_threads(args.threads)
    for rep in range(args.reps):
        for name, path in models.items():
            for kind, suite, limit in (("scoring", args.score_suite, args.limit),
                                       ("generation", args.generate_suite, args.gen_limit)):
                row = results["rows"].setdefault(f"{name} · {suite}", {
                    "candidate": name, "suite": suite, "kind": kind, "items": 0,
                    "seconds": {p: [] for p in PATHS}, "cpu_seconds": {p: [] for p in PATHS}, "differences": []})
                records = {}
                for which in (PATHS if rep % 2 == 0 else PATHS[::-1]):
                    seconds, cpu, items, records[which] = timed_suite(path, suite, limit, which, args)
                    row["seconds"][which].append(seconds)
                    row["cpu_seconds"][which].append(cpu)
                    row["items"] = items
                    results["loads"].append(os.getloadavg()[0])
                    print(f"[bench] {name} · {suite} · {which}: {items / seconds:.2f} items/s, {cpu:.1f} CPU s",
                          file=sys.stderr, flush=True)
                row["differences"].append(differences(records["before"], records["after"]))
                save()


def render(results: dict) -> str:
    """The results table: median items/s per path, the speed-up, whether results matched."""
    lines = ["# `merge-lab compare`: items per second before and after (issue 13 part 9)", "",
             f"Command: `{results['command']}`  ",
             f"Date: {results['started']}; {results['minutes']:.1f} min in all.  ",
             f"Machine: {results['machine']}, {results['settings']['threads']} torch threads.  ",
             load_line(results["loads"], "after each measurement"), "",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items()) + ".  ",
             "before: every row runs whole, stopped rows are fed pads to the end of decoding, a token ensemble "
             "runs its members on every item; after: a batch's shared prefix runs once and its KV cache is repeated "
             "over the batch, stopped rows leave the batch, a token ensemble scores from what its members' own "
             "scoring (done first, as in a comparison, untimed) kept. results: records that are not bit-identical "
             "between the two paths (a largest score difference under 1e-5 is float rounding). "
             "items/s: median over repetitions of the suite's items over the wall seconds its evaluation took; "
             "CPU s: this process's CPU seconds for it (less sensitive than wall time to other work on shared cores).", "",
             "| candidate | suite | kind | items | before, items/s | after, items/s | speed-up | before, CPU s | "
             "after, CPU s | CPU saved | results |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["rows"].values():
        rate = {p: [row["items"] / s for s in row["seconds"][p]] for p in PATHS}
        if not rate["before"] or not rate["after"]:
            continue
        before, after = statistics.median(rate["before"]), statistics.median(rate["after"])
        cpu = {p: statistics.median(row["cpu_seconds"][p]) for p in PATHS}
        worst = max(row["differences"], key=lambda d: (d["records_differing"], d["largest_score_difference"]))
        same = ("identical" if worst["records_differing"] == 0 else
                f"{worst['records_differing']} of {row['items']} records differ (largest score difference "
                f"{worst['largest_score_difference']:.2g})")
        lines.append(f"| {row['candidate']} | {row['suite']} | {row['kind']} | {row['items']} | {before:.2f} | "
                     f"{after:.2f} | {after / before:.2f}x | {cpu['before']:.1f} | {cpu['after']:.1f} | "
                     f"{1 - cpu['after'] / cpu['before']:.0%} | {same} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="the dense candidate and the experts' base (default: the demo's "
                    "SmolLM2-135M-Instruct, converted into $MERGE_LAB_CACHE, default .cache/merge_lab, on first use)")
    ap.add_argument("--score-suite", default="honest_truthfulqa")
    ap.add_argument("--generate-suite", default="harmless_refusal")
    ap.add_argument("--limit", type=int, default=24, help="items of the scoring suite")
    ap.add_argument("--gen-limit", type=int, default=16, help="prompts of the generation suite")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8, help="scoring batch (the demo's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("benchmarks/work/compare_speed"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/COMPARE_RESULTS.md"))
    args = ap.parse_args(argv)
    if args.model is None:
        from merge_lab.core.bases import smollm2_base

        args.model = smollm2_base()
    started = time.time()
    results = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": "python -m benchmarks.compare_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
               "settings": {k: getattr(args, k) for k in ("limit", "gen_limit", "max_new_tokens", "max_length", "batch_size",
                                                          "threads", "reps")},
               "rows": {}, "loads": [], "minutes": 0.0}
    experts, moe = build(args.model, args.work / "inputs")
    models = {f"{args.model.name} (dense)": [args.model], "H3 MoE (top-2 of 3 FFN experts)": [moe],
              "token ensemble of the 3 experts": experts}

    def save() -> None:
        results["minutes"] = (time.time() - started) / 60
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "compare_speed.json").write_text(json.dumps(results, indent=1))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(results))

    measure(models, args, results, save)
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
