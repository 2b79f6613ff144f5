"""No import cycle inside peftkit, function-level and type-only imports included: a cycle hidden inside a
function still means two modules that cannot be understood (or typed, or moved) one without the other."""

import ast
from pathlib import Path

import peftkit

ROOT = Path(peftkit.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for file in ROOT.rglob("*.py"):
        parts = file.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the peftkit modules it imports anywhere in its text (`from a.b import c` counts a.b, and a.b.c
    when c is a module)."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                group.append(other)
                if other == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_peftkit_has_no_import_cycle():
    assert cycles(import_graph()) == []


def test_contributings_map_names_every_module():
    """CONTRIBUTING's layout tables name each module (a package's files may be named by its folder)."""
    text = (ROOT.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    unnamed = [
        str(path.relative_to(ROOT.parent))
        for path in sorted(ROOT.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and f"`{path.relative_to(ROOT.parent)}`" not in text
        and f"`{path.parent.relative_to(ROOT.parent)}/`" not in text
    ]
    assert unnamed == [], "add these to CONTRIBUTING.md's layout tables"
