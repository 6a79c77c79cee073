"""Every Python block of the README and of docs/ runs, in order, one namespace per file."""

import re
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
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
