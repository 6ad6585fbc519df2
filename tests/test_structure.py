"""The code's structure: dependencies point down (no import cycle, counting the imports inside
functions too), and no function grows past what one screen explains."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PKG = Path(__file__).resolve().parents[1] / "simcost"
MAX_FUNCTION_LINES = 120


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in PKG.rglob("*.py")}


def _resolve(name: str, modules) -> str | None:
    """The simcost module an import names (``simcost.a.b`` or its package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> nx.DiGraph:
    modules = _modules()
    g = nx.DiGraph()
    g.add_nodes_from(modules)
    for mod, tree in modules.items():
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith("simcost"):
                    continue
                dep = _resolve(t, modules)
                # a package's __init__ importing its own submodules is its interface, not a cycle
                if dep and dep != mod and not dep.startswith(mod + "."):
                    g.add_edge(mod, dep)
    return g


def test_no_import_cycles():
    g = import_graph()
    cycles = list(nx.simple_cycles(g))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])


def test_no_function_over_the_limit():
    long = []
    for mod, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name} ({n} lines)")
    assert not long, "functions over %d lines: %s" % (MAX_FUNCTION_LINES, ", ".join(long))
