"""The package's shape: every module imports on its own, and no two modules import each other.

An import cycle between modules works until someone imports them in the other order (a partly
initialised module, an AttributeError at import time), and it says two modules hold one job.
The graph is built from module-level `import` / `from` statements with `ast`; imports inside
functions (deferred on purpose, to keep torch out of light commands) and under
`if TYPE_CHECKING:` (never executed) are not edges.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

# Cycles in modules other engineers own, known when this test was written; each entry is one
# cycle (its modules, sorted). Empty: none is known.
KNOWN_CYCLES: set[tuple[str, ...]] = set()

_LIST_AND_IMPORT = """
import importlib, json, pkgutil, sys
import merge_lab, merge_lab.strategies
mods = {}
for pkg, prefix in ((merge_lab, "merge_lab."), (merge_lab.strategies, "merge_lab.strategies.")):
    mods[pkg.__name__] = pkg.__file__
    for info in pkgutil.walk_packages(pkg.__path__, prefix):
        spec = importlib.util.find_spec(info.name)
        mods[info.name] = spec.origin
failed = {}
for name in sorted(mods):
    if name == "merge_lab.__main__":  # runs the CLI when imported
        continue
    try:
        importlib.import_module(name)
    except Exception as e:
        failed[name] = f"{type(e).__name__}: {e}"
print(json.dumps({"modules": mods, "failed": failed}))
"""


@pytest.fixture(scope="module")
def package() -> dict:
    """Every module of merge_lab (merge_lab.strategies included), each imported in one fresh
    interpreter, so no import done by the test session hides an ordering problem."""
    out = subprocess.run([sys.executable, "-c", _LIST_AND_IMPORT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported (also inside module-level try/if)."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                stack += node.body
            stack += node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            stack += node.body
    return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `modules` it imports at module level."""
    graph: dict[str, set[str]] = {}
    for name, origin in modules.items():
        is_package = origin.endswith("__init__.py")
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in _module_level_imports(ast.parse(Path(origin).read_text(), origin)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                # `from pkg import sub` imports the submodule; any other name comes from pkg itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[tuple[str, ...]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _path(graph: dict[str, set[str]], component: tuple[str, ...]) -> str:
    """One closed import path through a cycle, for the message: a -> b -> a."""
    start, members = component[0], set(component)
    trail, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[trail[-1]] if w in members)
        back = [w for w in nxt if w == start]
        if back and len(trail) > 1:
            return " -> ".join(trail + [start])
        fresh = [w for w in nxt if w not in seen]
        if not fresh:
            return " <-> ".join(component)
        trail.append(fresh[0])
        seen.add(fresh[0])


def test_every_module_imports_in_a_fresh_interpreter(package):
    assert len(package["modules"]) > 40  # the walk found the package, strategies included
    assert "merge_lab.strategies.ties" in package["modules"] and "merge_lab.training.chat" in package["modules"]
    assert package["failed"] == {}


def test_no_import_cycle_between_modules(package):
    graph = import_graph(package["modules"])
    found = cycles(graph)
    unexpected = [c for c in found if c not in KNOWN_CYCLES]
    assert not unexpected, "import cycle(s): " + "; ".join(_path(graph, c) for c in unexpected)


def test_the_cycle_finder_finds_a_cycle_and_ignores_deferred_imports(tmp_path):
    """The checker itself: a planted a -> b -> a cycle is found; the same edge inside a function
    or under TYPE_CHECKING is not one."""
    files = {
        "pkg.a": "from pkg import b\n",
        "pkg.b": "import pkg.a\n",
        "pkg.c": "def f():\n    import pkg.d\n",
        "pkg.d": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\nfrom . import e\n",
        "pkg": "from pkg.e import x\n",
        "pkg.e": "x = 1\n",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / f"{name.replace('.', '_')}.py"
        path.write_text(text)
        modules[name] = str(path)
    graph = import_graph(modules)
    assert graph["pkg.d"] == {"pkg.e"} and graph["pkg.c"] == set()  # a submodule, not its package
    assert cycles(graph) == [("pkg.a", "pkg.b")]
    assert _path(graph, ("pkg.a", "pkg.b")) == "pkg.a -> pkg.b -> pkg.a"
