"""Every Python block of the README and of docs/ runs, in order, one namespace per file."""

import importlib
import inspect
import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The API reference pages hold mkdocstrings directives, not code: their examples are the
# docstrings' own, run by the doctests.
PAGES = [
    ROOT / "README.md",
    *sorted(p for p in (ROOT / "docs").rglob("*.md") if p.parent.name != "api"),
]
API = ROOT / "docs" / "api"
MODULES = {
    "optstate": "optstate.md",
    "optstate.schedules": "schedules.md",
    "optstate.implicit": "implicit.md",
    "optstate.checkpoint": "checkpoint.md",
    "optstate.interop.optax": "interop-optax.md",
    "optstate.interop.torch": "interop-torch.md",
}
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_code_blocks_run(page):
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page.name} has no python blocks"
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    x64 = jax.config.jax_enable_x64  # a page may turn float64 on (recipes.md): for itself only
    # Documentation shows everyday code, written without the suite's strict promotion rules.
    try:
        with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
            for i, block in enumerate(blocks):
                code = compile(block, f"{page.name}[block {i}]", "exec")
                exec(code, namespace)
    finally:
        jax.config.update("jax_enable_x64", x64)


def test_every_rule_is_in_the_rules_table():
    import optstate as ost

    table = (ROOT / "docs" / "rules.md").read_text()
    rules = [
        name
        for name in dir(ost)
        if isinstance(getattr(ost, name), type)
        and issubclass(getattr(ost, name), ost.Rule)
        and name != "Rule"
    ]
    assert len(rules) >= 30
    missing = [name for name in rules if f"| `{name}(" not in table]
    assert not missing, f"rules missing from docs/rules.md: {missing}"


@pytest.mark.parametrize("module", list(MODULES))
def test_every_public_name_has_an_api_entry(module):
    """The API reference documents each name of a public module's ``__all__`` (its anchor is
    ``module.name``), and nothing that is not public."""
    imported = importlib.import_module(module)
    page = (API / MODULES[module]).read_text()
    entries = set(re.findall(rf"^::: {re.escape(module)}\.(\w+)$", page, re.MULTILINE))
    submodules = {n for n in imported.__all__ if inspect.ismodule(getattr(imported, n))}
    assert entries == set(imported.__all__) - submodules


def test_every_page_is_in_the_site():
    """A page under docs/ that mkdocs.yml's nav does not list would be built but unreachable."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    missing = sorted(p for p in pages if f": {p}" not in nav)
    assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


# -- docstrings of the public names ------------------------------------------------------------

# Names not yet complete (none): the test fails as soon as one of them is, so that it leaves
# this list.
PENDING: dict[str, set[str]] = {}
# Public modules whose namespace still shows internals (none).
PENDING_NAMESPACES: set[str] = set()


def _public_objects() -> list[tuple[str, object]]:
    """Every class and function of the public modules' ``__all__``, as ``module.name``."""
    found = []
    for module in MODULES:
        imported = importlib.import_module(module)
        for name in imported.__all__:
            obj = getattr(imported, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                found.append((f"{module}.{name}", obj))
    return found


def _has_parameters(obj: object) -> bool:
    """Whether calling ``obj`` takes arguments (errors and warnings take their message only)."""
    if inspect.isclass(obj) and issubclass(obj, BaseException):
        return False
    try:
        signature = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in signature.parameters.values())


def missing_sections(obj: object) -> set[str]:
    """What the docstring of a public class or function lacks: a runnable example, and for one
    that takes arguments an ``Args:`` section (``Attributes:`` for a NamedTuple, whose fields are
    its arguments; a class made only by a function, ``State`` by ``setup``, says so with "Made
    by ``...``" instead)."""
    doc = inspect.getdoc(obj) or ""
    missing = set()
    if not re.search(r"^\s*>>> ", doc, re.MULTILINE):
        missing.add("an example")
    made_by_a_function = inspect.isclass(obj) and "Made by ``" in doc
    # A NamedTuple's arguments are its fields, which the API reference shows as attributes.
    section = "Attributes" if inspect.isclass(obj) and hasattr(obj, "_fields") else "Args"
    if _has_parameters(obj) and not made_by_a_function and f"\n{section}:\n" not in f"\n{doc}":
        missing.add(f"an {section} section")
    return missing


PUBLIC = _public_objects()


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=[name for name, _ in PUBLIC])
def test_every_public_name_has_an_example_and_args(name, obj):
    """Every public class and function has a doctest (run by ``python -m pytest optstate``) and,
    where it takes arguments, an ``Args:`` section, which the API reference shows."""
    missing = missing_sections(obj)
    if name in PENDING:
        assert missing == PENDING[name], f"{name} is complete now: remove it from PENDING"
    else:
        assert not missing, f"the docstring of {name} lacks {' and '.join(sorted(missing))}"


def test_the_docstring_check_can_fail():
    def undocumented(x: int) -> int:
        """Twice ``x``."""
        return 2 * x

    def documented(x: int) -> int:
        """Twice ``x``.

        Args:
            x: a number.

        Examples:
            >>> documented(2)
            4
        """
        return 2 * x

    assert missing_sections(undocumented) == {"an example", "an Args section"}
    assert missing_sections(documented) == set()
    assert missing_sections(ValueError) == {"an example"}


@pytest.mark.parametrize("module", list(MODULES))
def test_public_modules_show_only_their_public_names(module):
    """``dir()`` of a public module shows its ``__all__`` (and its public submodules); its
    internals have a leading underscore."""
    imported = importlib.import_module(module)
    shown = {
        n
        for n in dir(imported)
        if not n.startswith("_") and not inspect.ismodule(getattr(imported, n))
    }
    internals = shown - set(imported.__all__)
    if module in PENDING_NAMESPACES:
        assert internals, f"{module} shows only its public names now: remove it from the list"
    else:
        assert not internals, f"dir({module}) shows internals: {sorted(internals)}"
