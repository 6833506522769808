"""A file's `device:` under `accelerate launch`: each process computes on its own device
(LOCAL_RANK), with a note when the file named a fixed one; one process keeps what the file says.
No GPU here: the mapping is tested with the launcher's environment set and torch told of 2 GPUs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from merge_lab.core.distributed import device_for_process, process_device
from merge_lab.errors import MergeLabError
from merge_lab.testing import make_checkpoint, write_recipe
from merge_lab.testing.toy import make_bigram_checkpoint


@pytest.fixture
def two_gpus(monkeypatch):
    """torch believes it sees 2 GPUs (nothing is put on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.fixture
def second_of_two(monkeypatch):
    """This process is the second of 2 a launcher started."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def test_each_launched_process_gets_its_own_index():
    assert device_for_process("cuda", 1, 2) == ("cuda:1", None)
    assert device_for_process("cuda", 0, 2) == ("cuda:0", None)
    moved, note = device_for_process("cuda:0", 1, 2, "c.yaml, line 3 (settings.device)")
    assert moved == "cuda:1"
    assert note.startswith("c.yaml, line 3 (settings.device): 'cuda:0' names one device") and "write 'cuda'" in note
    assert device_for_process("cuda:0", 0, 2)[1] is not None  # the main process says it for all
    assert device_for_process("cpu", 1, 2) == ("cpu", None)
    # one process honours the file, launched or not
    assert device_for_process("cuda:1", None, 1) == ("cuda:1", None)
    assert device_for_process("cuda:1", 0, 1) == ("cuda:1", None)


def test_process_device_reads_the_launchers_environment(two_gpus, second_of_two, monkeypatch):
    assert process_device("cuda:0", "f (device)") == ("cuda:1", process_device("cuda:0", "f (device)")[1])
    assert process_device("cuda:0")[1] is not None
    assert process_device("cuda") == ("cuda:1", None)
    assert process_device("auto") == ("cuda:1", None)
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(MergeLabError, match=r"f \(device\): this process would compute on 'cuda:2', but torch sees 2"):
        process_device("cuda", "f (device)")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert process_device("cuda:1") == ("cuda:1", None)  # no launcher: the file's device


def test_no_gpu_auto_is_the_cpu_and_a_gpu_is_refused(second_of_two, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert process_device("auto") == ("cpu", None)
    assert process_device("cpu") == ("cpu", None)
    with pytest.raises(MergeLabError, match=r"r.yaml \(train.device\): device 'cuda:0' was asked for but torch sees no"):
        process_device("cuda:0", "r.yaml (train.device)")
    with pytest.raises(MergeLabError, match="'gpu0' is not a device"):
        process_device("gpu0")


def test_compare_reads_its_device_through_the_launch_mapping(tmp_path, two_gpus, second_of_two):
    from merge_lab.evaluation.prepare import prepare

    make_bigram_checkpoint(tmp_path / "comply", "Sure")
    (tmp_path / "like.jsonl").write_text(json.dumps({"prompt": "Help", "response": "Sure"}) + "\n")
    spec = {"settings": {"limit": 1, "device": "cuda:0"},
            "suites": [{"name": "like", "path": "like.jsonl", "kind": "likelihood", "objective": "helpful"}],
            "candidates": [{"name": "comply", "checkpoint": "comply"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    comp = prepare(tmp_path / "c.yaml", tmp_path / "out")
    assert comp.settings.device == "cuda:1"
    assert comp.candidates["comply"].settings.device == "cuda:1"  # what the models load onto
    assert len(comp.notes) == 1 and "c.yaml, line 3 (settings.device): 'cuda:0' names one device" in comp.notes[0]


def test_align_reads_its_device_through_the_one_function(tmp_path, monkeypatch):
    from merge_lab.training.align import align

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = make_checkpoint(tmp_path / "base", "llama", seed=0, shards=False)
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "Say hi", "response": "hi"}) + "\n")
    recipe = write_recipe(tmp_path / "align.yaml", {
        "base_model": str(base), "label": "helpful", "data": [{"jsonl": str(tmp_path / "rows.jsonl")}],
        "lora": {"r": 2, "alpha": 4}, "train": {"steps": 1, "batch_size": 1, "device": "cuda:0"}})
    with pytest.raises(MergeLabError, match=r"align.yaml, line \d+ \(train.device\): device 'cuda:0' was asked for"):
        align(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
