"""The package's layers: every import points down (or stays in its layer), and no module imports itself
back through others. Lazy imports inside functions count: they run too.

    data → model → checkpoints → eval → train → the notebook entry points (launch, preflight, runs)

with `wmtp_lib.config` and `wmtp_lib.registry` (what ``params/`` holds) and `wmtp_lib.provenance` (which code
runs) below everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wmtp_lib"
LAYERS = {"config": 0, "registry": 0, "provenance": 0, "data": 1, "model": 2, "checkpoints": 3, "eval": 4, "train": 5,
          "launch": 6, "preflight": 6, "runs": 6, "notebook_files": 6}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package modules it imports (anywhere in its body)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import (the layer checks read absolute ones)")
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from wmtp_lib.train import loop` imports the submodule wmtp_lib.train.loop
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                  and isinstance(node.args[0].value, str) and node.args[0].value.startswith("wmtp_lib.")):
                targets = [node.args[0].value]  # importlib.import_module("wmtp_lib....") and the like
            else:
                continue
            found |= {t for t in targets if t in modules and t not in (name, package.name)}
        graph[name] = found
    return graph


def layer_of(module: str) -> int:
    """The layer of ``wmtp_lib.<top>...``; a module no layer names is an error, so new code gets placed."""
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYERS:
        raise KeyError(f"{module}: no layer for wmtp_lib.{top} (add it to LAYERS in tests/test_layers.py)")
    return LAYERS[top]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, deps in graph.items() for b in deps if layer_of(b) > layer_of(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_module_has_a_layer():
    for module in package_imports():
        if module != "wmtp_lib":
            layer_of(module)


def test_imports_point_down():
    assert upward_imports(package_imports()) == []


def test_no_import_cycle():
    assert import_cycles(package_imports()) == []


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """A planted upward import and a planted circle are found (the checks above can fail)."""
    pkg = tmp_path / "wmtp_lib"
    for sub in ("model", "train", "checkpoints"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "heads.py").write_text("def f():\n    from wmtp_lib.train import loop\n")
    (pkg / "train" / "loop.py").write_text("from wmtp_lib.model.heads import f\n")
    (pkg / "checkpoints" / "a.py").write_text("import importlib\nimportlib.import_module('wmtp_lib.checkpoints.b')\n")
    (pkg / "checkpoints" / "b.py").write_text("from wmtp_lib.checkpoints.a import x\n")
    graph = package_imports(pkg)
    assert upward_imports(graph) == ["wmtp_lib.model.heads (layer 2) imports wmtp_lib.train.loop (layer 5)"]
    assert sorted(import_cycles(graph)) == [["wmtp_lib.checkpoints.a", "wmtp_lib.checkpoints.b"],
                                            ["wmtp_lib.model.heads", "wmtp_lib.train.loop"]]
    with pytest.raises(KeyError, match="no layer for wmtp_lib.other"):
        layer_of("wmtp_lib.other.x")
    (pkg / "train" / "loop.py").write_text("from ..model.heads import f\n")
    with pytest.raises(AssertionError, match="relative import"):
        package_imports(pkg)
