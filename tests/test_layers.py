"""The package's layers: every import (including those inside functions) points to the same
layer or a lower one, and no modules import each other in a circle.

Lowest first::

    L0 method         errors, files, params, losses, sampler, trainer, results, private_apis
    L1 data/modeling  data, run, baselines, plots
    L2 trainables     trainables.dynsdpb, trainables.distributed
    L3 orchestration  search_space, searching, storage, state, tracking, experiment, report, tuning,
                      console, sweep, compare, export, validate
    L4 interface      cli

``tune_dynsdpb/__init__.py`` may re-export L0/L1 only. A module missing from the tree (e.g.
``params`` before its branch is merged) is simply not checked.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ("L0 method", ["errors", "files", "params", "losses", "sampler", "trainer", "results", "private_apis"]),
    ("L1 data/modeling", ["data", "run", "baselines", "plots"]),
    ("L2 trainables", ["trainables.dynsdpb", "trainables.distributed"]),
    ("L3 orchestration", ["search_space", "searching", "storage", "state", "tracking", "experiment", "report",
                          "tuning", "console", "sweep", "compare", "export", "validate"]),
    ("L4 interface", ["cli"]),
]
PACKAGE = "tune_dynsdpb"


def _qualified(name: str) -> str:
    return name if name.startswith("trainables") else f"{PACKAGE}.{name}"


LAYER_OF = {_qualified(m): i for i, (_, mods) in enumerate(LAYERS) for m in mods}
LAYER_OF[PACKAGE] = 1  # __init__: L0/L1 re-exports only
LAYER_OF["trainables"] = 2


def modules() -> dict[str, Path]:
    """Every module of tune_dynsdpb/ and trainables/ by dotted name (packages by their own name)."""
    out = {}
    for top in (PACKAGE, "trainables"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = modules()


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> str | None:
    """The project module ``name`` is or lies in (``a.b.c`` -> ``a.b`` if that is ours), or None."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def imports_of(module: str) -> dict[str, int]:
    """The project modules ``module`` imports (anywhere in its body) -> the line of the first import."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            # `from . import results` imports the module results; `from .x import y` the module x
            targets = [f"{base}.{a.name}" if _known(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                       for a in node.names]
        for t in targets:
            found = _known(t)
            if found and found != module:
                out.setdefault(found, node.lineno)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def _where(src: str, dst: str) -> str:
    return f"{MODULES[src].relative_to(ROOT)}:{GRAPH[src][dst]}: {src} -> {dst}"


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if m not in LAYER_OF)
    assert not unplaced, f"modules with no layer (add them to LAYERS): {unplaced}"
    assert "tune_dynsdpb.sweep" in GRAPH and GRAPH["tune_dynsdpb.cli"], "the walk found no imports"


def test_no_upward_import():
    bad = []
    for src, deps in GRAPH.items():
        for dst in deps:
            if dst in LAYER_OF and src in LAYER_OF and LAYER_OF[dst] > LAYER_OF[src]:
                bad.append(f"{_where(src, dst)} ({LAYERS[LAYER_OF[src]][0]} imports {LAYERS[LAYER_OF[dst]][0]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edges_within(comp: list[str]) -> list[str]:
    return [_where(s, d) for s in comp for d in GRAPH[s] if d in comp]


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_no_import_circle(layer):
    """No circle anywhere (packages excluded: ``__init__`` re-exports its own modules by design)."""
    graph = {s: {d: ln for d, ln in deps.items() if d not in (PACKAGE, "trainables")}
             for s, deps in GRAPH.items() if s not in (PACKAGE, "trainables")}
    idx = [n for n, _ in LAYERS].index(layer)
    circles = [c for c in _cycles(graph) if any(LAYER_OF.get(m) == idx for m in c)]
    assert not circles, "import circles:\n" + "\n".join(" | ".join(_edges_within(c)) for c in circles)


def test_the_walk_sees_function_level_and_relative_imports():
    # experiment imports trainables.dynsdpb inside functions, and `from . import results as R` is a module
    assert "trainables.dynsdpb" in GRAPH["tune_dynsdpb.experiment"]
    assert "tune_dynsdpb.results" in GRAPH["tune_dynsdpb.searching"]
    assert "tune_dynsdpb.search_space" in GRAPH["tune_dynsdpb.searching"]
    assert "tune_dynsdpb.results" in GRAPH["trainables.dynsdpb"]


def test_the_circle_finder_finds_circles():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {"e": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]


def imports_inside_functions(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every import statement inside a function of ``path``."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    found = set()
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.update(sub.lineno for sub in ast.walk(node) if isinstance(sub, (ast.Import, ast.ImportFrom)))
    return [(n, lines[n - 1].strip()) for n in sorted(found)]


def test_an_import_inside_a_function_says_why():
    """Imports sit at the top of a module. One inside a function says on its line why it waits: a
    measured import cost only some calls need, Ray before ``set_ray_env``, an optional extra."""
    bare = [f"{path.relative_to(ROOT)}:{n}: {line}" for path in MODULES.values()
            for n, line in imports_inside_functions(path) if "#" not in line]
    assert not bare, "imports inside functions without their reason (move them to the top, or say why):\n" + \
        "\n".join(bare)


def test_the_import_check_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\n\ndef f():\n    if True:\n        import json\n    import sys  # here: why\n")
    assert imports_inside_functions(f) == [(6, "import json"), (7, "import sys  # here: why")]
