"""Test helpers, public for plugin authors: tiny checkpoints and the strategy contract suite.

A plugin author checks a strategy with

    from merge_lab.testing import check_strategy
    def test_my_strategy(tmp_path):
        check_strategy("my_strategy", tmp_path)

which runs every contract (identity, order symmetry, shapes and dtypes, determinism, the same
result streamed in row blocks, loads in transformers with finite logits) on tiny Llama
checkpoints made on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from merge_lab import registry
from merge_lab.checkpoint import Checkpoint

ARCHITECTURES = ("llama", "mistral", "qwen2")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(arch: str = "llama", vocab_size: int = 96, layers: int = 2, tie: bool = False):
    """A few-kilobyte config of one of the common decoder families."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    return cls(**common)


def save_tiny_tokenizer(path: str | Path, vocab_size: int = 96) -> None:
    """A byte-level-ish character tokenizer with a ChatML template, saved in HF format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars[: vocab_size - len(specials)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def make_checkpoint(
    path: str | Path,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shards: bool = True,
    vocab_size: int = 96,
    base: str | Path | None = None,
    noise: float = 0.02,
    tie: bool = False,
    tokenizer: bool = True,
    layers: int = 2,
) -> Path:
    """Save a tiny random model (several safetensors shards by default).

    With `base`, the model is that checkpoint plus seeded noise of scale `noise` on every tensor:
    a stand-in for a fine-tune of the base.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    torch.manual_seed(seed)
    config = tiny_config(arch, vocab_size, layers=layers, tie=tie)
    model = AutoModelForCausalLM.from_config(config)
    if base is not None:
        src = Checkpoint(base)
        g = torch.Generator().manual_seed(seed + 1000)
        sd = model.state_dict()
        with torch.no_grad():
            for name, t in sd.items():
                if name not in src:
                    continue
                b = src.get(name).to(torch.float32)
                rows = min(b.shape[0], t.shape[0]) if b.dim() else 1
                if b.shape[1:] == t.shape[1:]:  # equal shapes, or vocabularies of different sizes
                    t[:rows] = b[:rows] + noise * torch.randn(b[:rows].shape, generator=g)
    model = model.to(dtype)
    model.save_pretrained(str(path), max_shard_size="20KB" if shards else "10GB")
    if tokenizer:
        save_tiny_tokenizer(path, vocab_size)
    return path


def logits(path: str | Path, text_ids: list[int] | None = None) -> torch.Tensor:
    """Logits of a checkpoint on a fixed token sequence, loaded as a user would."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    ids = torch.tensor([text_ids or [1, 5, 9, 17, 33, 40, 2]])
    with torch.no_grad():
        return model(ids).logits


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    return {n: ckpt.get(n).clone() for n in ckpt.tensors}


# ---------------------------------------------------------------- the contract suite


def _contract_recipe(cls: type[registry.Strategy], models: list[Path], base: Path | None, params: dict) -> dict:
    recipe: dict = {"merge_method": cls.name, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        recipe["base_model"] = str(base)
    model_keys = registry.recipe_keys(cls.ModelParams)
    recipe["parameters"] = {k: v for k, v in params.items() if k not in model_keys}
    for entry in recipe["models"]:
        entry["parameters"] = {k: v for k, v in params.items() if k in model_keys}
    return recipe


def _run(recipe: dict, folder: Path, name: str) -> Path:
    from merge_lab.engine import merge

    path = write_recipe(folder / f"{name}.yaml", recipe)
    return merge(path, folder / name, progress=False, hash_inputs=False).path


def check_strategy(name: str, workdir: str | Path, arch: str = "llama") -> None:
    """Run the strategy contract; raises AssertionError naming the contract that fails."""
    cls = registry.get(name)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = make_checkpoint(work / "base", arch, seed=0, dtype=torch.bfloat16)
    a = make_checkpoint(work / "a", arch, seed=1, dtype=torch.bfloat16, base=base)
    b = make_checkpoint(work / "b", arch, seed=2, dtype=torch.bfloat16, base=base)
    c = make_checkpoint(work / "c", arch, seed=3, dtype=torch.bfloat16, base=base)
    with_base = cls.needs_base or cls.uses_base

    # 1. identity: one model with weight 1 (or the strategy's identity parameters) gives it back
    ident = _run(_contract_recipe(cls, [a], base if with_base else None, cls.identity_params), work, "identity")
    expected, got = load_tensors(a), load_tensors(ident)
    assert set(got) == set(expected), f"{name}: identity merge changed the tensor names"
    for n in expected:
        assert got[n].dtype == expected[n].dtype, f"{name}: identity merge changed dtype of {n}"
        assert torch.equal(got[n], expected[n]), f"{name}: identity merge changed tensor {n}"

    # 2. shapes and dtypes preserved; 3. deterministic for a seed
    k = 3 if cls.max_models is None else cls.max_models - (1 if with_base else 0)
    inputs = [a, b, c][: max(k, cls.min_models)]
    recipe = _contract_recipe(cls, inputs, base if with_base else None, {})
    recipe["seed"] = 7
    first, second = _run(recipe, work, "run1"), _run(recipe, work, "run2")
    t1, t2, ref = load_tensors(first), load_tensors(second), load_tensors(a)
    for n in ref:
        assert t1[n].shape == ref[n].shape and t1[n].dtype == ref[n].dtype, f"{name}: shape/dtype of {n} changed"
        assert torch.equal(t1[n], t2[n]), f"{name}: two runs with the same seed differ at {n}"

    # 4. symmetric strategies ignore the order of the models
    if cls.symmetric and len(inputs) > 1:
        rev = _contract_recipe(cls, list(reversed(inputs)), base if with_base else None, {})
        rev["seed"] = 7
        t3 = load_tensors(_run(rev, work, "reversed"))
        for n in ref:
            torch.testing.assert_close(t3[n], t1[n], rtol=1e-2, atol=1e-3, msg=f"{name}: order changed {n}")

    # 5. strategies that stream in row blocks (row_separable, with or without statistics passes)
    # give what they give on whole tensors: blocks forced far smaller than the tiny tensors
    if cls.row_separable:
        from merge_lab import engine

        chunk = engine.CHUNK_ELEMENTS
        engine.CHUNK_ELEMENTS = 64
        try:
            t4 = load_tensors(_run(recipe, work, "blocked"))
        finally:
            engine.CHUNK_ELEMENTS = chunk
        for n in ref:
            torch.testing.assert_close(t4[n], t1[n], rtol=1e-2, atol=1e-3, msg=f"{name}: row blocks changed {n}")

    # 6. the output loads in transformers and gives finite logits
    out = logits(first)
    assert torch.isfinite(out).all(), f"{name}: merged model gives non-finite logits"
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["model_type"] == arch
