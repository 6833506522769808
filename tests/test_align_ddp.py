"""Align over several processes (`accelerate launch`): each process trains on its own share of
every global batch, and N processes end with the expert one process trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merge_lab.testing import load_tensors, make_checkpoint, write_recipe
from merge_lab.testing.launch import cpu_env, free_port
from merge_lab.training.align import align, batch_tensors, encode, load_align_recipe, lora_model, reply_loss
from merge_lab.training.shards import ReplyLoss, share_of_mean

PAIRS = [("Say hi", "hi"), ("Say no", "no"), ("Count to 3", "1 2 3"), ("Spell cat", "c a t"),
         ("Name a color", "blue, or maybe a deep green"), ("Greet me", "hello there, friend"),
         ("Count down", "5 4 3 2 1 0"), ("Say yes", "yes")]
TRAIN = {"steps": 3, "batch_size": 4, "lr": 0.05, "seed": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, base, recipe dict) for a tiny llama and 8 rows of different reply lengths."""
    root = tmp_path_factory.mktemp("align_ddp")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    recipe = {"base_model": str(base), "label": "helpful", "data": [{"jsonl": str(rows)}],
              "lora": {"r": 4, "alpha": 8}, "train": TRAIN}
    return root, base, recipe


def test_two_weighted_shares_give_the_one_process_gradient(tiny):
    """Two halves of a batch with different reply-token counts, each weighted by `share_of_mean`
    and averaged as DDP does: the gradient of the whole batch's mean reply loss."""
    from transformers import AutoTokenizer

    root, base, doc = tiny
    recipe = load_align_recipe(write_recipe(root / "grad.yaml", doc))
    tok = AutoTokenizer.from_pretrained(str(base))
    encoded = [encode(tok, row, 64) for row in recipe.rows()[3:7]]
    torch.manual_seed(0)
    model = lora_model(recipe, base, torch.device("cpu"))
    for name, p in model.named_parameters():  # B starts at zero: give A a gradient too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(reply_loss(model, batch_tensors(encoded, tok.pad_token_id)), params)

    halves = [batch_tensors(encoded[:2], tok.pad_token_id), batch_tensors(encoded[2:], tok.pad_token_id)]
    outs = [ReplyLoss(model)(**h) for h in halves]
    assert outs[0][1] != outs[1][1], "the halves must hold different token counts"
    total = sum(count for _, count in outs)
    averaged = [torch.zeros_like(p) for p in params]
    for loss_sum, _ in outs:
        for acc, g in zip(averaged, torch.autograd.grad(share_of_mean(loss_sum, total, 2), params)):
            acc += g / 2
    for e, a in zip(expected, averaged):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


# A user's accelerate FSDP config (`accelerate config` writes one like it). On CPU processes accelerate
# runs it as DDP (it shards over GPUs and alike only); sync_module_states needs such a device.
FSDP_CONFIG = {
    "compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_processes": 2, "num_machines": 1,
    "machine_rank": 0, "mixed_precision": "no", "use_cpu": False, "rdzv_backend": "static", "same_network": True,
    "fsdp_config": {"fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD", "fsdp_use_orig_params": True,
                    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                    "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
                    "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_sync_module_states": False,
                    "fsdp_cpu_ram_efficient_loading": False},
}

# Under one launch (each costs tens of seconds of start-up): an uneven split refused, the CLI (DDP,
# as accelerate runs the FSDP config on CPU), then align with the weights really sharded (FSDP2):
# accelerate would not shard on CPU processes, so the test switches its state to FSDP once made.
SCRIPT = """import os
import sys

from merge_lab.cli import app
from merge_lab.errors import MergeLabError
from merge_lab.testing.launch import shard_on_cpu
from merge_lab.training.align import align

uneven, recipe, out, sharded_out, said = sys.argv[1:]


def say(line):  # one file per process: lines two processes print at once can interleave
    with open(f"{said}.{os.environ['RANK']}", "a") as f:
        f.write(line + "\\n")


try:
    align(uneven, out, progress=False)
except MergeLabError as e:
    say(f"refused: {e}")
else:
    raise SystemExit("a batch the processes cannot split evenly was not refused")
app(["align", recipe, "-o", out, "--no-progress"], standalone_mode=False)


shard_on_cpu("LlamaDecoderLayer", say)
del os.environ["MERGE_LAB_RECORD_ROWS"]
align(recipe, sharded_out, progress=False)
"""


def _launch(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file` an FSDP config with 2 CPU processes (torchrun; gloo)."""
    config = write_recipe(cwd / "fsdp.yaml", FSDP_CONFIG)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "--main_process_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=cpu_env(cwd, **(env or {})), capture_output=True, text=True, timeout=600)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_share_batches_and_train_the_one_process_expert(tiny, tmp_path, monkeypatch):
    _, _, doc = tiny
    recipe = write_recipe(tmp_path / "align.yaml", doc)
    uneven = write_recipe(tmp_path / "uneven.yaml", {**doc, "train": {**TRAIN, "batch_size": 3}})
    script, rows = tmp_path / "launched.py", tmp_path / "rows.jsonl"
    script.write_text(SCRIPT)
    said = tmp_path / "said"
    said.mkdir()
    res = _launch(tmp_path, str(script), str(uneven), str(recipe), "two", "sharded", str(said / "rank"),
                  env={"MERGE_LAB_RECORD_ROWS": str(rows)})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    two = tmp_path / "two"

    # both processes refused the batch of 3 before loading the model, naming the recipe's line
    lines = {rank: (said / f"rank.{rank}").read_text().splitlines() for rank in (0, 1)}
    refusals = [line for rank in (0, 1) for line in lines[rank] if line.startswith("refused: ")]
    assert len(refusals) == 2 and all("uneven.yaml, line" in r for r in refusals), lines
    assert "(train.batch_size): batch size 3 is the global batch" in refusals[0] and "(e.g. 2 or 4)" in refusals[0]

    # one output, written once, and the summary, the card and the log say how the batch was split
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != "hf")
    assert names == ["align.yaml", "fsdp.yaml", "launched.py", "rows.jsonl", "said", "sharded", "two", "uneven.yaml"]
    assert res.stdout.count("align complete") == 1 and "2 processes, 2 rows each" in res.stdout
    assert "note: the FSDP config ran as DDP (MULTI_CPU)" in res.stderr
    assert all(lines[rank][1:] == ["prepared FSDPReplyLoss under FSDP"] for rank in (0, 1)), lines
    assert "4 rows per step, 2 processes, 2 rows each" in (two / "README.md").read_text()
    log = json.loads((two / "align_log.json").read_text())
    assert log["processes"] == 2 and log["per_process_batch"] == 2

    # one process on the same recipe: its global batches, and its expert
    one_rows = tmp_path / "one_rows.jsonl"
    monkeypatch.setenv("MERGE_LAB_RECORD_ROWS", str(one_rows))
    one = align(recipe, tmp_path / "one", progress=False)
    assert (one.processes, one.per_process_batch, one.main) == (1, 4, True)

    # each process took its own rows of each global batch, together the whole batch
    records, whole = _records(rows), {r["step"]: r["rows"] for r in _records(one_rows)}
    assert sorted((r["step"], r["rank"], r["world"]) for r in records) == [(s, k, 2) for s in range(3) for k in (0, 1)]
    for step in range(3):
        share = {r["rank"]: r["rows"] for r in records if r["step"] == step}
        assert len(share[0]) == len(share[1]) == 2 and not set(share[0]) & set(share[1])
        assert share[0] + share[1] == whole[step]
    assert json.loads((two / "train_items.json").read_text()) == json.loads((one.path / "train_items.json").read_text())

    # the same expert, within float rounding: the adapter and the merged checkpoint
    a, b = load_tensors(one.adapter), load_tensors(two / "adapter")
    assert set(a) == set(b) and any(bool(t.abs().max() > 1e-3) for n, t in b.items() if "lora_B" in n)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    a, b, c = load_tensors(one.merged), load_tensors(two / "merged"), load_tensors(tmp_path / "sharded" / "merged")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(c[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    # FSDP: the weights gathered from the shards (accelerator.get_state_dict) give the same expert
    a, c = load_tensors(one.adapter), load_tensors(tmp_path / "sharded" / "adapter")
    for name in a:
        torch.testing.assert_close(c[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert log["losses"] == pytest.approx(json.loads((one.path / "align_log.json").read_text())["losses"], abs=1e-4)



def test_a_cpu_fsdp_run_says_it_ran_as_ddp(monkeypatch):
    """What accelerate's state says decides (here a namespace with its fields): an FSDP config
    on CPU processes runs as DDP, noted; a really sharded run needs no note."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from merge_lab.training.shards import unsharded_note

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert unsharded_note(ddp) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert unsharded_note(ddp).startswith("the FSDP config ran as DDP (MULTI_CPU)")
    assert unsharded_note(SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2)) is None
