"""The package's import graph (from the source, function-level imports included): no cycles, layers one way."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftlab"

# What a layer must never import (module-name prefixes): data flows recipe -> task -> engine -> run folder -> report.
FORBIDDEN = {
    "peftlab.models": ("peftlab.tasks", "peftlab.engines", "peftlab.training", "peftlab.runner", "peftlab.report",
                       "peftlab.cli", "peftlab.sweep", "peftlab.distributed"),
    "peftlab.data": ("peftlab.tasks", "peftlab.engines", "peftlab.models", "peftlab.training", "peftlab.runner",
                     "peftlab.report", "peftlab.cli"),
    "peftlab.engines": ("peftlab.tasks.sft", "peftlab.tasks.classify", "peftlab.tasks.diffusion",
                        "peftlab.training", "peftlab.runner", "peftlab.report", "peftlab.cli", "peftlab.sweep"),
    "peftlab.tasks": ("peftlab.training", "peftlab.runner", "peftlab.cli", "peftlab.sweep", "peftlab.matrix",
                      "peftlab.report.compare", "peftlab.report.html", "peftlab.registry"),
    "peftlab.watch": ("peftlab.report", "peftlab.registry", "peftlab.tasks", "peftlab.engines", "peftlab.training",
                      "peftlab.runner", "peftlab.cli"),
    "peftlab.config": ("peftlab.tasks.sft", "peftlab.tasks.classify", "peftlab.tasks.diffusion", "peftlab.models",
                       "peftlab.engines", "peftlab.training", "peftlab.runner", "peftlab.report", "peftlab.cli"),
}


# The bottom layer: what everything may use (one-line errors, redaction, the console), importing nothing above it.
BOTTOM = {"peftlab.errors", "peftlab.secrets", "peftlab.watch.console"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"


def imported(path: Path, known: set[str]) -> set[str]:
    """Package modules `path` imports anywhere (top level or inside functions), except `if TYPE_CHECKING:`
    blocks, which never run. `from a import b` is an edge to a.b when that is a module, else to a."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                target = f"{node.module}.{alias.name}"
                found.add(target if target in known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source() -> None:
    edges = graph()
    assert "peftlab.training" in edges["peftlab.runner"]  # a function-level import counts
    assert "peftlab.tasks.registry" in edges["peftlab.config"]
    assert not edges["peftlab.errors"]


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_one_way() -> None:
    wrong = [f"{module} imports {target}" for module, targets in graph().items() for target in sorted(targets)
             for layer, forbidden in FORBIDDEN.items()
             if (module == layer or module.startswith(layer + ".")) and target.startswith(forbidden)]
    assert not wrong, "; ".join(wrong)


def test_the_bottom_layer_imports_only_itself() -> None:
    edges = graph()
    assert {module: edges[module] - BOTTOM for module in BOTTOM} == {module: set() for module in BOTTOM}
