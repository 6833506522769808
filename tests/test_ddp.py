"""Fusion training over several processes (`accelerate launch`): each process trains on its own
share of every global batch, and N processes end with the weights one process reaches."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from merge_lab.core.distributed import batch_indices, global_batch, launched, per_process_batch
from merge_lab.errors import MergeLabError
from merge_lab.merge.engine import merge
from merge_lab.moe import losses
from merge_lab.moe.data import collate
from merge_lab.moe.pipeline import fuse, work_dir
from merge_lab.moe.routing import capture_router_logits
from merge_lab.moe.train import setup, shard_counts, shard_losses
from merge_lab.moe.train_config import TrainConfig
from merge_lab.testing import load_tensors, make_checkpoint, write_recipe
from merge_lab.testing.launch import accelerate_command, cpu_env
from merge_lab.testing.moe import ffn_expert, labelled_jsonl

LABELS = ["helpful", "harmless"]
# every loss term on, 3 rows per process: the ranks hold different token counts
TRAIN = {"steps": 4, "batch_size": 6, "lr": 1e-2, "trainable": "router+lora", "lambda": 0.5, "gamma": 0.1,
         "load_balance": 0.01, "seed": 3, "eval_rows": 8, "cpu": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, recipe dict, assembled MoE, data) on a tiny llama with two FFN experts."""
    root = tmp_path_factory.mktemp("ddp")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    models = [{"model": str(ffn_expert(base, root / lab, seed=i + 1, noise=0.1)), "label": lab}
              for i, lab in enumerate(LABELS)]
    data = labelled_jsonl(root / "data.jsonl", LABELS, per_label=8)
    recipe = {"merge_method": "h3_moe", "base_model": str(base), "models": models}
    moe = merge(write_recipe(root / "assemble.yaml", recipe), root / "moe", progress=False, hash_inputs=False).path
    return root, recipe, moe, data


# ------------------------------------------------------------------ in one process: shares and loss weights


def test_process_shares_are_disjoint_and_cover_each_global_batch():
    for world in (1, 2, 3, 6):
        for step in range(7):  # 16 rows, 6 a step: batches cross epochs
            shares = [batch_indices(step, 16, 6, 3, rank, world) for rank in range(world)]
            assert sum(shares, []) == global_batch(step, 16, 6, 3)
            assert all(len(s) == 6 // world for s in shares)
    assert batch_indices(2, 16, 6, 3) == global_batch(2, 16, 6, 3)
    with pytest.raises(MergeLabError, match=r"train.batch_size: batch size 6 .* 4 processes .* \(e.g. 4 or 8\)"):
        per_process_batch(6, 4)


def _grads(run, params, idx_per_rank: list[list[int]], world: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Gradients DDP would average for these ranks' shares (simulated in one process), and the total loss."""
    cfg, outs = run.cfg, []
    for idx in idx_per_rank:
        b = collate([run.encoded[i] for i in idx], run.pad_id)
        with capture_router_logits(run.inner) as captured:
            logits = run.inner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        outs.append((b, list(captured), logits))
    totals = sum(shard_counts(b["labels"], b["attention_mask"], c, run.top_k, True) for b, c, _ in outs)
    grads = [torch.zeros_like(p) for p in params]
    total = torch.zeros(())
    for b, captured, logits in outs:
        terms = shard_losses(logits, b, captured, b["attention_mask"], run.top_k, True, totals, cfg.batch_size, world)
        loss = terms["lm"] + cfg.gating_weight * terms["gate"] + cfg.load_balance * terms["balance"]
        for g, p in zip(grads, torch.autograd.grad(loss, params)):
            g += p / world  # DDP averages
        total += loss.detach() / world
    return grads, total


def test_two_ranks_weighted_losses_give_the_one_process_gradient(tiny):
    """Rank 0 and rank 1, each on its own 3 rows with different token counts, combined as DDP does:
    the same gradient, and the same loss, as one process on all 6 rows with the plain objective."""
    _, _, moe, data = tiny
    run = setup(moe, TrainConfig(data=str(data), **TRAIN))
    params = [p for p in run.inner.parameters() if p.requires_grad]
    idx = global_batch(1, len(run.encoded), 6, 3)
    halves = [batch_indices(1, len(run.encoded), 6, 3, rank, 2) for rank in (0, 1)]
    tokens = [sum(sum(run.encoded[i].loss_mask) for i in h) for h in halves]
    assert tokens[0] != tokens[1], tokens  # a mean per rank would weigh their tokens differently

    b = collate([run.encoded[i] for i in idx], run.pad_id)
    with capture_router_logits(run.inner) as captured:
        logits = run.inner(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    plain = (losses.lm_loss(logits, b["labels"])
             + run.cfg.gating_weight * losses.gating_loss(losses.mean_routing_probs(captured, b["attention_mask"]),
                                                          b["expert"])
             + run.cfg.load_balance * losses.load_balance_loss(captured, b["attention_mask"], run.top_k))
    expected = torch.autograd.grad(plain, params)

    one, one_loss = _grads(run, params, [idx], 1)
    two, two_loss = _grads(run, params, halves, 2)
    torch.testing.assert_close(one_loss, plain.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(two_loss, plain.detach(), rtol=1e-6, atol=1e-6)
    for e, a, c in zip(expected, one, two):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-7)


def test_a_state_resumes_only_with_the_number_of_processes_that_saved_it(tmp_path):
    from merge_lab.moe import state

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    state.save_state(tmp_path, model, opt, 1, [{"loss": 1.0}], "owner", processes=2)
    assert json.loads((tmp_path / state.META).read_text())["processes"] == 2
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(MergeLabError, match=r"trained by 2 process\(es\) and is being resumed with 1.*"
                                            r"--num_processes 2"):
        state.load_state(tmp_path, model, opt, "owner")
    assert not torch.equal(model.weight, before)  # nothing restored
    assert state.load_state(tmp_path, model, opt, "owner", processes=2).step == 1


def test_accelerate_cpu_launch_that_started_one_process_is_refused(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process (CPU processes need mpirun):
    refused with the commands that do start two, rather than a silent one-process run."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(MergeLabError, match=r"started a single process.*--multi_gpu --num_processes N"):
        launched(True)


# ------------------------------------------------------------------ two real processes (accelerate launch, gloo)


def _launch(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 CPU processes (torchrun under --multi_gpu; gloo, as there are no GPUs)."""
    res = subprocess.run(accelerate_command(2, *args), cwd=tmp_path, env=cpu_env(tmp_path, **(env or {})),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


STOP = """import sys
from merge_lab.moe.pipeline import fuse
result = fuse(sys.argv[1], sys.argv[2], progress=False, stop_after=int(sys.argv[3]))
assert result.path is None and result.processes == 2
"""


def test_two_processes_share_batches_and_match_one_process(tiny, tmp_path):
    root, recipe, _, data = tiny
    path = write_recipe(tmp_path / "fuse.yaml", {**recipe, "train": {"data": str(data), **TRAIN}})
    rows = tmp_path / "rows.jsonl"
    res = _launch(tmp_path, "-m", "merge_lab", "fuse", str(path), "-o", "two", "--no-progress",
                  env={"MERGE_LAB_RECORD_ROWS": str(rows)})
    two = tmp_path / "two"

    # (a) each process took its own rows of each global batch, together the whole batch
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert sorted((r["step"], r["rank"]) for r in records) == [(s, r) for s in range(4) for r in (0, 1)]
    n = len(data.read_text().splitlines())
    for step in range(4):
        share = {r["rank"]: r["rows"] for r in records if r["step"] == step}
        assert not set(share[0]) & set(share[1]) and len(share[0]) == len(share[1]) == 3
        assert share[0] + share[1] == global_batch(step, n, 6, 3)

    # (c) one output, written once; no work folder; the summary and card say how it was split
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == ["fuse.yaml", "rows.jsonl", "two"]
    assert res.stdout.count("fuse complete") == 1 and "2 processes, 3 rows each" in res.stdout
    assert "2 processes, 3 rows each" in (two / "README.md").read_text()

    # (b) the same weights as one process on the same global batches
    one = fuse(path, tmp_path / "one", progress=False)
    assert one.processes == 1 and one.per_process_batch == 6
    a, b = load_tensors(one.path), load_tensors(two)
    assert set(a) == set(b)
    trained = load_tensors(tiny[2])
    assert any(not torch.equal(b[k], trained[k]) for k in b)  # the routers did train
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6, msg=name)

    # (d) stopped after 2 steps by 2 processes: refused with 1, resumed with 2 to the same weights
    script = tmp_path / "stop.py"
    script.write_text(STOP)
    _launch(tmp_path, str(script), str(path), "resumed", "2")
    meta = json.loads((work_dir(tmp_path / "resumed") / "state" / "state.json").read_text())
    assert meta["step"] == 2 and meta["processes"] == 2
    with pytest.raises(MergeLabError, match=r"trained by 2 process\(es\) and is being resumed with 1"):
        fuse(path, tmp_path / "resumed", progress=False, resume=True)
    _launch(tmp_path, "-m", "merge_lab", "fuse", str(path), "-o", "resumed", "--resume", "--no-progress")
    assert not list(tmp_path.glob(".*fuse-work"))
    c = load_tensors(tmp_path / "resumed")
    for name in b:
        torch.testing.assert_close(c[name], b[name], rtol=0, atol=0, msg=name)
