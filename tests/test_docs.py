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
