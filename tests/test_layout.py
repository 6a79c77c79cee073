"""The package's layout holds (docs/architecture.md): no import cycle (function-level imports
included), no private name taken from another module, the core naming no bridge, and files and
functions that read in one sitting."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "optstate"
MODULES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in sorted(PACKAGE.rglob("*.py"))
}
# Modules that know model kinds and bridges by name: the bridges themselves and the public face.
BRIDGES = ("optstate.interop", "optstate.implicit")
FACE = {"optstate"}


def imports(module: str) -> list[tuple[str, str]]:
    """Every ``from X import name`` of ``module``, at any depth, as (X, name) with X absolute."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found += [(target, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return [(t, n) for t, n in found if t == "optstate" or t.startswith("optstate.")]


def edges(module: str) -> set[str]:
    out = set()
    for target, name in imports(module):
        out.add(f"{target}.{name}" if f"{target}.{name}" in MODULES else target)
    return out & set(MODULES)


def test_no_import_cycle():
    graph = {m: edges(m) for m in MODULES}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n] if n in path else [m, n]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if not state.get(n):
                visit(n, [*path, n])
        state[m] = 2

    for m in MODULES:
        if not state.get(m):
            visit(m, [m])


def test_no_private_name_crosses_modules():
    crossing = [
        f"{m} imports {name} from {target}"
        for m in MODULES
        for target, name in imports(m)
        if name.startswith("_")
        and not name.startswith("__")
        and f"{target}.{name}" not in MODULES  # a private module is fine: its names are its API
        and target != m
    ]
    assert not crossing, crossing


def test_the_core_names_no_bridge():
    """Bridges plug in through optstate._models; only they and the public face name them."""
    core = [m for m in MODULES if m not in FACE and not m.startswith(BRIDGES)]
    naming = [f"{m} imports {t}" for m in core for t in edges(m) if t.startswith(BRIDGES)]
    assert not naming, naming


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_read_in_one_sitting(module):
    """No module over 500 lines; no function over 60 lines of code (docstring, comments and
    blank lines aside)."""
    source = MODULES[module].read_text()
    lines = source.splitlines()
    assert len(lines) <= 500, f"{module} has {len(lines)} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0]
            docstring = isinstance(first, ast.Expr) and isinstance(
                getattr(first, "value", None), ast.Constant
            )
            start = first.end_lineno + 1 if docstring else first.lineno
            code = [
                line
                for line in lines[start - 1 : node.end_lineno]
                if line.strip() and not line.strip().startswith("#")
            ]
            assert len(code) <= 60, f"{module}.{node.name} has {len(code)} lines of code"
