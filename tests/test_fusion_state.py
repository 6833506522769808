"""The resume state of fusion training: safetensors + JSON, never pickle, loaded strictly.

A planted pickle in the work folder must never run; a corrupted, partial or foreign state is a
clear error (exit 2 through the CLI, nothing at the output path), never a traceback.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil

import pytest
import torch
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.errors import MergeLabError
from merge_lab.moe import state
from merge_lab.moe.pipeline import fuse, work_dir
from merge_lab.testing import make_checkpoint, write_recipe
from merge_lab.testing.moe import ffn_expert, labelled_jsonl

LABELS = ["helpful", "harmless"]


class Plant:
    """Unpickling this creates `marker`: what a stranger's state.pt could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ------------------------------------------------------------------ the state files alone


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # a frozen parameter is not part of the state (the same in every model)
    torch.nn.init.zeros_(model[1].bias)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.01)
    return model, opt


def _steps(model, opt, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(5, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_state_round_trip_continues_exactly(tmp_path):
    model, opt = _tiny()
    _steps(model, opt, 3)
    random.seed(7)
    state.save_state(tmp_path, model, opt, 3, [{"loss": 1.5}] * 3, "owner")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.TENSORS, state.META])
    _steps(model, opt, 2)
    expected = [p.detach().clone() for p in model.parameters()]
    python_next = random.random()

    other, other_opt = _tiny(seed=1)  # different weights, fresh optimizer, RNGs moved on
    torch.rand(10)
    random.seed(99)
    resumed = state.load_state(tmp_path, other, other_opt, "owner")
    assert (resumed.step, resumed.history) == (3, [{"loss": 1.5}] * 3)
    assert random.random() == python_next
    _steps(other, other_opt, 2)  # same batches (torch RNG restored), same Adam moments
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), expected))


def _corrupt_tensors(folder):
    (folder / state.TENSORS).write_bytes(b"\x00" * 64)


def _truncate_tensors_and_rehash(folder):
    path = folder / state.TENSORS
    path.write_bytes(path.read_bytes()[:40])
    meta = json.loads((folder / state.META).read_text())
    meta["tensors_sha256"] = state.sha256_of(path)  # the test forges a consistent-looking state
    (folder / state.META).write_text(json.dumps(meta))


def _wrong_shape(folder):
    from safetensors.torch import load_file, save_file

    path = folder / state.TENSORS
    tensors = load_file(str(path))
    tensors["param/0.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(path))
    meta = json.loads((folder / state.META).read_text())
    meta["tensors_sha256"] = state.sha256_of(path)
    (folder / state.META).write_text(json.dumps(meta))


def _wrong_router_shape(folder):
    """A fused model's router weight saved as [1, 1], the JSON's hash updated to match."""
    from safetensors.torch import load_file, save_file

    path = folder / state.TENSORS
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".mlp.gate.weight"))
    tensors[name] = torch.zeros(1, 1)
    save_file(tensors, str(path))
    _edit_meta(tensors_sha256=state.sha256_of(path))(folder)


def _edit_meta(**changes):
    def edit(folder):
        meta = json.loads((folder / state.META).read_text())
        meta.update(changes)
        (folder / state.META).write_text(json.dumps(meta))
    return edit


CORRUPTIONS = {
    "json is garbage": (lambda f: (f / state.META).write_bytes(b"\xff{not json"), "not readable JSON"),
    "json missing": (lambda f: (f / state.META).unlink(), "state.json: is missing"),
    "tensors are garbage": (_corrupt_tensors, "sha256 differs"),
    "tensors truncated, hash forged": (_truncate_tensors_and_rehash, "not a readable safetensors file"),
    "tensors missing": (lambda f: (f / state.TENSORS).unlink(), "state.safetensors: is missing"),
    "tensor of the wrong shape": (_wrong_shape, r"weight '0.weight' is torch.float32 \[2, 2\]"),
    "another train block": (_edit_meta(owner="someone else"), "another train block"),
    "step is not a number": (_edit_meta(step="3"), "no valid step"),
    "history does not match the step": (_edit_meta(step=2), "says step 2 but holds 3"),
    "python rng malformed": (_edit_meta(python_rng=[3, [1, 2], None]), "no valid Python RNG state"),
    "optimizer settings changed": (_edit_meta(optimizer={"param_groups": [], "scalars": {}}), "parameter groups"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_damaged_state_is_refused_before_anything_changes(tmp_path, case):
    model, opt = _tiny()
    _steps(model, opt, 3)
    state.save_state(tmp_path, model, opt, 3, [{"loss": 1.0}] * 3, "owner")
    damage, message = CORRUPTIONS[case]
    damage(tmp_path)
    other, other_opt = _tiny(seed=1)
    before = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(MergeLabError, match=message) as err:
        state.load_state(tmp_path, other, other_opt, "owner")
    assert "without --resume" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), before)) and not other_opt.state


def test_a_pickled_state_is_never_loaded(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Plant(marker))
    live = tmp_path / "payload-is-live"
    pickle.loads(pickle.dumps(Plant(live)))  # the payload does what it says when unpickled
    assert live.exists()
    (tmp_path / state.LEGACY).write_bytes(payload)
    model, opt = _tiny()
    assert state.has_state(tmp_path)
    with pytest.raises(MergeLabError, match="torch.save format, which merge_lab never loads"):
        state.load_state(tmp_path, model, opt, "owner")
    assert not marker.exists()


def test_a_failed_save_keeps_the_previous_state(tmp_path, monkeypatch):
    model, opt = _tiny()
    _steps(model, opt, 1)
    state.save_state(tmp_path, model, opt, 1, [{"loss": 1.0}], "owner")
    _steps(model, opt, 1)

    def broken(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", broken)  # the tensors are written, then the JSON fails
    with pytest.raises(OSError):
        state.save_state(tmp_path, model, opt, 2, [{"loss": 1.0}] * 2, "owner")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([state.TENSORS, state.META])  # no temporary left
    with pytest.raises(MergeLabError, match="sha256 differs"):  # new tensors, old JSON: refused, never mixed
        state.load_state(tmp_path, *_tiny(), "owner")


# ------------------------------------------------------------------ through `merge-lab fuse --resume`


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A fuse run stopped after 2 of 4 steps: (recipe, its work folder with the assembled MoE and the state)."""
    root = tmp_path_factory.mktemp("state")
    base = make_checkpoint(root / "base", "llama", seed=0, shards=False)
    models = [{"model": str(ffn_expert(base, root / lab, seed=i + 1)), "label": lab} for i, lab in enumerate(LABELS)]
    data = labelled_jsonl(root / "data.jsonl", LABELS, per_label=6)
    recipe = write_recipe(root / "fuse.yaml", {
        "merge_method": "h3_moe", "base_model": str(base), "models": models,
        "train": {"data": str(data), "steps": 4, "batch_size": 4, "lr": 1e-2, "eval_rows": 4},
    })
    out = root / "first" / "moe"
    assert fuse(recipe, out, progress=False, stop_after=2).path is None
    return recipe, work_dir(out)


def _resume(stopped, tmp_path, damage):
    """Copy the stopped run's work folder beside tmp_path/moe, damage its state, run `fuse --resume`."""
    recipe, work = stopped
    out = tmp_path / "moe"
    shutil.copytree(work, work_dir(out))
    damage(work_dir(out) / "state")
    res = CliRunner().invoke(app, ["fuse", str(recipe), "-o", str(out), "--resume", "--no-progress"])
    return res, out


CLI_CASES = {
    "state.json garbage": (lambda f: (f / state.META).write_text("{"), "state.json: is not readable JSON"),
    "state.safetensors garbage": (_corrupt_tensors, "state.safetensors: is not the file state.json was saved with"),
    "state.safetensors missing": (lambda f: (f / state.TENSORS).unlink(), "state.safetensors: is missing"),
    "a router of the wrong shape": (_wrong_router_shape, r"weight '.*\.mlp\.gate\.weight' is torch.float32 \[1, 1\]"),
    "another train block's state": (_edit_meta(owner="0" * 64), "another train block"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_fuse_resume_on_a_damaged_state_exits_2_and_writes_nothing(stopped, tmp_path, case):
    damage, message = CLI_CASES[case]
    res, out = _resume(stopped, tmp_path, damage)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)  # a message, not a traceback
    text = " ".join(res.output.split())
    assert "error:" in text and "without --resume" in text
    assert re.search(message, text), text
    assert not out.exists()


def test_fuse_resume_never_runs_a_planted_pickle(stopped, tmp_path):
    marker = tmp_path / "pwned"

    def plant_beside(folder):  # a valid state is there: the pickle is ignored, with a note
        (folder / state.LEGACY).write_bytes(pickle.dumps(Plant(marker)))

    res, out = _resume(stopped, tmp_path / "beside", plant_beside)
    assert res.exit_code == 0, res.output
    assert "fuse complete" in res.output and "ignored" in res.output and "state.pt" in res.output
    assert out.is_dir() and not marker.exists()

    def plant_alone(folder):  # only the pickle: refused
        for name in (state.TENSORS, state.META):
            (folder / name).unlink()
        (folder / state.LEGACY).write_bytes(pickle.dumps(Plant(marker)))

    res, out = _resume(stopped, tmp_path / "alone", plant_alone)
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "never loads" in text and "without --resume" in text, res.output
    assert not out.exists() and not marker.exists()
