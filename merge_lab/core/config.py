"""The one YAML -> pydantic loader: every error names the file, the line, the key and what to do.

Merge recipes, align recipes and compare files all load here, and every block validated later
(a strategy's parameters, a `train:` block) formats its errors with the same `Where`, so users
see one style of message whichever file they got wrong.

Files may come from strangers: only plain YAML is read (no tags that build objects), and a
document whose aliases would expand to far more nodes than the file holds (a "billion laughs"
file, a few lines that take minutes to walk) is refused before anything walks it.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from merge_lab.errors import MergeLabError

M = TypeVar("M", bound=BaseModel)
# Most nodes a document may stand for once its aliases are expanded, as a multiple of the nodes
# it spells out (plus a floor for small files that reuse an anchor a few times).
ALIAS_EXPANSION = 20
ALIAS_FLOOR = 10_000


@dataclass(frozen=True)
class Where:
    """Where a key of a loaded file is: its line, for error messages."""

    source: str = "<input>"
    lines: dict[tuple, int] = field(default_factory=dict, compare=False)

    def line(self, *path: Any) -> int | None:
        for n in range(len(path), -1, -1):
            if tuple(path[:n]) in self.lines:
                return self.lines[tuple(path[:n])]
        return None

    def __call__(self, *path: Any) -> str:
        """'recipe.yaml, line 7 (models.1.parameters.weight)'."""
        line = self.line(*path)
        key = ".".join(str(p) for p in path)
        place = f"{self.source}, line {line}" if line else self.source
        return f"{place} ({key})" if key else place


def _line_map(root: yaml.Node) -> dict[tuple, int]:
    """Key path -> line, for every key and list item the file spells out (aliases not followed)."""
    out: dict[tuple, int] = {}
    stack: list[tuple[yaml.Node, tuple]] = [(root, ())]
    seen: set[int] = set()
    while stack:
        node, path = stack.pop()
        out.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:  # an alias: its own keys are mapped where the anchor is
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.start_mark.line)
                out[path + (key,)] = k.start_mark.line + 1
                stack.append((v, path + (key,)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, path + (i,)) for i, v in enumerate(node.value))
    return out


def expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(nodes written in the file, nodes the document stands for with aliases expanded), in
    linear time: each distinct node is sized once."""
    size: dict[int, int] = {}
    order: list[yaml.Node] = []
    stack = [root]
    while stack:  # distinct nodes, children after parents
        node = stack.pop()
        if id(node) in size:
            continue
        size[id(node)] = 0
        order.append(node)
        if isinstance(node, yaml.MappingNode):
            stack.extend(x for kv in node.value for x in kv)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    for node in reversed(order):
        children = (
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode)
            else node.value if isinstance(node, yaml.SequenceNode) else []
        )
        size[id(node)] = 1 + sum(size[id(c)] for c in children)
    return len(order), size[id(root)]


def load_yaml_text(text: str, source: str, what: str = "file") -> tuple[Any, Where]:
    """Plain YAML data and its line map; errors name the file."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                return None, Where(source)
            written, expanded = expanded_size(node)
            if expanded > max(ALIAS_FLOOR, ALIAS_EXPANSION * written):
                raise MergeLabError(
                    f"{source}: its YAML aliases expand {written} written nodes into {expanded}; a {what} "
                    "has no need of that. Write the values out instead of nesting aliases."
                )
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        raise MergeLabError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise MergeLabError(f"{source}: nested too deeply to be a {what}.") from None
    return data, Where(source, _line_map(node))


def _unwrap(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through Optional, unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None and not isinstance(annotation, types.UnionType):
        return []
    return [m for a in typing.get_args(annotation) for m in _unwrap(a)]


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """Valid keys of the object at `loc` inside `model`, for 'did you mean' hints."""
    models = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt = []
        for m in models:
            f = m.model_fields.get(part) or next((f for f in m.model_fields.values() if f.alias == part), None)
            if f is not None:
                nxt += _unwrap(f.annotation)
        models = nxt
    return sorted({(f.alias or n) for m in models for n, f in m.model_fields.items()})


def error_lines(error: ValidationError, where: Where, model: type[BaseModel], prefix: tuple = ()) -> list[str]:
    """One line per pydantic error: file, line, key path, what is wrong, the closest valid key."""
    out = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        full = prefix + loc
        place = where(*full) if full else where.source
        last = str(loc[-1]) if loc else ""
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(last, allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            out.append(f"{place}: unknown key '{last}'.{hint} Allowed here: {', '.join(allowed)}.")
        elif err["type"] == "missing":
            out.append(f"{place}: missing required key '{last}'.")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 120 else type(got).__name__
            out.append(f"{place}: {err['msg']} (got {shown}).")
    return out


def validate(model: type[M], data: Any, where: Where, what: str, prefix: tuple = ()) -> M:
    """`model` from `data` (a whole file, or the block at `prefix` of one), with line-aware errors."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = error_lines(e, where, model, prefix)
        if len(lines) == 1:
            raise MergeLabError(f"invalid {what}: {lines[0]}") from None
        raise MergeLabError(f"invalid {what}:\n  " + "\n  ".join(lines)) from None


def parse_yaml(text: str, source: str, model: type[M], what: str) -> tuple[M, Where]:
    """Validate YAML `text` against `model`; returns the object and where each key is."""
    data, where = load_yaml_text(text, source, what)
    if not isinstance(data, dict):
        raise MergeLabError(f"{source}: a {what} is a YAML mapping of keys to values.")
    return validate(model, data, where, what), where


def read_text(path: str | Path, what: str) -> str:
    """A YAML file's text; a missing or unreadable file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"{path}: {what} not found.")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MergeLabError(f"{path}: cannot be read as a UTF-8 text file ({type(e).__name__}).") from None


def load_yaml(path: str | Path, model: type[M], what: str) -> tuple[M, Where]:
    """parse_yaml on a file."""
    return parse_yaml(read_text(path, what), str(path), model, what)
