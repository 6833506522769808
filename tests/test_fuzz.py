"""Property-based tests (issue 11, part 8): random and mutated headers, indexes, configs, adapter
configs and recipes go to the readers and to the planner behind `validate`; the only exception
that may escape is MergeLabError, and a failed merge leaves nothing at the output path.

Budget: deterministic (derandomize) and small (max_examples), about 30 s together on 2 cores."""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from merge_lab.core.adapters import AdapterCheckpoint
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.core.safetensors_header import read_header
from merge_lab.errors import MergeLabError
from merge_lab.merge.planner import make_plan
from merge_lab.merge.recipe import parse_recipe
from merge_lab.testing import make_checkpoint

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    base = make_checkpoint(root / "base", "llama", seed=0, layers=1)
    model = make_checkpoint(root / "m1", "llama", seed=1, base=base, layers=1)
    return base, model


def only_merge_lab_errors(fn) -> None:
    try:
        fn()
    except MergeLabError:
        pass


def fresh_copy(src: Path, root: Path) -> Path:
    dst = Path(tempfile.mkdtemp(dir=root))
    shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- safetensors headers

entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "F8", "x"]) | json_values,
     "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
     "data_offsets": st.lists(st.integers(-4, 200), min_size=0, max_size=3) | json_values},
    optional={"extra": json_values},
)
headers = st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4).map(
    lambda d: d
) | st.fixed_dictionaries({"__metadata__": json_values})


@FUZZ
@given(header=headers, data=st.binary(max_size=300), pad=st.booleans())
def test_random_headers_raise_only_merge_lab_error(tmp_path, header, data, pad):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8 if pad else 0)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    only_merge_lab_errors(lambda: read_header(path))


@FUZZ
@given(blob=st.binary(max_size=200))
def test_random_bytes_raise_only_merge_lab_error(tmp_path, blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    only_merge_lab_errors(lambda: read_header(path))


@settings(max_examples=25, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.none() | st.integers(0, 10**9))
def test_mutated_shards_never_leave_an_output(models, tmp_path, flips, cut):
    """Bytes of a real shard flipped (header or data) or the file cut: the merge succeeds or fails
    with MergeLabError, and a failure leaves nothing at the output path."""
    from merge_lab.merge.engine import merge

    base, model = models
    evil = fresh_copy(model, tmp_path)
    shard = sorted(evil.glob("*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for pos, value in flips:
        raw[pos % min(len(raw), header_end + 64)] = value  # mostly the header, where it matters
    if cut is not None:
        raw = raw[: cut % len(raw)]
    shard.write_bytes(bytes(raw))
    recipe = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [str(base), str(evil)]}))
    out = evil.parent / f"{evil.name}-out"
    try:
        merge(recipe, out, progress=False, hash_inputs=False)
    except MergeLabError:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.*"))
        return
    assert (out / "config.json").exists()
    shutil.rmtree(out)


# ---------------------------------------------------------------- indexes, configs, adapter configs


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=30), json_values, max_size=4)}))
def test_random_indexes_raise_only_merge_lab_error(models, tmp_path, index):
    _, model = models
    folder = fresh_copy(model, tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    only_merge_lab_errors(lambda: Checkpoint(folder).tensors)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(["model_type", "architectures", "num_hidden_layers", "hidden_size",
                                                 "vocab_size", "tie_word_embeddings", "text_config", "torch_dtype",
                                                 "merge_lab_expert_labels"]), json_values, max_size=3),
       whole=st.none() | json_values)
def test_random_configs_raise_only_merge_lab_error(models, tmp_path, changes, whole):
    base, model = models
    folder = fresh_copy(model, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **changes} if whole is None else whole))
    recipe = parse_recipe(yaml.safe_dump({"merge_method": "linear", "models": [str(base), str(folder)]}))
    only_merge_lab_errors(lambda: make_plan(recipe))


@FUZZ
@given(cfg=st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                             "use_rslora", "use_dora", "fan_in_fan_out", "modules_to_save"]),
                           json_values, max_size=4))
def test_random_adapter_configs_raise_only_merge_lab_error(tmp_path, cfg):
    import torch
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    prefix = "base_model.model.model.layers.0.mlp.up_proj"
    save_file({f"{prefix}.lora_A.weight": torch.zeros(2, 8), f"{prefix}.lora_B.weight": torch.zeros(8, 2)},
              str(folder / "adapter_model.safetensors"))

    def read(whole_tensors: bool) -> None:
        ckpt = AdapterCheckpoint(folder, whole_tensors=whole_tensors)  # whole_tensors: as `model+adapter` reads it
        _ = ckpt.config, ckpt.pairs, ckpt.saved

    only_merge_lab_errors(lambda: read(False))
    only_merge_lab_errors(lambda: read(True))


# ---------------------------------------------------------------- recipes


def recipe_values(base: Path, model: Path):
    params = st.dictionaries(st.sampled_from(["weight", "density", "t", "lambda", "normalize", "rescale", "bogus"]),
                             json_values | st.floats(-2, 2), max_size=3)
    model_entry = st.sampled_from([str(model), str(base), f"{model}/", "nope"]).map(lambda m: {"model": m}) | st.fixed_dictionaries(
        {"model": st.sampled_from([str(model), str(base)]), "parameters": params | json_values})
    return st.fixed_dictionaries(
        {"merge_method": st.sampled_from(["linear", "ties", "dare_ties", "dare_linear", "task_arithmetic", "slerp", "tie"]),
         "models": st.lists(model_entry, max_size=3) | json_values},
        optional={"base_model": st.sampled_from([str(base), "./nope"]) | json_values, "parameters": params | json_values,
                  "dtype": json_values, "shard_size": json_values, "tokenizer": json_values, "seed": json_values},
    )


@FUZZ
@given(data=st.data())
def test_random_recipes_raise_only_merge_lab_error(models, data):
    base, model = models
    doc = data.draw(recipe_values(base, model))
    text = data.draw(st.sampled_from(["yaml", "cut"]))
    source = yaml.safe_dump(doc)
    if text == "cut":
        source = source[: data.draw(st.integers(0, len(source)))]

    def validate() -> None:
        from merge_lab.core.writer import parse_size

        plan = make_plan(parse_recipe(source))
        parse_size(plan.recipe.shard_size)

    only_merge_lab_errors(validate)


def test_billion_laughs_recipe_is_refused():
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        levels.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "merge_method: linear\nmodels: [m]\n" + "\n".join(levels) + "\n"
    with pytest.raises(MergeLabError, match="aliases expand"):
        parse_recipe(text)


def test_alias_check_sizes_each_written_node_once():
    """A chain of n anchors, each listing the previous twice, stands for 2^n nodes. The check sizes
    every node the file writes once (2n + 1 of them) and computes the expansion without walking it:
    with n = 2000 an expanding walk would never end, so finishing at all is the test."""
    import yaml

    from merge_lab.core.config import expanded_size, load_yaml_text

    n = 2000
    text = "\n".join(["a0: &a0 x"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}]" for i in range(1, n)]) + "\n"
    written, expanded = expanded_size(yaml.compose(text))
    assert written == 2 * n + 1  # the mapping, n keys, n values
    assert expanded == 1 + n + sum(2 ** (i + 1) - 1 for i in range(n))
    with pytest.raises(MergeLabError, match="aliases expand"):
        load_yaml_text(text, "t.yaml")
