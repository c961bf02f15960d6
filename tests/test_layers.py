"""The design holds: no import circle in src/tunelab, nothing imports upward, no stage imports another.

Read statically from the source (every import, also those inside functions), so the check costs
no imports and fails on the commit that breaks the layering.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"__main__": 0, "cli": 0, "commands": 0, "stages": 1}  # the interface (0) above stages (1) above building blocks (2)
WHOLE_RUNS = {("tunelab.stages.kfold", "tunelab.stages.sft"), ("tunelab.stages.quickstart", "tunelab.stages.sft")}
"""A stage may call another stage only as a whole run (k-fold trains ordinary SFT runs)."""


def modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "tunelab").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module → the tunelab modules it imports. `from package import submodule` is an edge to
    the submodule alone (not to the package's __init__)."""
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], *([base] if base else [])])
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in mods]
                targets = submodules if len(submodules) == len(node.names) else [base, *submodules]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("tunelab") and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            if component:
                found.append(sorted([node, *component]))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[1] if "." in module else "", 2)


def test_no_import_circle():
    assert cycles(import_graph()) == []


def test_nothing_imports_upward_and_no_stage_imports_another():
    graph = import_graph()
    upward = [(a, b) for a, targets in graph.items() for b in targets if layer(b) < layer(a)]
    assert upward == []
    sideways = [(a, b) for a, targets in graph.items() for b in targets
                if a.startswith("tunelab.stages.") and b.startswith("tunelab.stages.") and (a, b) not in WHOLE_RUNS]
    assert sideways == []


def test_the_check_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
