"""Resumable fusion-training state as data only: safetensors for the tensors, JSON for the rest.

The work folder of `merge-lab fuse` sits beside the output, where anyone who can write there
can plant a file; a torch.save file would run their code on `fuse --resume` when loaded. So no
Python object is ever deserialised here, and a state is loaded strictly: a missing or malformed file, a tensor of the
wrong name, shape or dtype, or a state saved for another train block is a MergeLabError that says
to start again without --resume.

Two files in the state folder:
- state.safetensors: trainable weights (`param/NAME`), optimizer tensors (`optim/INDEX/KEY`),
  the torch RNG state (`rng/torch`, uint8) and the CUDA ones (`rng/cuda/DEVICE`);
- state.json: step, history, optimizer scalars and param-group settings, the Python RNG state,
  the train block's fingerprint, the number of processes that trained (each took its share of
  every batch, so a resume must split batches the same way), and the sha256 of state.safetensors.
Each is written to a temporary file and renamed; state.json goes last and names the tensor
file's hash, so a run killed between the two renames leaves a state that is refused, never one
loaded half old, half new.

Under FSDP2 the trainable weights and their optimizer moments are shards (DTensors): every process
calls save_state, which gathers them whole (the main one alone writes), and load_state gives each
process its shard of the whole tensors saved, so the files are those of a DDP run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_lab.errors import MergeLabError
from merge_lab.training.shards import shard_like, whole

TENSORS = "state.safetensors"
META = "state.json"
LEGACY = "state.pt"  # the torch.save file merge_lab wrote before: never loaded
FORMAT = "merge_lab.fuse-state"
VERSION = 1
_AGAIN = "run the same command without --resume to train from the start"


@dataclass
class Resumed:
    step: int
    history: list[dict[str, float]]


def fingerprint(settings: str) -> str:
    """What a state belongs to: the hash of the train block's settings (as JSON)."""
    return hashlib.sha256(settings.encode()).hexdigest()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _replace_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename tmp to `path`: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _jsonable(value: Any, what: str) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, what) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"internal: {what} holds a {type(value).__name__}, which the resume state cannot store")


def _saved(t: torch.Tensor) -> torch.Tensor:
    """A tensor as the state file holds it: whole (an FSDP2 shard gathered), on the CPU, its own copy."""
    with torch.no_grad():
        return whole(t).detach().cpu().clone().contiguous()


def save_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
               history: list[dict[str, float]], owner: str, *, processes: int = 1, write: bool = True) -> None:
    """Write the state after `step` steps; `owner` is the train block's fingerprint, `processes`
    the number of processes training. Under FSDP2 every process calls it (the shards are gathered
    in the same order everywhere) and only the one with `write` writes."""
    from safetensors.torch import save_file

    tensors = {f"param/{n}": _saved(p) for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"optim/{index}/{key}"] = _saved(value)
            else:
                scalars.setdefault(str(index), {})[key] = _jsonable(value, f"optimizer state '{key}'")
    if not write:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = [{k: _jsonable(v, f"optimizer setting '{k}'") for k, v in g.items()} for g in opt["param_groups"]]
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{device}"] = rng
    _replace_atomically(folder / TENSORS, lambda tmp: save_file(tensors, str(tmp)))
    version, internal, gauss = random.getstate()
    meta = {
        "format": FORMAT, "version": VERSION, "step": step, "history": history, "owner": owner,
        "processes": processes,
        "optimizer": {"param_groups": groups, "scalars": scalars},
        "python_rng": [version, list(internal), gauss],
        "tensors_sha256": sha256_of(folder / TENSORS),
    }
    _replace_atomically(folder / META, lambda tmp: tmp.write_text(json.dumps(meta) + "\n"))


def has_state(folder: str | Path) -> bool:
    """Whether `folder` holds any resume state, loadable or not (a legacy state.pt included)."""
    folder = Path(folder)
    return any((folder / name).exists() for name in (TENSORS, META, LEGACY))


def _refuse(path: Path, problem: str) -> MergeLabError:
    return MergeLabError(f"{path}: {problem}; the resume state cannot be used: {_AGAIN}.")


def _read_meta(folder: Path) -> dict:
    path = folder / META
    if not path.is_file():
        if (folder / LEGACY).exists():
            raise MergeLabError(
                f"{folder / LEGACY}: a resume state in torch.save format, which merge_lab never loads: "
                f"loading such a file can run any code it holds. {_AGAIN[0].upper() + _AGAIN[1:]}."
            )
        raise _refuse(path, "is missing (the state folder holds only part of a state)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"is not readable JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise _refuse(path, f"is not a {FORMAT} version {VERSION} file")
    kinds = {"step": int, "history": list, "owner": str, "optimizer": dict, "python_rng": list, "tensors_sha256": str}
    wrong = [k for k, t in kinds.items() if not isinstance(meta.get(k), t) or isinstance(meta.get(k), bool)]
    if wrong:
        raise _refuse(path, f"has no valid {', '.join(wrong)}")
    return meta


def _read_tensors(folder: Path, meta: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = folder / TENSORS
    if not path.is_file():
        raise _refuse(path, "is missing (the state folder holds only part of a state)")
    if sha256_of(path) != meta["tensors_sha256"]:
        raise _refuse(path, f"is not the file {META} was saved with (its sha256 differs: a run stopped while "
                            "saving, or the file was changed)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a malformed header
        raise _refuse(path, f"is not a readable safetensors file ({type(e).__name__}: {e})") from None


def _check_history(path: Path, meta: dict) -> list[dict[str, float]]:
    history, step = meta["history"], meta["step"]
    if step < 0 or len(history) != step:
        raise _refuse(path, f"says step {step} but holds {len(history)} step record(s)")
    for record in history:
        if not isinstance(record, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in record.items()):
            raise _refuse(path, "holds a step record that is not a mapping of names to numbers")
    return history


def _checked_params(path: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> list[tuple]:
    """(parameter, saved value) for every trainable weight, names, shapes and dtypes checked."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param/"): t for k, t in tensors.items() if k.startswith("param/")}
    differ = sorted(set(params) ^ set(saved))
    if differ:
        raise _refuse(path, f"its trainable weights differ from this train block's (e.g. {differ[:2]}; "
                            "`trainable` or `train_attention` changed)")
    for name, t in saved.items():
        if t.shape != params[name].shape or t.dtype != params[name].dtype:
            raise _refuse(path, f"weight '{name}' is {t.dtype} {list(t.shape)} but the model's is "
                                f"{params[name].dtype} {list(params[name].shape)}")
    return [(params[name], t) for name, t in saved.items()]


def _optimizer_state(path: Path, meta: dict, tensors: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state_dict rebuilt from the files, checked against this optimizer."""
    current = optimizer.state_dict()["param_groups"]
    saved = meta["optimizer"].get("param_groups")
    if not isinstance(saved, list) or len(saved) != len(current):
        raise _refuse(path, "its optimizer has a different number of parameter groups")
    groups = []
    for now, was in zip(current, saved):
        if not isinstance(was, dict) or set(was) != set(now) or was["params"] != now["params"]:
            raise _refuse(path, "its optimizer settings are not this optimizer's (other keys or parameters)")
        groups.append({k: tuple(v) if isinstance(now[k], tuple) and isinstance(v, list) else v for k, v in was.items()})
    by_index = {i: p for g, opt_g in zip(optimizer.param_groups, current) for i, p in zip(opt_g["params"], g["params"])}
    shapes = {i: p.shape for i, p in by_index.items()}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if not key.startswith("optim/"):
            continue
        index, _, name = key.removeprefix("optim/").partition("/")
        if not index.isdigit() or int(index) not in shapes or not name:
            raise _refuse(path, f"holds optimizer tensor '{key}' for no parameter of this optimizer")
        expected = torch.Size([]) if name == "step" else shapes[int(index)]
        if t.shape != expected:
            raise _refuse(path, f"optimizer tensor '{key}' has shape {list(t.shape)}, expected {list(expected)}")
        state.setdefault(int(index), {})[name] = t if name == "step" else shard_like(t, by_index[int(index)])
    scalars = meta["optimizer"].get("scalars", {})
    if not isinstance(scalars, dict):
        raise _refuse(path, "holds malformed optimizer scalars")
    for index, values in scalars.items():
        if not index.isdigit() or int(index) not in shapes or not isinstance(values, dict):
            raise _refuse(path, f"holds optimizer scalars for no parameter of this optimizer ({index!r})")
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}


@dataclass
class _Rng:
    torch_state: torch.Tensor
    python_state: tuple
    cuda_states: list[torch.Tensor]


def _checked_rng(tensors_path: Path, meta_path: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> _Rng:
    rng = tensors.get("rng/torch")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise _refuse(tensors_path, "holds no valid torch RNG state ('rng/torch', uint8)")
    saved = meta["python_rng"]
    try:
        if not (len(saved) == 3 and isinstance(saved[0], int) and isinstance(saved[1], list)
                and all(isinstance(x, int) for x in saved[1]) and (saved[2] is None or isinstance(saved[2], float))):
            raise ValueError
        python_state = (saved[0], tuple(saved[1]), saved[2])
        random.Random().setstate(python_state)  # tried on a spare generator first
    except (TypeError, ValueError, OverflowError):
        raise _refuse(meta_path, "holds no valid Python RNG state") from None
    cuda = sorted((int(k.rsplit("/", 1)[1]), t) for k, t in tensors.items()
                  if k.startswith("rng/cuda/") and k.rsplit("/", 1)[1].isdigit())
    return _Rng(rng, python_state, [t for _, t in cuda])


def _check_processes(path: Path, meta: dict, processes: int) -> None:
    """A state saved by N processes resumes with N: each took its own share of every batch."""
    saved = meta.get("processes", 1)  # states written before multi-process training: one process
    if not isinstance(saved, int) or isinstance(saved, bool) or saved < 1:
        raise _refuse(path, "has no valid processes count")
    if saved != processes:
        how = ("run it without `accelerate launch` (or with --num_processes 1)" if saved == 1 else
               f"run it under `accelerate launch --num_processes {saved} ...`")
        raise MergeLabError(
            f"{path}: this run was trained by {saved} process(es) and is being resumed with {processes}; every "
            f"process takes its own share of each batch, so it resumes only with the same count: {how} "
            f"with --resume, or {_AGAIN}."
        )


def load_state(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               owner: str, *, processes: int = 1) -> Resumed:
    """Restore weights, optimizer and RNG states saved by save_state for the same train block
    (`owner`) and number of processes; every check runs before anything is changed."""
    folder = Path(folder)
    meta_path, tensors_path = folder / META, folder / TENSORS
    meta = _read_meta(folder)
    _check_processes(meta_path, meta, processes)
    tensors = _read_tensors(folder, meta)
    if meta["owner"] != owner:
        raise _refuse(meta_path, "was saved by a run with another train block (other data, steps or settings)")
    history = _check_history(meta_path, meta)
    params = _checked_params(tensors_path, tensors, model)
    opt_state = _optimizer_state(meta_path, meta, tensors, optimizer)
    rng = _checked_rng(tensors_path, meta_path, meta, tensors)
    with torch.no_grad():
        for param, value in params:
            param.copy_(shard_like(value, param))
    try:
        optimizer.load_state_dict(opt_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise _refuse(meta_path, f"its optimizer state does not load ({type(e).__name__}: {e})") from None
    torch.set_rng_state(rng.torch_state)
    random.setstate(rng.python_state)
    if rng.cuda_states and torch.cuda.is_available() and len(rng.cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng.cuda_states)
    return Resumed(meta["step"], history)
