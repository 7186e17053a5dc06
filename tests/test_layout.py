"""The package's shape (docs/development.md): stage folders over a shared base, imports that point one
way, no import circles. Read from the source (every import, at the top or inside a function), so a
change that breaks the layering fails here rather than in a reader's head."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kilm_ray"

# What each part may import (besides itself). The base is below every stage; stages import the base and
# the stages before them in the product's order only; the top (the command line, the demo, the job
# entry points) may use everything. A top-level module not listed here fails the test: say where it goes.
BASE = {"errors", "storage", "cluster", "config", "method", "model", "store"}
ALLOWED = {
    "errors": set(),
    "storage": {"errors"},
    "cluster": {"errors"},
    "config": {"errors"},
    "method": {"errors"},
    "model": {"errors", "config", "method", "storage"},
    "store": {"errors", "config", "method", "storage"},
    "data": BASE,
    "train": BASE,
    "tune": BASE | {"train"},  # a trial is a training run (Ray Tune over Ray Train)
    "eval": BASE | {"data"},  # the dataset's evaluation tables and knowledge-base readers
    "serve": BASE,
    "cli": None, "demo": None, "jobs": None,  # the top: anything
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the kilm_ray modules it imports (``from a import b`` counts ``a.b`` when that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges.update(t for t in targets if t in modules and t != name and t != "kilm_ray")
        graph[name] = edges
    return graph


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(import_graph()) == []


def test_stages_import_the_base_and_earlier_stages_only():
    wrong = []
    for module, targets in import_graph().items():
        part = _part(module)
        if part == "":
            continue  # kilm_ray/__init__.py: the version only
        assert part in ALLOWED, f"{module}: a part docs/development.md does not place (add it to ALLOWED)"
        allowed = ALLOWED[part]
        if allowed is None:
            continue
        wrong += [f"{module} -> {t}" for t in targets if _part(t) != part and _part(t) not in allowed]
    assert wrong == []


def test_the_checker_sees_a_circle_and_a_sideways_import():
    """The checks above can fail: a circle and a stage importing another stage are both found."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    graph = import_graph()
    assert "kilm_ray.method.masking" in graph["kilm_ray.store.loader"]
    assert _part("kilm_ray.serve.app") == "serve" and "train" not in ALLOWED["serve"]


def test_no_forwarding_modules():
    """Every module defines something: none only re-exports names that moved elsewhere."""
    stubs = []
    for name, path in _modules().items():
        tree = ast.parse(path.read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        if body and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
            stubs.append(name)
    assert stubs == []
