"""The package's import graph has no cycles (issue 21: "Import graph: no cycles").

Read with :mod:`ast`, nothing imported: every ``import`` and ``from ... import`` of a module of
``nightstack``, at the top or inside a function (a deferred import that breaks a cycle at run
time is still a cycle in the design); those under ``if TYPE_CHECKING:`` are left out (they never
run).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import nightstack

PACKAGE = Path(nightstack.__file__).parent


def _modules() -> dict[str, Path]:
    """``nightstack.x.y`` -> its file, for every module of the package."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _import_statements(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement among ``statements`` and the statements nested in them (function
    and class bodies, branches, ``try``, ``with``), but not under ``if TYPE_CHECKING:``; only
    statements are visited (an import is one), which keeps the walk fast."""
    for node in statements:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _import_statements(node.orelse)
        else:
            for block in ("body", "orelse", "finalbody"):
                yield from _import_statements(getattr(node, block, []))
            for clause in [*getattr(node, "handlers", []), *getattr(node, "cases", [])]:
                yield from _import_statements(clause.body)  # except ...: and case ...:


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in _import_statements(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # submodules
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


@cache
def _package_graph() -> dict[str, frozenset[str]]:
    """Module -> the package's modules it imports (parsed once for every test)."""
    modules = _modules()
    return {name: frozenset(_imports(name, path, modules)) for name, path in modules.items()}


def _graph(prefix: str) -> dict[str, set[str]]:
    """The import graph among the modules whose names start with ``prefix``."""
    graph = _package_graph()
    return {m: {i for i in graph[m] if i.startswith(prefix)} for m in graph if m.startswith(prefix)}


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_modules_import_each_other_without_a_cycle() -> None:
    graph = _graph("nightstack")
    assert "nightstack.stacking.live" in graph and "nightstack.web.server" in graph
    assert _cycles(graph) == []


STAGES = [
    ("nightstack", "nightstack.arrays", "nightstack.errors", "nightstack.formats",
     "nightstack.memory", "nightstack.address", "nightstack.config", "nightstack.frames"),
    ("nightstack.io",),
    ("nightstack.registration",),
    ("nightstack.stacking",),
    ("nightstack.calibration",),
    ("nightstack.products", "nightstack.solve"),
    ("nightstack.pipeline", "nightstack.capture"),
    ("nightstack.service",),
    ("nightstack.web", "nightstack.simulate"),
    ("nightstack.cli", "nightstack.demo"),
]  # fmt: skip
"""The package's layers, bottom first (docs/architecture.md): a module imports only from its
own layer's packages or the layers below."""


def _stage(module: str) -> int:
    best, found = -1, -1
    for n, names in enumerate(STAGES):
        for name in names:
            inside = module.startswith(name + ".") and name != "nightstack"
            if (module == name or inside) and len(name) > best:
                best, found = len(name), n
    return found


def test_every_module_has_a_stage_and_imports_only_downward() -> None:
    graph = _graph("nightstack")
    unplaced = [m for m in graph if _stage(m) < 0]
    assert unplaced == []
    upward = sorted(
        f"{m} -> {i}" for m, imports in graph.items() for i in imports if _stage(i) > _stage(m)
    )
    assert upward == []
