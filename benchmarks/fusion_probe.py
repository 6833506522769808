"""One measurement of the fusion benchmark, run as its own process (under benchmarks.measure, so
its peak RSS is its own). Writes its figures as JSON to RESULT.

    python -m benchmarks.fusion_probe train RESULT SPEC.json     # router training throughput
    python -m benchmarks.fusion_probe infer RESULT SPEC.json     # scoring + generation throughput

Training runs `merge_lab.moe.train.train` unchanged; the only addition is a timestamp taken
each time it collates a step's batch (at the start of every step), which splits the run into
setup (model load, tokenising, optimizer) and steps, and counts each step's real (non-pad) tokens.
Inference runs the comparison's own candidates (ModelCandidate, TokenEnsemble) and reads their
Counters: the same code paths, batching and token counts as `merge-lab compare`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def train_probe(spec: dict) -> dict:
    from merge_lab.moe import train as fusion_train
    from merge_lab.moe.train_config import TrainConfig

    stamps: list[tuple[float, int, int]] = []  # (time at the start of a step, real tokens, padded tokens)
    collate = fusion_train.collate

    def timed_collate(batch, pad_id):
        out = collate(batch, pad_id)
        stamps.append((time.perf_counter(), int(out["attention_mask"].sum()), out["input_ids"].numel()))
        return out

    fusion_train.collate = timed_collate
    cfg = TrainConfig.model_validate(spec["train"])
    start = time.perf_counter()
    result = fusion_train.train(spec["moe"], cfg, Path(spec["state"]), progress=False)
    end = time.perf_counter()
    # step i runs from stamps[i] to stamps[i + 1]; the first step (warm-up) and the last (it also
    # merges LoRA into the experts) are left out of the throughput
    timed = stamps[1:-1] if len(stamps) > 2 else stamps[:-1]
    seconds = stamps[-1][0] - timed[0][0] if timed else end - stamps[0][0]
    timed = timed or stamps
    return {
        "setup_s": stamps[0][0] - start,
        "steps": result.steps_done,
        "timed_steps": len(timed),
        "step_s": seconds / len(timed),
        "tokens": sum(t for _, t, _ in timed),
        "padded_tokens": sum(p for _, _, p in timed),
        "tokens_per_s": sum(t for _, t, _ in timed) / seconds,
        "loss_last": result.history[-1]["loss"] if result.history else None,
    }


def _candidate(spec: dict):
    from merge_lab.evaluation.candidates import ModelCandidate, TokenEnsemble
    from merge_lab.evaluation.spec import Settings

    settings = Settings(**spec["settings"])
    paths = spec["paths"]
    if spec["kind"] == "ensemble":
        members = [ModelCandidate(Path(p).name, p, settings) for p in paths]
        return TokenEnsemble("ensemble", members, None, settings)
    return ModelCandidate(spec["kind"], paths[0], settings)


def infer_probe(spec: dict) -> dict:
    from merge_lab.evaluation.cost import Counters, PeakMemory

    cand = _candidate(spec)
    with PeakMemory() as mem:
        start = time.perf_counter()
        cand.load()
        load_s = time.perf_counter() - start
        total, active = cand.params()
        # warm-up on rows of its own (a candidate may remember what it scored), not counted
        cand.loglikelihood([(cand.format_prompt(prompt), response) for prompt, response in spec["warmup"]])
        cand.counters = Counters()
        cand.loglikelihood([(cand.format_prompt(prompt), response) for prompt, response in spec["rows"]])
        cand.generate(spec["prompts"])
    c = cand.counters
    members = len(cand.model_paths())
    return {
        "load_s": load_s,
        "params_total": total,
        "params_active": active,
        "members": members,
        # Counters count each member's tokens (work done); per second of input scored is what a user waits on
        "score_tokens": c.score_tokens // members,
        "score_s": c.score_seconds,
        "score_tokens_per_s": c.score_tokens / members / c.score_seconds,
        "gen_tokens": c.gen_tokens,
        "gen_s": c.gen_seconds,
        "gen_tokens_per_s": c.gen_tokens / c.gen_seconds if c.gen_seconds > 0 else 0.0,
        "rise_mb": mem.peak_bytes / 2**20,
    }


def main(argv: list[str]) -> None:
    what, result, spec_path = argv[:3]
    spec = json.loads(Path(spec_path).read_text())
    # imported before any clock starts: import time is not load time
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    figures = train_probe(spec) if what == "train" else infer_probe(spec)
    figures["threads"] = torch.get_num_threads()
    Path(result).write_text(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
