"""vaedist's import graph has no cycle. Built statically (ast over vaedist/**/*.py, nothing imported):
an edge A -> B for each `import`/`from ... import` of B in A, counted in two kinds. Module-level
imports (run when A is imported; `if TYPE_CHECKING:` blocks left out) must form no cycle at all.
Imports inside functions are a module's way to defer a dependency, not to hide a cycle: with them
counted too, there must be none either."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vaedist"

def _modules(package: Path) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


@functools.lru_cache(maxsize=1)
def import_graph(package: Path = PACKAGE) -> dict[str, dict[str, set[str]]]:
    """{"module": {A: {B, ...}}, "function": {...}}: the vaedist modules each module imports."""
    modules = _modules(package)

    def resolve(name: str) -> str | None:  # a.b.C (a name in module a.b) -> a.b
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, set[str]]] = {"module": {}, "function": {}}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]

        def add(kind: str, target: str | None) -> None:
            if target and target != module:
                graph[kind].setdefault(module, set()).add(target)

        def visit(node: ast.AST, kind: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                inner = "function" if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) else kind
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        if alias.name.split(".")[0] == "vaedist":
                            add(kind, resolve(alias.name))
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:  # relative: from the module's own package up
                        up = package
                        for _ in range(child.level - 1):
                            up = up.rpartition(".")[0]
                        base = f"{up}.{base}".rstrip(".")
                    if base.split(".")[0] == "vaedist":
                        for alias in child.names:
                            sub = f"{base}.{alias.name}"
                            add(kind, sub if sub in modules else resolve(base))
                visit(child, inner)

        visit(ast.parse(path.read_text(), str(path)), "module")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert "vaedist.config" in graph["module"]["vaedist.model"]  # from vaedist.config import ...
    assert "vaedist.data.manifest" in graph["module"]["vaedist.data.shards"]
    assert "vaedist.storage" in graph["module"]["vaedist.lineage"]  # from vaedist import storage
    assert "vaedist.analyses" in graph["function"]["vaedist.tracking"]  # inside a function only
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_level_import_cycle():
    assert cycles(import_graph()["module"]) == []


def test_no_import_cycle_counting_imports_inside_functions_but_the_known_one():
    graph = import_graph()
    both = {m: graph["module"].get(m, set()) | graph["function"].get(m, set())
            for m in graph["module"].keys() | graph["function"].keys()}
    assert cycles(both) == []
