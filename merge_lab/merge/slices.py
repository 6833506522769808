"""mergekit's `slices:`, laid out from headers: which input tensor of each source makes each output tensor.

Semantics of mergekit 0.1.5: output slice k's j-th layer merges layer a_s + j of every source s
(a_s the start of its `layer_range`); output layers are numbered consecutively across slices;
a parameter gradient runs across the slice (t = j / (length - 1), 1 for a one-layer slice), and
tensors outside the layers have t = 0. The embeddings are merged over the first slice's sources
with its parameters, the other non-layer tensors (final norm, lm_head) over the last slice's.
The output config is the base model's (else the first source's) with `num_hidden_layers` set
to the total; per-layer list fields (`layer_types`) follow the layers they describe, which
mergekit leaves alone.

With `tokenizer_source` / `tokenizer:`, the output vocabulary is built over every model the
recipe names (the base first), as mergekit's BuildTokenizer gathers them, and each vocabulary
tensor is re-indexed over the sources of the slice it comes from (mergekit's PermutedVocabulary
sees only that slice's tensors): a token none of those sources has gets a zero row, one only
one of them has takes its row, and the base's row wins only when the base is among them.

Only names and shapes are decided here; the planner turns each row into a merge op, so a slice
costs no more memory than a `models:` merge.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from merge_lab.core.architecture import LAYER_PATTERN, Role, classify, is_vocab_tensor, num_layers
from merge_lab.core.checkpoint import Checkpoint
from merge_lab.errors import MergeLabError
from merge_lab.merge.recipe import Recipe
from merge_lab.merge.tokenizer import OutputVocabulary, build_output_vocabulary

# config.json fields holding one entry per decoder layer
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


@dataclass(frozen=True)
class SliceTensor:
    """One output tensor of a sliced recipe: the slice whose sources and parameters make it, its
    gradient position, and each source's input tensor name (in the slice's source order)."""

    output: str
    slice: int
    t: float
    inputs: tuple[str, ...]


def at_layer(name: str, layer: int) -> str:
    """The same tensor name in another decoder layer."""
    return LAYER_PATTERN.sub(f".layers.{layer}.", name, count=1)


def check_ranges(recipe: Recipe, sources: list[list[Checkpoint]]) -> None:
    """Every layer range inside its model's layers (config.json), all problems at once."""
    assert recipe.slices is not None
    problems = []
    for k, s in enumerate(recipe.slices):
        for i, (src, ckpt) in enumerate(zip(s.sources, sources[k])):
            n = num_layers(ckpt.config)
            a, b = src.layer_range
            if b > n:
                problems.append(
                    f"{recipe.where('slices', k, 'sources', i, 'layer_range')}: [{a}, {b}] asks for layers {a} .. {b - 1} "
                    f"of '{src.model}', which has {n} layer(s) (0 .. {n - 1}); end the range at {n} at most."
                )
    if problems:
        raise MergeLabError("layer ranges outside their models:\n  " + "\n  ".join(problems))


def layout(recipe: Recipe, sources: list[list[Checkpoint]], aligned_vocab: bool = False) -> list[SliceTensor]:
    """Every output tensor in order (embeddings, the layers slice by slice, the rest), checked
    against every source's headers: each input tensor present with the first source's shape (with
    `aligned_vocab`, vocabulary tensors may differ in their rows: they are re-indexed by token)."""
    assert recipe.slices is not None
    check_ranges(recipe, sources)
    problems: list[str] = []
    rows: list[SliceTensor] = []

    def add(output: str, k: int, t: float, names: list[str]) -> None:
        first = sources[k][0]
        shape = first.info(names[0]).shape
        for i, (ckpt, n) in enumerate(zip(sources[k], names)):
            if n not in ckpt:
                problems.append(f"{recipe.where('slices', k, 'sources', i)}: {ckpt.path} has no tensor '{n}'.")
            elif ckpt.info(n).shape != shape and not (aligned_vocab and is_vocab_tensor(n)
                                                      and ckpt.info(n).shape[1:] == shape[1:]):
                problems.append(
                    f"{recipe.where('slices', k, 'sources', i)}: tensor '{n}' of {ckpt.path} has shape "
                    f"{ckpt.info(n).shape}, but '{names[0]}' of {first.path} has {shape}."
                )
        rows.append(SliceTensor(output, k, t, tuple(names)))

    def outside(k: int, embedding: bool) -> None:
        for n in sources[k][0].tensors:
            info = classify(n)
            if info.layer is None and (info.role == Role.EMBEDDING) == embedding:
                add(n, k, 0.0, [n] * len(sources[k]))

    outside(0, True)
    out_layer = 0
    for k, s in enumerate(recipe.slices):
        starts = [src.layer_range[0] for src in s.sources]
        by_layer: dict[int, list[str]] = {}
        for n in sources[k][0].tensors:
            layer = classify(n).layer
            if layer is not None:
                by_layer.setdefault(layer, []).append(n)
        for j in range(s.length):
            t = j / (s.length - 1) if s.length > 1 else 1.0
            names = by_layer.get(starts[0] + j, [])
            if not names:
                problems.append(f"{recipe.where('slices', k, 'sources', 0)}: {sources[k][0].path} has no tensors "
                                f"of layer {starts[0] + j}.")
            for n in names:
                add(at_layer(n, out_layer), k, t, [at_layer(n, a + j) for a in starts])
            out_layer += 1
    outside(len(recipe.slices) - 1, False)
    if problems:
        raise MergeLabError("the slices do not fit their models:\n  " + "\n  ".join(problems[:20]))
    return rows


def sliced_config(recipe: Recipe, sources: list[list[Checkpoint]], config: dict) -> dict:
    """`config` with the layer count of the slices and per-layer fields following their layers."""
    assert recipe.slices is not None
    out = dict(config)
    total = sum(s.length for s in recipe.slices)
    target = out["text_config"] if "num_hidden_layers" not in out and isinstance(out.get("text_config"), dict) else out
    if target is not out:
        target = out["text_config"] = dict(target)
    target["num_hidden_layers"] = total
    for key in PER_LAYER_FIELDS:
        if not isinstance(target.get(key), list):
            continue
        values = []
        for k, s in enumerate(recipe.slices):
            src_cfg = sources[k][0].config
            field = src_cfg.get(key, (src_cfg.get("text_config") or {}).get(key))
            a = s.sources[0].layer_range[0]
            if not isinstance(field, list) or len(field) < a + s.length:
                values = None
                break
            values += field[a : a + s.length]
        if values is None:
            del target[key]  # transformers rebuilds it from the layer count
        else:
            target[key] = values
    return out


def sliced_vocabulary(recipe: Recipe, base: Checkpoint | None, sources: list[list[Checkpoint]]
                      ) -> OutputVocabulary | None:
    """The output vocabulary of a sliced recipe with tokenizer keys (None without them): over the
    base and every distinct source model (each opened once: the same Checkpoint object)."""
    assert recipe.slices is not None
    if recipe.tokenizer is None and recipe.tokenizer_source is None:
        return None
    members: list[Checkpoint] = [base] if base is not None else []
    refs: list[str] = [recipe.base_model or ""] if base is not None else []
    for s, row in zip(recipe.slices, sources):
        for src, ckpt in zip(s.sources, row):
            if all(ckpt is not m for m in members):
                members.append(ckpt)
                refs.append(src.model)
    return build_output_vocabulary(recipe, members, refs, 0 if base is not None else None)


def slice_vocabulary(vocab: OutputVocabulary, members: list[Checkpoint]) -> OutputVocabulary:
    """`vocab` seen by one slice's sources (`members`, in source order): their permutations, and
    the base only when it is one of them, as mergekit's PermutedVocabulary sees a slice's tensors."""
    index = [next(i for i, m in enumerate(vocab.members) if m is c) for c in members]
    base = next((j for j, i in enumerate(index) if i == vocab.base_index), None)
    return replace(vocab, members=list(members), refs=[vocab.refs[i] for i in index], base_index=base,
                   permutations=[vocab.permutations[i] for i in index],
                   originals=[vocab.originals[i] for i in index])
