"""How serve_app's modules fit together: no import cycles.

Imports are read from the source (ast), function-level ones included, since a lazy import
is still a dependency; only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "serve_app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def imports(path: Path, modules: set[str]) -> set[str]:
    """serve_app modules that `path` imports (a package import counts as its __init__)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            # The longest serve_app module the name refers to (`from x import y` may name a
            # module y or an attribute of module x).
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != me and name != PACKAGE:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = list((REPO / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "serve_app.registry" in graph["serve_app.config"]
    assert "serve_app.deployments.segmenters" not in graph["serve_app.app"]  # by path only
    # Function-level imports count.
    assert "serve_app.models.sam.prompt" in graph["serve_app.deployments.segmenters"]


def test_no_import_cycle_in_serve_app():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between serve_app's subpackages (a top-level module is its own)."""

    def top(module: str) -> str:
        return ".".join(module.split(".")[:2])

    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        packages.setdefault(top(module), set()).update(
            top(d) for d in deps if top(d) != top(module)
        )
    return packages


def test_no_import_cycle_between_subpackages():
    """E.g. models -> rendering -> models: the layers of the data path import one way."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, " -> ".join(cycle)
