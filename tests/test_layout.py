"""The package's shape: imports go one way (no module imports one that imports it back, lazily or not)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "softprune"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports() -> dict[str, set[str]]:
    """Every softprune module -> the softprune modules it imports anywhere in its file."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {  # imports under "if TYPE_CHECKING:" are for annotations and never run
            id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
            for stmt in block.body for n in ast.walk(stmt)
        }  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                for alias in node.names:  # "from .graph import handlers" names a module
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")
                if target in modules:
                    found.add(target)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in modules}
        edges[name] = found - {name}
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def _is_parent_package(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_the_package_has_no_import_cycle():
    edges = _imports()
    # a package's __init__ importing its own submodules, and a submodule importing a sibling through
    # its package, are how packages work; a cycle is a module that imports one that imports it back
    edges = {m: {n for n in targets if not _is_parent_package(n, m) and not _is_parent_package(m, n)}
             for m, targets in edges.items()}  # fmt: skip
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_is_over_700_lines():
    """A module a reader takes in at once; a longer one has two subjects (split it where they part)."""
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 700} == {}
