"""No import cycle among the project's modules (``bnrewrite/`` and ``passes/``, installed as
``bnrewrite.passes``), counting imports inside functions too: a lazy import that breaks a cycle
is a cycle all the same. Also: the library never imports its applications (``bnrewrite.apps``)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = ((ROOT / "bnrewrite", "bnrewrite"), (ROOT / "passes", "bnrewrite.passes"))


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package)."""
    mods = {}
    for base, prefix in TREES:
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = (path, is_pkg)
    return mods


def import_graph() -> dict[str, set[str]]:
    """Edges ``importer -> imported`` between project modules. ``from pkg import name`` points at
    ``pkg.name`` when that is a module, else at ``pkg``; imports in any scope count."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        edges.add(sub)
                    elif target in mods:
                        edges.add(target)
        edges.discard(name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_walk_sees_lazy_imports():
    """The checker itself: it finds a cycle made only of function-level imports."""
    graph = {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert find_cycles(graph) == [["a", "b"]]
    real = import_graph()
    assert "bnrewrite.passes.fx" in real["bnrewrite.backend"]  # imported inside functions only
    assert "bnrewrite.passes.vdn_rules" in real["bnrewrite.passes.vdn_analysis"]


def test_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert cycles == [], f"import cycles: {cycles}"


def test_library_does_not_import_the_applications():
    graph = import_graph()
    library = [m for m in graph if not m.startswith("bnrewrite.apps") and m != "bnrewrite.cli"]
    offenders = {m: sorted(e for e in graph[m] if e.startswith("bnrewrite.apps")) for m in library}
    assert {m: e for m, e in offenders.items() if e} == {}
