"""Checkpoints from strangers (issue 11): nothing outside the named folders is read or copied,
headers, indexes and configs are checked strictly, and the output path is taken safely.

Every case runs through the CLI on real files made here: exit 2, a message naming the file and
entry, no output (nor temporary folder) left, and a planted secret's bytes nowhere."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.testing import make_checkpoint, write_recipe

runner = CliRunner()
SECRET = b"TOP-SECRET-7f3a9c"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A float32 base (in shards) and one fine-tune of it."""
    root = tmp_path_factory.mktemp("sec")
    base = make_checkpoint(root / "base", "llama", seed=0)
    model = make_checkpoint(root / "m1", "llama", seed=1, base=base)
    return base, model


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "secret.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(SECRET * 100)
    return path


def linear(*models: Path, **extra) -> dict:
    return {"merge_method": "linear", "models": [str(m) for m in models], **extra}


def run(tmp_path: Path, recipe: dict, command: str = "merge", *args: str, out: Path | None = None):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = out or tmp_path / "out"
    argv = [command, str(path)] + (["-o", str(out), "--no-progress"] if command == "merge" else []) + list(args)
    return runner.invoke(app, argv, env={"COLUMNS": "300"}), out


def assert_refused(tmp_path: Path, recipe: dict, *fragments: str, command: str = "merge", out: Path | None = None) -> str:
    result, out = run(tmp_path, recipe, command, out=out)
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for frag in fragments:
        assert frag in text, f"{frag!r} not in: {text}"
    assert SECRET.decode() not in result.output
    if command == "merge":
        assert not os.path.lexists(out)
        assert not list(out.parent.glob(f".{out.name}.*"))
    return text


def assert_secret_nowhere(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink() and "elsewhere" not in p.parts:
            assert SECRET not in p.read_bytes(), p


# ---------------------------------------------------------------- 1. paths stay inside


@pytest.mark.parametrize("entry", ["../elsewhere/secret.bin", "ABSOLUTE", "../../../../../../etc/passwd"])
def test_index_entry_outside_the_folder_is_refused_before_reading(pair, tmp_path, entry):
    base, model = pair
    secret = secret_file(tmp_path)
    evil = copy_model(model, tmp_path / "evil")
    index = json.loads((evil / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = str(secret) if entry == "ABSOLUTE" else entry
    (evil / "model.safetensors.index.json").write_text(json.dumps(index))
    for command in ("validate", "merge"):
        text = assert_refused(tmp_path, linear(base, evil), "model.safetensors.index.json", "outside the model folder",
                              name, command=command)
        assert "nothing was read" in text


def test_shard_symlinked_outside_is_refused(pair, tmp_path):
    base, model = pair
    secret_file(tmp_path)
    evil = copy_model(model, tmp_path / "evil")
    shard = sorted(evil.glob("model-*.safetensors"))[0]
    real = tmp_path / "elsewhere" / "shard.safetensors"
    shutil.move(shard, real)
    shard.symlink_to(real)  # a valid shard, but outside the folder
    assert_refused(tmp_path, linear(base, evil), shard.name, "outside the model folder")


def test_single_file_symlinked_to_a_secret_is_refused(pair, tmp_path):
    base, _ = pair
    secret = secret_file(tmp_path)
    evil = make_checkpoint(tmp_path / "evil", "llama", seed=1, base=base, shards=False)
    (evil / "model.safetensors").unlink()
    (evil / "model.safetensors").symlink_to(secret)
    assert_refused(tmp_path, linear(base, evil), "model.safetensors", "outside the model folder")


def test_config_symlinked_outside_is_refused(pair, tmp_path):
    base, model = pair
    secret_file(tmp_path)
    evil = copy_model(model, tmp_path / "evil")
    (evil / "config.json").unlink()
    outside = tmp_path / "elsewhere" / "config.json"
    outside.write_text((model / "config.json").read_text())
    (evil / "config.json").symlink_to(outside)
    assert_refused(tmp_path, linear(base, evil), "config.json", "outside the model folder", command="validate")


def test_symlinked_tokenizer_outside_is_refused_not_copied(pair, tmp_path):
    base, model = pair
    secret = secret_file(tmp_path)
    evil = copy_model(model, tmp_path / "evil")
    (evil / "tokenizer.json").unlink()
    (evil / "tokenizer.json").symlink_to(secret)
    assert_refused(tmp_path, linear(evil, base), "tokenizer.json", "outside the model folder")
    assert_secret_nowhere(tmp_path)


def test_a_fifo_side_file_is_refused_without_blocking(pair, tmp_path):
    base, model = pair
    evil = copy_model(model, tmp_path / "evil")
    (evil / "generation_config.json").unlink()
    os.mkfifo(evil / "generation_config.json")
    assert_refused(tmp_path, linear(evil, base), "generation_config.json", "not a regular file")


def test_links_inside_the_folder_and_hub_cache_snapshots_still_work(pair, tmp_path):
    """A link to a file of the same folder is fine, and so is the Hugging Face cache layout
    (snapshots/REV/* linking into the repository's blobs/)."""
    base, model = pair
    snap = tmp_path / "models--org--m1" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--m1" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in model.iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    (snap / "tokenizer.json").unlink()
    shutil.copy(blobs / "tokenizer.json", snap / "tok-real.json")
    (snap / "tokenizer.json").symlink_to("tok-real.json")
    result, out = run(tmp_path, linear(base, snap))
    assert result.exit_code == 0, result.output
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()


def test_adapter_weights_linked_outside_are_refused(pair, tmp_path):
    from merge_lab.core.adapters import AdapterCheckpoint
    from merge_lab.errors import MergeLabError

    secret = secret_file(tmp_path)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (adapter / "adapter_model.safetensors").symlink_to(secret)
    with pytest.raises(MergeLabError, match="outside the model folder") as e:
        _ = AdapterCheckpoint(adapter).tensors
    assert SECRET.decode() not in str(e.value)


# ---------------------------------------------------------------- 2. headers, index and config checked strictly


def write_safetensors(path: Path, header: dict, data: bytes, pad: bool = True) -> Path:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def with_single_file(model: Path, folder: Path, header: dict, data: bytes) -> Path:
    """A copy of `model` (config, tokenizer) whose weights are one hand-written safetensors file."""
    folder.mkdir()
    for f in model.iterdir():
        if not f.name.endswith(".safetensors") and not f.name.endswith(".index.json"):
            shutil.copy(f, folder / f.name)
    write_safetensors(folder / "model.safetensors", header, data)
    return folder


def real_header(model: Path) -> tuple[dict, bytes]:
    """One tensor of `model` as (header, data) to mutate."""
    from merge_lab.core.checkpoint import Checkpoint

    info = Checkpoint(model).info("model.norm.weight")
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        data = f.read(info.nbytes)
    header = {"__metadata__": {"format": "pt"},
              "model.norm.weight": {"dtype": "F32", "shape": list(info.shape), "data_offsets": [0, len(data)]}}
    return header, data


BAD_HEADERS = {
    "negative offset": (lambda h, d: h["model.norm.weight"].update(data_offsets=[-8, 120]), "not an ordered span"),
    "reversed span": (lambda h, d: h["model.norm.weight"].update(data_offsets=[128, 0]), "not an ordered span"),
    "short span": (lambda h, d: h["model.norm.weight"].update(data_offsets=[0, 64]), "span 64 bytes"),
    "unknown dtype": (lambda h, d: h["model.norm.weight"].update(dtype="F8_E9M9"), "dtype 'F8_E9M9'"),
    "shape of strings": (lambda h, d: h["model.norm.weight"].update(shape=["32"]), "not a list of non-negative"),
    "negative dim": (lambda h, d: h["model.norm.weight"].update(shape=[-32]), "not a list of non-negative"),
    "bool offsets": (lambda h, d: h["model.norm.weight"].update(data_offsets=[False, True]), "not two integers"),
    "extra field": (lambda h, d: h["model.norm.weight"].update(offsets=1), "exactly dtype, shape and data_offsets"),
    "metadata not str": (lambda h, d: h.update(__metadata__={"format": 1}), "__metadata__ is not a map"),
    "metadata a list": (lambda h, d: h.update(__metadata__=["pt"]), "__metadata__ is not a map"),
    "entry a list": (lambda h, d: h.update({"model.norm.weight": [1, 2]}), "exactly dtype, shape and data_offsets"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_refused_by_validate(pair, tmp_path, case):
    base, model = pair
    header, data = real_header(model)
    mutate, fragment = BAD_HEADERS[case]
    mutate(header, data)
    evil = with_single_file(model, tmp_path / "evil", header, data)
    assert_refused(tmp_path, linear(evil), "model.safetensors", fragment, command="validate")


def test_overlapping_gapped_and_uncovered_spans_are_refused(pair, tmp_path):
    from merge_lab.core.safetensors_header import read_header
    from merge_lab.errors import MergeLabError

    t = {"dtype": "F32", "shape": [4]}
    cases = {
        "overlaps": ({"a": {**t, "data_offsets": [0, 16]}, "b": {**t, "data_offsets": [8, 24]}}, 24),
        "unused bytes": ({"a": {**t, "data_offsets": [0, 16]}, "b": {**t, "data_offsets": [24, 40]}}, 40),
        "covered by no header entry": ({"a": {**t, "data_offsets": [0, 16]}}, 32),
        "truncated": ({"a": {**t, "data_offsets": [0, 16]}, "b": {**t, "data_offsets": [16, 32]}}, 20),
    }
    for i, (fragment, (header, size)) in enumerate(cases.items()):
        path = write_safetensors(tmp_path / f"x{i}.safetensors", header, b"\0" * size)
        with pytest.raises(MergeLabError, match=fragment):
            read_header(path)
    # the safetensors library agrees on a well-formed file
    good = write_safetensors(tmp_path / "good.safetensors", {"a": {**t, "data_offsets": [0, 16]}}, b"\0" * 16)
    entries, _ = read_header(good)
    assert entries["a"].shape == (4,)


def test_a_non_safetensors_file_never_shows_its_bytes(pair, tmp_path):
    base, model = pair
    evil = copy_model(model, tmp_path / "evil")
    shard = sorted(evil.glob("model-*.safetensors"))[0]
    shard.write_bytes(SECRET * 50)  # what it claims to be, it is not
    text = assert_refused(tmp_path, linear(base, evil), shard.name, "corrupt safetensors header", command="validate")
    # the first 8 bytes read as a length must not be echoed either
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in text


def test_header_length_beyond_file_and_tiny_files(pair, tmp_path):
    from merge_lab.core.safetensors_header import read_header
    from merge_lab.errors import MergeLabError

    for i, raw in enumerate([b"", b"\x01\x02", struct.pack("<Q", 10**6) + b"{}", struct.pack("<Q", 0) + b"{}"]):
        path = tmp_path / f"t{i}.safetensors"
        path.write_bytes(raw)
        with pytest.raises(MergeLabError, match="corrupt safetensors header"):
            read_header(path)


def test_duplicate_tensor_in_header_is_refused(tmp_path):
    from merge_lab.core.safetensors_header import read_header
    from merge_lab.errors import MergeLabError

    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    raw = ('{"a": ' + entry + ', "a": ' + entry + "}").encode()
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(MergeLabError, match="appears twice"):
        read_header(path)


@pytest.mark.parametrize("case", ["not an object", "weight_map list", "shard not str", "missing tensor", "extra tensor",
                                  "wrong shard"])
def test_index_must_match_the_shards(pair, tmp_path, case):
    base, model = pair
    evil = copy_model(model, tmp_path / "evil")
    path = evil / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    # tensors of a shard that holds several (so that shard is still listed when one entry goes)
    names = [n for n, s in index["weight_map"].items() if list(index["weight_map"].values()).count(s) > 1]
    fragment = {"not an object": "is a JSON object", "weight_map list": "weight_map", "shard not str": "not a shard file name",
                "missing tensor": "not in the shard it names", "extra tensor": "does not list it",
                "wrong shard": "the index and the shards disagree"}[case]
    if case == "not an object":
        index = [index]
    elif case == "weight_map list":
        index["weight_map"] = list(index["weight_map"].items())
    elif case == "shard not str":
        index["weight_map"][names[0]] = 7
    elif case == "missing tensor":
        index["weight_map"]["model.ghost.weight"] = shards[0]
    elif case == "extra tensor":
        del index["weight_map"][names[0]]
    else:
        owner = index["weight_map"][names[0]]
        index["weight_map"][names[0]] = next(s for s in shards if s != owner)
    path.write_text(json.dumps(index))
    assert_refused(tmp_path, linear(base, evil), "model.safetensors.index.json" if case != "extra tensor" else "holds tensor",
                   fragment, command="validate")


@pytest.mark.parametrize("case", ["list", "layers as string", "NaN", "not utf8", "unknown architecture", "bool layers",
                                  "duplicate key"])
def test_config_json_is_checked(pair, tmp_path, case):
    base, model = pair
    evil = copy_model(model, tmp_path / "evil")
    path = evil / "config.json"
    cfg = json.loads(path.read_text())
    fragment = {"list": "is a JSON object", "layers as string": "num_hidden_layers", "NaN": "NaN is not JSON",
                "not utf8": "not UTF-8", "unknown architecture": "GPT2LMHeadModel", "bool layers": "num_hidden_layers",
                "duplicate key": "appears twice"}[case]
    if case == "list":
        path.write_text(json.dumps([cfg]))
    elif case == "layers as string":
        path.write_text(json.dumps({**cfg, "num_hidden_layers": "2"}))
    elif case == "bool layers":
        path.write_text(json.dumps({**cfg, "num_hidden_layers": True}))
    elif case == "NaN":
        path.write_text(json.dumps({**cfg, "rms_norm_eps": float("nan")}))
    elif case == "not utf8":
        path.write_bytes(b'{"model_type": "\xff\xfe"}')
    elif case == "unknown architecture":
        path.write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    else:
        path.write_text(path.read_text().replace("{", '{"model_type": "llama",', 1))
    text = assert_refused(tmp_path, linear(base, evil), "config.json", fragment, command="validate")
    if case == "unknown architecture":
        assert "LlamaForCausalLM" in text  # the allow-list is named


@pytest.mark.parametrize("case", ["r string", "r zero", "regex key", "alpha nan", "not an object", "A is 1-d"])
def test_adapter_config_is_checked(tmp_path, case):
    from safetensors.torch import save_file

    from merge_lab.core.adapters import AdapterCheckpoint
    from merge_lab.errors import MergeLabError

    folder = tmp_path / "adapter"
    folder.mkdir()
    cfg: object = {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    a = torch.zeros(2, 8)
    fragment = {"r string": "(r)", "r zero": "(r)", "regex key": "not a module name", "alpha nan": "NaN is not JSON",
                "not an object": "is a JSON object", "A is 1-d": "LoRA needs A [r, in]"}[case]
    if case == "r string":
        cfg["r"] = "2"
    elif case == "r zero":
        cfg["r"] = 0
    elif case == "regex key":
        cfg["rank_pattern"] = {"(a+)+$": 2}
    elif case == "not an object":
        cfg = [cfg]
    elif case == "A is 1-d":
        a = torch.zeros(2)
    text = json.dumps(cfg).replace('"lora_alpha": 4', '"lora_alpha": NaN') if case == "alpha nan" else json.dumps(cfg)
    (folder / "adapter_config.json").write_text(text)
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": torch.zeros(8, 2)},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(MergeLabError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ckpt = AdapterCheckpoint(folder)
        _ = ckpt.config, ckpt.pairs


# ---------------------------------------------------------------- 5. the output is safe


@pytest.mark.parametrize("where", ["is", "inside", "contains"])
@pytest.mark.parametrize("force", [False, True])
def test_output_may_not_touch_an_input(pair, tmp_path, where, force):
    base, model = pair
    mine = copy_model(model, tmp_path / "inputs" / "mine")
    before = sorted(p.name for p in mine.iterdir())
    out = {"is": mine, "inside": mine / "merged", "contains": tmp_path / "inputs"}[where]
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, mine))
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress"] + (["--force"] if force else []))
    assert result.exit_code == 2, result.output
    assert "input folder" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in mine.iterdir()) == before


def test_output_compared_by_resolved_path(pair, tmp_path):
    base, model = pair
    mine = copy_model(model, tmp_path / "mine")
    (tmp_path / "alias").symlink_to(mine)
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, mine))
    result = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "alias"), "--no-progress", "--force"])
    assert result.exit_code == 2 and "input folder" in result.output
    assert (mine / "config.json").exists()


def test_plan_refuses_an_output_inside_an_input(pair, tmp_path):
    base, model = pair
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    result = runner.invoke(app, ["plan", str(path), "-o", str(model / "out")])
    assert result.exit_code == 2 and "input folder" in result.output


@pytest.mark.parametrize("kind", ["file", "folder", "link"])
def test_force_over_a_file_folder_or_link_leaves_nothing_behind(pair, tmp_path, kind):
    base, model = pair
    out = tmp_path / "out"
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "precious.txt").write_text("do not delete")
    if kind == "file":
        out.write_text("old")
    elif kind == "folder":
        out.mkdir()
        (out / "old.txt").write_text("old")
    else:
        out.symlink_to(keep)
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress", "--force"])
    assert result.exit_code == 0, result.output
    assert out.is_dir() and not out.is_symlink() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out", "recipe.yaml"]
    assert (keep / "precious.txt").read_text() == "do not delete"  # a link is replaced, never followed


def test_a_concurrent_run_on_the_same_output_is_refused(pair, tmp_path):
    """While one run holds the output, another (with or without --force) is refused at once and
    the first one's result stands."""
    from merge_lab.core.output_folder import OutputClaim

    base, model = pair
    out = tmp_path / "out"
    claim = OutputClaim(out, replace=False)  # a first run, mid-merge
    assert claim.folder is not None
    (claim.folder / "mine.txt").write_text("first")
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress", *extra])
        assert result.exit_code == 2 and "another merge-lab run" in result.output, result.output
    claim.commit()
    assert (out / "mine.txt").read_text() == "first"
    result = runner.invoke(app, ["merge", str(path), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2 and "already exists" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_the_final_rename_never_replaces_an_output_that_appeared(tmp_path):
    from merge_lab.core.output_folder import OutputClaim
    from merge_lab.errors import MergeLabError

    out = tmp_path / "out"
    claim = OutputClaim(out, replace=False)
    out.mkdir()  # made meanwhile by something that took no lock
    (out / "theirs.txt").write_text("theirs")
    with pytest.raises(MergeLabError, match="appeared while this run was writing"):
        claim.commit()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_run_removes_the_parent_folders_it_created(pair, tmp_path, monkeypatch):
    from merge_lab.strategies.linear import Linear

    base, model = pair

    def boom(self, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Linear, "merge", boom)
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    result = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "a" / "b" / "out"), "--no-progress"])
    assert result.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_disk_full_mid_write_is_a_clear_error_with_nothing_left(pair, tmp_path, monkeypatch):
    from merge_lab.core import writer

    base, model = pair
    calls = {"n": 0}
    real_pwrite = os.pwrite

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", full_disk)
    text = assert_refused(tmp_path, linear(base, model), "ran out of space", "nothing was left", "kB")
    assert calls["n"] > 3 and "out" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_output_folders_get_the_users_umask(pair, tmp_path):
    base, model = pair
    old = os.umask(0o022)
    try:
        result, out = run(tmp_path, linear(base, model))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644


def test_plan_and_merge_share_the_free_space_rule_and_print_units(pair, tmp_path, monkeypatch):
    from collections import namedtuple

    from merge_lab.core import writer

    base, model = pair
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and " kB to write" in result.output and "0.00 GB" not in result.output
    usage = namedtuple("usage", "total used free")
    # more than the output, less than the output plus merge's margin: both must say no
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: usage(10**12, 0, writer.DISK_SLACK))
    result = runner.invoke(app, ["plan", str(path), "-o", str(tmp_path / "out")], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "NOT enough" in result.output and " kB" in result.output
    result, out = run(tmp_path, linear(base, model))
    assert result.exit_code == 2 and "has only" in result.output and not out.exists()


def test_format_size():
    from merge_lab.core.output_folder import format_size

    assert format_size(40_000) == "40.0 kB"
    assert format_size(512) == "512 B"
    assert format_size(1_500_000_000) == "1.50 GB"
    assert format_size(250 * 10**6) == "250 MB"


def test_planted_work_folders_are_not_followed(pair, tmp_path):
    """A stale-looking partial folder that is a link, and a lock that is a link, are never
    followed: what they point at survives."""
    base, model = pair
    keep = tmp_path / "kept"
    keep.mkdir()
    (keep / "precious.txt").write_text("x")
    (tmp_path / ".out.partial-999999999-abc").symlink_to(keep)
    path = write_recipe(tmp_path / "recipe.yaml", linear(base, model))
    result = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (keep / "precious.txt").exists()
    (tmp_path / ".out2.lock").symlink_to(keep / "precious.txt")
    result = runner.invoke(app, ["merge", str(path), "-o", str(tmp_path / "out2"), "--no-progress"])
    assert result.exit_code == 2 and ".out2.lock" in result.output
    assert (keep / "precious.txt").read_text() == "x" and not (tmp_path / "out2").exists()


# ---------------------------------------------------------------- 6. one model, one identity


def test_base_spelled_differently_is_still_the_base(pair, tmp_path, monkeypatch):
    base, model = pair
    monkeypatch.chdir(base.parent)
    (tmp_path / "base-link").symlink_to(base)
    recipe = {"merge_method": "task_arithmetic", "base_model": "./base",
              "models": [{"model": "base/"}, {"model": str(model)}]}
    result, out = run(tmp_path, recipe)
    assert result.exit_code == 0, result.output
    from merge_lab.testing import load_tensors

    got, want = load_tensors(out), load_tensors(model)
    for n in want:  # the base's zero task vector is left out, not counted: out == model exactly
        torch.testing.assert_close(got[n], want[n])
    recipe["models"][0] = {"model": str(tmp_path / "base-link")}
    result, out2 = run(tmp_path, recipe, out=tmp_path / "out2")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("spelling", ["trailing slash", "dot slash", "symlink", "absolute"])
def test_a_model_listed_twice_is_refused(pair, tmp_path, monkeypatch, spelling):
    base, model = pair
    monkeypatch.chdir(model.parent)
    (tmp_path / "alias").symlink_to(model)
    other = {"trailing slash": f"{model.name}/", "dot slash": f"./{model.name}", "symlink": str(tmp_path / "alias"),
             "absolute": str(model)}[spelling]
    recipe = {"merge_method": "linear", "models": [model.name, other]}
    assert_refused(tmp_path, recipe, "already listed as models.0", "larger weight", command="validate")


# ---------------------------------------------------------------- 7. parameter ranges


@pytest.mark.parametrize("method, params, fragment", [
    ("slerp", {"t": 1.5}, "less than or equal to 1"),
    ("slerp", {"t": [0.0, 2.0]}, "less than or equal to 1"),
    ("slerp", {"t": -0.1}, "greater than or equal to 0"),
    ("linear", {"weight": float("nan")}, "finite number"),
    ("ties", {"density": -0.1}, "greater than or equal to 0"),
    ("dare_linear", {"density": 1.5}, "less than or equal to 1"),
    ("task_arithmetic", {"lambda": float("inf")}, "finite number"),
])
def test_parameter_ranges_are_checked_by_validate(pair, tmp_path, method, params, fragment):
    base, model = pair
    recipe = {"merge_method": method, "base_model": str(base), "models": [str(model)], "parameters": params}
    assert_refused(tmp_path, recipe, fragment, command="validate")
    assert_refused(tmp_path, recipe, fragment)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "dare_linear"])
def test_weights_summing_to_zero_under_normalize(pair, tmp_path, method):
    base, model = pair
    other = copy_model(model, tmp_path / "other")
    recipe = {"merge_method": method, "base_model": str(base), "parameters": {"normalize": True},
              "models": [{"model": str(model), "parameters": {"weight": 1.0}},
                         {"model": str(other), "parameters": {"weight": -1.0}}]}
    if method == "linear":
        del recipe["base_model"]
    assert_refused(tmp_path, recipe, "sum to zero", "normalize: false", "model.embed_tokens.weight", command="validate")


def test_negative_weight_under_ties_normalize_is_refused(pair, tmp_path):
    base, model = pair
    recipe = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": str(model), "parameters": {"weight": -0.5}}]}
    assert_refused(tmp_path, recipe, "negative weight", "normalize: false", command="validate")


@pytest.mark.parametrize("size", ["0", "-5GB", "inf", "nanGB", "lots"])
def test_shard_size_is_checked_by_validate(pair, tmp_path, size):
    base, model = pair
    assert_refused(tmp_path, linear(base, model, shard_size=size), "is not a size", command="validate")
