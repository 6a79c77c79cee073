"""docs/recipes.md's table of defaults, checked against the installed libraries.

Every entry of the form ``name(arg=value, ...)`` in the optstate, optax and torch.optim columns
must be the default of ``arg`` in ``inspect.signature(name)`` (``required``: no default), so the
table cannot drift from optax and torch as they change. The page's code blocks, with their
comparisons of optstate, optax and torch.optim, run in tests/test_docs.py.
"""

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import optax
import pytest
import torch

import optstate as ost

PAGE = Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
CALL = re.compile(r"`([\w.]+)\((.*?)\)`")
COLUMNS = {1: "optstate", 2: "optax", 3: "torch.optim"}
REQUIRED = inspect.Parameter.empty


def table_rows() -> list[list[str]]:
    text = PAGE.read_text().split("## Defaults that differ", 1)[1]
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def resolve(column: str, name: str) -> Any:
    roots = {"optstate": [ost], "optax": [optax], "torch.optim": [torch.optim, torch]}[column]
    for root in roots:
        obj: Any = root
        for part in name.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise AssertionError(f"{column} has no {name}")


def entries(cell: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls ``name(arg=value)`` of a cell, with ``required`` read as "no default"."""
    out = []
    for name, args in CALL.findall(cell):
        call = ast.parse(f"f({args})", mode="eval").body
        assert isinstance(call, ast.Call)
        assert not call.args, f"{name}({args}): write arguments by name"
        values = {}
        for kw in call.keywords:
            if isinstance(kw.value, ast.Name) and kw.value.id == "required":
                values[kw.arg] = REQUIRED
            else:
                values[kw.arg] = ast.literal_eval(kw.value)
        out.append((name, values))
    return out


def mismatches(column: str, cell: str) -> list[str]:
    wrong = []
    for name, values in entries(cell):
        params = inspect.signature(resolve(column, name)).parameters
        for arg, value in values.items():
            if arg not in params:
                wrong.append(f"{column}: {name} has no argument {arg!r}")
            elif params[arg].default != value:
                actual = params[arg].default
                wrong.append(f"{column}: {name}({arg}=...) is {actual!r}, not {value!r}")
    return wrong


ROWS = table_rows()


def test_the_table_covers_the_differences_that_matter() -> None:
    assert len(ROWS) >= 15
    settings = " ".join(row[0] for row in ROWS)
    for topic in ("AdamW's weight decay", "AdaGrad's initial accumulator", "RMSProp", "Lion"):
        assert topic in settings


@pytest.mark.parametrize("row", ROWS, ids=[row[0] for row in ROWS])
def test_defaults_table_matches_the_installed_libraries(row: list[str]) -> None:
    assert len(row) == 5, row
    wrong = []
    for index, column in COLUMNS.items():
        cell = row[index]
        assert cell == "-" or entries(cell), f"{column}: {cell!r} is neither `-` nor a call"
        wrong += mismatches(column, cell)
    assert not wrong, wrong


def test_a_wrong_entry_is_caught() -> None:
    """The check can fail: torch's AdamW decay written into optax's column, a misspelt argument."""
    assert mismatches("optax", "`adamw(weight_decay=0.01)`") == [
        "optax: adamw(weight_decay=...) is 0.0001, not 0.01"
    ]
    assert mismatches("torch.optim", "`Adagrad(initial_accumulator=0)`") == [
        "torch.optim: Adagrad has no argument 'initial_accumulator'"
    ]
    assert mismatches("optstate", "`ClipGlobalNorm(max_norm=1.0)`") == [
        "optstate: ClipGlobalNorm(max_norm=...) is <class 'inspect._empty'>, not 1.0"
    ]
