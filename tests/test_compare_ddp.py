"""`merge-lab compare` over several processes (`accelerate launch`): each process scores and
generates its share of every suite's batches, the main process alone writes the cache and the
report, and results.json is a one-process run's apart from timings."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.compare import run_compare
from merge_lab.evaluation.processes import Processes, map_batches, share, sharing
from merge_lab.testing import make_checkpoint
from merge_lab.testing.launch import accelerate_command, cpu_env
from merge_lab.testing.toy import make_bigram_checkpoint

# what differs between two runs of the same comparison, however many processes ran it
TIMINGS = {"seconds", "score_seconds", "gen_seconds", "peak_memory_bytes", "score_tokens_per_s", "gen_tokens_per_s"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    """A compare file over every kind of work: generation (refusal, win rate under a judge against a
    reference), scoring (likelihood, multiple choice), best-of-N (its judge is called inside its
    batches), an inline recipe merged into the cache, `choose:` on a random tiny model; batches of 2,
    so both processes work."""
    root = tmp_path_factory.mktemp("compare_ddp")
    make_bigram_checkpoint(root / "refuse", "I won't")
    make_bigram_checkpoint(root / "comply", "Sure")
    make_checkpoint(root / "rand", "llama", seed=3, shards=False)
    write_jsonl(root / "like.jsonl", [{"prompt": f"Help me with task {i}", "response": "Sure" + "!" * i} for i in range(7)])
    write_jsonl(root / "mc.jsonl", [{"prompt": f"Pick {i}" + "?" * i, "choices": ["Sure", "I won't", "Maybe"],
                                     "label": i % 3} for i in range(6)])
    avg = {"merge_method": "linear", "models": [{"model": str(root / "refuse"), "parameters": {"weight": 0.5}},
                                                {"model": str(root / "comply"), "parameters": {"weight": 0.5}}]}
    spec = {
        "settings": {"limit": 5, "max_new_tokens": 6, "batch_size": 2, "generate_batch_size": 2, "bootstrap": 200},
        "selection": {"limit": 3},
        "suites": ["harmless_refusal", "helpful_winrate",
                   {"name": "like", "path": "like.jsonl", "kind": "likelihood", "objective": "helpful"},
                   {"name": "mc", "path": "mc.jsonl", "kind": "multiple_choice"}],
        "judge": "comply", "reference": "refuse",
        "candidates": [
            {"name": "refuse", "checkpoint": "refuse", "source": True},
            {"name": "comply", "checkpoint": "comply", "source": True},
            {"name": "rand", "checkpoint": "rand", "choose": {"rms_norm_eps": [1e-6, 0.5]}},
            {"name": "bon", "best_of_n": ["refuse", "rand"]},
            {"name": "avg", "recipe": avg},
        ],
    }
    path = root / "compare.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def without_timings(x):
    """`x` with every timing field (and the process count) dropped, recursively."""
    if isinstance(x, dict):
        return {k: without_timings(v) for k, v in x.items() if k not in TIMINGS | {"processes"}}
    if isinstance(x, list):
        return [without_timings(v) for v in x]
    return x


def test_shares_are_disjoint_and_cover_the_batches():
    batches = [[4, 0], [1, 5], [2, 3], [6]]
    for world in (1, 2, 3, 5):
        shares = [share(batches, rank, world) for rank in range(world)]
        assert sorted(b for s in shares for b in s) == sorted(batches)
        assert all(len(s) in (len(batches) // world, -(-len(batches) // world)) for s in shares)
    assert share(batches, 1, 2) == [[1, 5], [6]]  # strided: the long batches (first) spread over the processes
    assert map_batches(batches, lambda b: [i * 10 for i in b]) == {i: i * 10 for i in range(7)}  # one process: all


class SecondOfTwo(Processes):
    """Process 1 of 2, in this process: what process 0 would send is computed here too."""

    def __init__(self, batches, compute):
        super().__init__(rank=1, world=2)
        self.batches, self.compute = batches, compute

    def all_gather(self, obj):
        first = {i: r for b in share(self.batches, 0, 2) for i, r in zip(b, self.compute(b))}
        return [first, obj]


def test_a_process_computes_its_share_and_a_nested_call_whole():
    batches, outer_batches, inner = [[0, 1], [2, 3], [4]], [], []

    def judge(b):
        inner.append(b)
        return list(b)

    def compute(b):
        outer_batches.append(b)
        nested = map_batches([[10, 11], [12]], judge)  # e.g. best-of-N's judge inside its batch: not split
        assert nested == {10: 10, 11: 11, 12: 12}
        return [i * 10 for i in b]

    procs = SecondOfTwo(batches, lambda b: [i * 10 for i in b])
    with sharing(procs):
        merged = map_batches(batches, compute)
    assert outer_batches == [[2, 3]] and inner == [[10, 11], [12]]  # its share only; the nested call whole
    assert merged == {i: i * 10 for i in range(5)} and procs.calls == 1
    assert map_batches(batches, lambda b: b) == {i: i for i in range(5)}  # outside `sharing`: one process


def test_two_processes_give_one_process_results_and_one_report(spec_file, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process: the same arithmetic, to the bit
    try:
        one = run_compare(spec_file, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(before)
    assert one.processes == 1 and one.main

    rows = tmp_path / "rows.jsonl"
    work = tmp_path / "launch"
    work.mkdir()
    cmd = accelerate_command(2, "-m", "merge_lab", "compare", str(spec_file), "-o", str(work / "two"), "--no-progress")
    env = cpu_env(tmp_path, threads=1, MERGE_LAB_RECORD_ROWS=str(rows))
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    # one report, written once by the main process, which alone printed the summary
    assert [p.name for p in work.iterdir()] == ["two"]
    assert res.stdout.count("comparison") == 1 and "processes: 2" in res.stdout
    # the cache, and so a merged recipe's or a variant's folder, lies in each run's output folder
    two = json.loads((work / "two" / "results.json").read_text().replace(str(work / "two"), "OUT"))
    assert two["processes"] == 2 and one.results["processes"] == 1
    assert "Evaluated by 2 processes" in (work / "two" / "report.md").read_text()

    # the same results.json apart from timings: every per-example score, verdict, choice and token count
    assert two["selection"]["rand"]["chosen"] == one.results["selection"]["rand"]["chosen"]
    one_json = json.loads((tmp_path / "one" / "results.json").read_text().replace(str(tmp_path / "one"), "OUT"))
    assert without_timings(two) == without_timings(one_json)

    # each process scored and generated its own share of every call, together all of it
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    steps = sorted({r["step"] for r in records})
    assert steps and sorted((r["step"], r["rank"]) for r in records) == [(s, k) for s in steps for k in (0, 1)]
    both = 0
    for step in steps:
        shares = {r["rank"]: set(r["rows"]) for r in records if r["step"] == step}
        a, b = shares[0], shares[1]
        assert not a & b and sorted(a | b) == list(range(len(a | b)))
        both += bool(a) and bool(b)
    assert both >= len(steps) // 2  # most calls had work for both processes


# `merge-lab compare` under launch, each process writing down which exchanges it scored with the
# reward model, call by call (the processes make the same calls in the same order)
REWARD_SCRIPT = """import json
import os
import sys

from merge_lab.cli import app
from merge_lab.evaluation import scorers

spec, out, said = sys.argv[1:]
shared, calls = scorers.map_batches, [0]


def recorded(batches, compute):
    calls[0] += 1

    def scored(idx):
        with open(f"{said}.{os.environ['RANK']}", "a") as f:
            f.write(json.dumps({"call": calls[0], "items": idx}) + "\\n")
        return compute(idx)

    return shared(batches, scored)


scorers.map_batches = recorded
app(["compare", spec, "-o", out, "--no-progress"], standalone_mode=False)
"""


def test_two_processes_share_the_reward_models_scoring(tmp_path):
    """A reward model as the win rate's judge: each process scores its own batches of every call,
    together all of them, and results.json is the one-process run's."""
    from merge_lab.testing.toy import make_reward_checkpoint

    make_bigram_checkpoint(tmp_path / "refuse", "I won't")
    make_bigram_checkpoint(tmp_path / "comply", "Sure")
    make_reward_checkpoint(tmp_path / "rm", likes="t", dislikes="e")  # prefers "I won't"
    spec = {"settings": {"limit": 4, "max_new_tokens": 6, "batch_size": 2, "generate_batch_size": 2, "bootstrap": 100},
            "suites": ["helpful_winrate"], "reference": "comply", "judge": {"reward_model": str(tmp_path / "rm")},
            "candidates": [{"name": "refuse", "checkpoint": str(tmp_path / "refuse"), "source": True},
                           {"name": "comply", "checkpoint": str(tmp_path / "comply"), "source": True}]}
    spec_file = tmp_path / "compare.yaml"
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_compare(spec_file, tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(before)
    assert one.results["results"]["helpful_winrate"]["refuse"]["value"] == 1.0  # the judge judged

    script, said = tmp_path / "launched.py", tmp_path / "said"
    script.write_text(REWARD_SCRIPT)
    cmd = accelerate_command(2, str(script), str(spec_file), str(tmp_path / "two"), str(said))
    res = subprocess.run(cmd, cwd=tmp_path, env=cpu_env(tmp_path, threads=1), capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    scored = {rank: [json.loads(line) for line in Path(f"{said}.{rank}").read_text().splitlines()] for rank in (0, 1)}
    calls = sorted({r["call"] for rank in (0, 1) for r in scored[rank]})
    assert len(calls) >= 2  # the candidate's answers and the reference's, at least
    for call in calls:
        mine = [[i for r in scored[rank] if r["call"] == call for i in r["items"]] for rank in (0, 1)]
        assert mine[0] and mine[1] and not set(mine[0]) & set(mine[1]), (call, mine)
        assert sorted(mine[0] + mine[1]) == list(range(len(mine[0]) + len(mine[1])))

    two = json.loads((tmp_path / "two" / "results.json").read_text().replace(str(tmp_path / "two"), "OUT"))
    one_json = json.loads((tmp_path / "one" / "results.json").read_text().replace(str(tmp_path / "one"), "OUT"))
    assert two["processes"] == 2 and without_timings(two) == without_timings(one_json)


def test_a_cpu_launch_that_started_one_process_is_refused_before_work(spec_file, tmp_path, monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process: refused, not run alone."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MergeLabError, match=r"started a single process.*--multi_gpu --num_processes N"):
        run_compare(spec_file, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
