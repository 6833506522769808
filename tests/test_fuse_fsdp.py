"""`fuse` with the weights sharded over 2 processes (FSDP2 on CPU processes, gloo): the whole-weight
reads (accuracy probe, the drift term and its gradient, export, the resume state) go through the
gathering, the fused model is the one DDP trains, the drift regulariser on, and a run stopped and
resumed under FSDP2 ends where the uninterrupted one does. accelerate runs an FSDP config as DDP on CPU processes, so the test switches
its state to FSDP once made, as tests/test_align_ddp.py does for align."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from merge_lab.errors import MergeLabError
from merge_lab.moe.sharding import refuse_unsupported_sharding
from merge_lab.moe.train_config import TrainConfig
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe
from merge_lab.testing.launch import accelerate_command, cpu_env
from merge_lab.testing.moe import ffn_expert, labelled_jsonl

LABELS = ["helpful", "harmless"]
# the LoRA experts and every loss term (the drift term too: gamma 0.5 moves the weights), 2 rows per process
TRAIN = {"steps": 3, "batch_size": 4, "lr": 1e-2, "trainable": "router+lora", "lambda": 0.5, "gamma": 0.5,
         "load_balance": 0.01, "seed": 3, "eval_rows": 8, "cpu": True}

# Under one launch: fuse under DDP (and with gamma 0, to show the drift term matters; and training the
# experts themselves), then the same recipes with the weights really sharded (FSDP2), then a run
# stopped after 2 steps and resumed there.
SCRIPT = """import json
import os
import sys

from merge_lab.errors import MergeLabError
from pathlib import Path

from merge_lab.moe.pipeline import fuse, work_dir
from merge_lab.testing.launch import shard_on_cpu

recipe, no_drift, full_experts, said = sys.argv[1:]


def say(line):  # one file per process: lines two processes print at once can interleave
    with open(f"{said}.{os.environ['RANK']}", "a") as f:
        f.write(line + "\\n")


def summary(result):
    return json.dumps({"before": result.accuracy_before, "after": result.accuracy_after, "last": result.last_terms})


say(summary(fuse(recipe, "ddp", progress=False)))
fuse(no_drift, "ddp_no_drift", progress=False)
say(summary(fuse(full_experts, "ddp_full_experts", progress=False)))
shard_on_cpu("MixtralDecoderLayer", say)
say(summary(fuse(recipe, "fsdp", progress=False)))
say(summary(fuse(full_experts, "fsdp_full_experts", progress=False)))  # the experts themselves, sharded
stopped = fuse(recipe, "fsdp_resumed", progress=False, stop_after=2)  # a checkpoint gathered from the shards
saved = (work_dir(Path("fsdp_resumed")) / "state" / "state.json").is_file()
say(f"stopped after {stopped.steps_done}, output {stopped.path}, state saved {saved}")
say(summary(fuse(recipe, "fsdp_resumed", progress=False, resume=True)))  # each process given its shards back
"""


def test_fsdp_gathers_the_weights_fuse_reads_whole_and_fuses_the_ddp_model(tmp_path):
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, shards=False)
    models = [{"model": str(ffn_expert(base, tmp_path / lab, seed=i + 1, noise=0.1)), "label": lab}
              for i, lab in enumerate(LABELS)]
    data = labelled_jsonl(tmp_path / "data.jsonl", LABELS, per_label=8)
    recipe = {"merge_method": "h3_moe", "base_model": str(base), "models": models}
    path = write_recipe(tmp_path / "fuse.yaml", {**recipe, "train": {"data": str(data), **TRAIN}})
    no_drift = write_recipe(tmp_path / "no_drift.yaml", {**recipe, "train": {"data": str(data), **TRAIN, "gamma": 0.0}})
    full = write_recipe(tmp_path / "full.yaml", {**recipe, "train": {"data": str(data), **TRAIN, "trainable": "router+experts"}})
    script, said = tmp_path / "launched.py", tmp_path / "said"
    script.write_text(SCRIPT)
    res = subprocess.run(accelerate_command(2, str(script), str(path), str(no_drift), str(full), str(said)), cwd=tmp_path,
                         env=cpu_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]

    lines = {rank: Path(f"{said}.{rank}").read_text().splitlines() for rank in (0, 1)}
    for rank in (0, 1):  # both processes trained sharded, each run
        for i in (2, 4, 6, 8):
            assert lines[rank][i].startswith("prepared FSDP") and lines[rank][i].endswith(" under FSDP"), lines[rank]

    # the main process reported the same accuracies and last step's terms (the drift gathered in autograd)
    ddp, fsdp = json.loads(lines[0][0]), json.loads(lines[0][3])
    assert ddp["before"] == fsdp["before"] and ddp["after"] == fsdp["after"]
    # drift > 0: the LoRA (B starts at zero) trained, so the export below is not the assembly
    assert ddp["last"]["drift"] > 0 and fsdp["last"] == pytest.approx(ddp["last"], rel=1e-4, abs=1e-6)

    # the export: the state gathered from the shards is the model DDP trained, drift gradient included
    a, b = load_tensors(tmp_path / "ddp"), load_tensors(tmp_path / "fsdp")
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)
    plain = load_tensors(tmp_path / "ddp_no_drift")  # without the drift term the weights end elsewhere
    assert max(float((plain[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a) > 1e-3
    assert "2 processes, 2 rows each" in (tmp_path / "fsdp" / "README.md").read_text()

    # router+experts: the experts' drift from each process's own shards, the DDP model again
    ddp_full, fsdp_full = json.loads(lines[0][1]), json.loads(lines[0][5])
    assert ddp_full["last"]["drift"] > 0 and fsdp_full["last"] == pytest.approx(ddp_full["last"], rel=1e-4, abs=1e-6)
    a_full, b_full = load_tensors(tmp_path / "ddp_full_experts"), load_tensors(tmp_path / "fsdp_full_experts")
    assert set(a_full) == set(b_full)
    for name in a_full:
        torch.testing.assert_close(b_full[name], a_full[name], rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(a_full[n], a[n]) for n in a if ".experts." in n)  # the experts trained otherwise

    # stopped after 2 of 3 steps under FSDP2 and resumed there: the weights of the uninterrupted run
    for rank in (0, 1):
        assert lines[rank][7] == "stopped after 2, output None, state saved True"
    resumed = json.loads(lines[0][9])
    assert resumed["last"] == pytest.approx(fsdp["last"], rel=1e-5, abs=1e-7)
    c = load_tensors(tmp_path / "fsdp_resumed")
    assert set(c) == set(b)
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=1e-5, atol=1e-7, msg=name)


def test_what_fuse_cannot_do_sharded_is_refused_with_what_to_use():
    """Refused under FSDP1: full experts, the drift term, resume state; DeepSpeed (unchecked) always."""
    from accelerate.utils import DistributedType

    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    ok = TrainConfig(data=[], trainable="router+lora")
    refuse_unsupported_sharding(fsdp, ok)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP,
                            state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    refuse_unsupported_sharding(fsdp2, TrainConfig(data=[], trainable="router+lora", gamma=0.5), resume=True,
                                checkpoints=True)  # FSDP2 gathers the resume state from its shards
    refuse_unsupported_sharding(fsdp2, TrainConfig(data=[], trainable="router+experts", gamma=0.5))  # shard-local drift
    refuse_unsupported_sharding(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU),
                                TrainConfig(data=[], trainable="router+experts", gamma=1.0), resume=True)
    cases = [(TrainConfig(data=[], trainable="router+experts"), {}, "router\\+experts"),
             (TrainConfig(data=[], gamma={"helpful": 0.0, "harmless": 0.5}), {}, r"drift term \(gamma > 0\)"),
             (ok, {"resume": True}, "resume state"), (ok, {"checkpoints": True}, "checkpoint_every")]
    for cfg, kwargs, what in cases:
        with pytest.raises(MergeLabError, match=rf"under FSDP.*{what}|{what}.*under FSDP") as e:
            refuse_unsupported_sharding(fsdp, cfg, **kwargs)
        assert "--multi_gpu" in str(e.value)
    with pytest.raises(MergeLabError, match="not installed where merge_lab is tested"):
        refuse_unsupported_sharding(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED), ok)
