"""The project's import graph keeps data flowing one way (issue 14).

Every import statement of every module under the project's packages is read from the source (the
AST, so imports inside functions and under `if TYPE_CHECKING:` count too: a lazy import is still a
dependency), and resolved to the project module it names. Nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("blend", "store", "retriever", "proto", "services")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module `name` is, or lies in (`store.chunks.ChunkStore` -> `store.chunks`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """The project modules `module` imports anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module `pkg.sub` when there is one, else names of `pkg`.
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _violations(sources: str, targets: tuple[str, ...]) -> list[str]:
    def inside(module: str, prefix: str) -> bool:
        return module == prefix or module.startswith(prefix + ".")

    return [f"{module} imports {target}" for module, imported in sorted(GRAPH.items()) if inside(module, sources)
            for target in sorted(imported) if any(inside(target, t) for t in targets)]


def test_the_walk_sees_the_project():
    # Guards the test itself: a walk that found no modules or no imports would pass every rule below.
    assert {"blend.fusor", "store.tiered", "retriever.sources", "services.serving.engine"} <= set(MODULES)
    assert "store.tier" in GRAPH["store.tiered"] and "blend.cache" in GRAPH["store.chunks"]


def test_no_import_cycle_among_the_projects_modules():
    cycles = _cycles(GRAPH)
    assert not cycles, "import cycles (modules that import each other, directly or not): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("sources,targets", [
    ("blend", ("store", "retriever", "services")),  # pure compute: tensors in, tensors out
    ("store", ("services",)),
    ("services.serving", ("services.bench", "services.commands")),  # the server runs no bench, no CLI
])
def test_dependencies_point_one_way(sources, targets):
    found = _violations(sources, targets)
    assert not found, f"{sources} must not import {', '.join(targets)}: " + "; ".join(found)
