"""The benchmarks in bench/: each has ``--help`` and a ``--quick`` run, and the figures in
docs/performance.md are bench/run.py's own output, regenerated from the run it stored.

Targets are the benchmark's business, never timed assertions here: a quick run only has to run,
report every row and write what it is asked to.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
PERFORMANCE = ROOT / "docs" / "performance.md"
STORED = ROOT / "docs" / "bench.json"
ROWS = {"a", "a'", "b", "b'", "c", "c'", "c''", "d", "d'", "e"} | {
    "f" + "'" * primes for primes in range(4)
}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name[:-3]}", BENCH / name)
    assert spec is not None, name
    assert spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def run(script: str, *args: str, timeout: float) -> str:
    """``python bench/<script> <args>`` as a user runs it from the checkout (this checkout's
    optstate, one CPU device, the user's dtype promotion), its standard output."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env |= {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_scripts_are_the_three_known() -> None:
    # A new script gets its --help and --quick tests by being listed here.
    assert SCRIPTS == ["prototypes.py", "run.py", "torch_adam.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_options_and_measures_nothing(
    script: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = load(script).main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert "--quick" in out
    assert "-h, --help" in out


def test_prototypes_quick_run() -> None:
    out = run("prototypes.py", "--quick", timeout=60)
    assert "update on 50 leaves of 32x32" in out
    for name in ("Adam", "group Adam", "optax"):
        assert re.search(rf"^   {name} +\d+ ", out, re.MULTILINE), out
    # The stand-in rule computes Adam: one step from the same start agrees to float32 rounding.
    difference = float(re.search(r"results differ by ([0-9.e+-]+) at most", out)[1])  # type: ignore[index]
    assert difference < 1e-6


def test_torch_adam_quick_run() -> None:
    out = run("torch_adam.py", "--quick", timeout=60)
    assert "--quick" in out
    for measure in ("optstate update_ / torch.optim.Adam(foreach=True)", "overhead"):
        assert measure in out
    assert re.search(r"\b(PASS|MISS)$", out, re.MULTILINE), out


def check_rows(figures: dict[str, Any], out: str | None = None) -> None:
    """Every row, each ratio and verdict right by hand; with ``out``, each row printed."""
    rows = {row["key"]: row for row in figures["rows"]}
    assert set(rows) == ROWS
    for key, row in rows.items():
        assert out is None or f"\n{key:3} " in out
        assert math.isfinite(row["ratio"])
        assert row["ratio"] > 0
        assert row["ratio"] == pytest.approx(row["optstate"] / row["reference"], rel=1e-12)
        expected = (
            "info" if row["target"] is None else "PASS" if row["ratio"] <= row["target"] else "MISS"
        )
        assert row["result"] == expected
        assert row["shapes"]
    assert rows["b'"]["target"] == 0.67


def table_cells(table: str) -> dict[str, list[str]]:
    """The cells of each row of a markdown table, by the row's key (its first cell)."""
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header, *body = ([cell.strip() for cell in line[2:-2].split(" | ")] for line in rows)
    assert header == [
        "row", "measure", "leaf shapes", "optstate", "reference", "unit", "ratio", "spread",
        "target", "result",
    ]  # fmt: skip
    return {cells[0]: cells for cells in body}


def check_table(table: str, figures: dict[str, Any]) -> None:
    """The markdown table holds every row's figures, as read back by hand."""
    m = figures["machine"]
    first = table.splitlines()[0]
    assert first.startswith(f"Measured {figures['date']} by `python bench/run.py")
    for fact in (f"{m['nproc']} cores of {m['cpu']}", f"Python {m['python']}", f"jax {m['jax']}"):
        assert fact in first
    for library in ("numpy", "optax", "torch"):
        assert f"{library} {m[library]}" in first
    cells = table_cells(table)
    assert set(cells) == {row["key"] for row in figures["rows"]}
    for row in figures["rows"]:
        _key, what, shapes, mine, theirs, unit, ratio, _spread, target, result = cells[row["key"]]
        assert (what, shapes, unit, result) == (
            row["what"],
            row["shapes"],
            row["unit"],
            row["result"],
        )
        assert float(mine) == pytest.approx(row["optstate"], rel=1e-3)
        assert float(theirs) == pytest.approx(row["reference"], rel=1e-3)
        assert float(ratio) == pytest.approx(float(mine) / float(theirs), rel=2e-3, abs=1e-3)
        assert target == ("-" if row["target"] is None else f"<= {row['target']:g}")


def test_run_quick_writes_json_markdown_and_figure(tmp_path: Path) -> None:
    out_json, figure = tmp_path / "bench.json", tmp_path / "bench.png"
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n\nbefore\n<!-- bench:begin -->\nan old table\n<!-- bench:end -->\nafter\n"
    )
    out = run(
        "run.py",
        *("--quick", "--json", str(out_json), "--markdown", str(page), "--figure", str(figure)),
        timeout=120,
    )
    figures = json.loads(out_json.read_text())
    check_rows(figures, out)
    assert figures["quick"] is True
    assert figures["machine"]["jax"] == jax.__version__
    text = page.read_text()
    assert text.startswith("# A page\n\nbefore\n<!-- bench:begin -->\nMeasured ")
    assert text.endswith("|\n<!-- bench:end -->\nafter\n")
    assert "an old table" not in text
    table = text.split("<!-- bench:begin -->\n")[1].split("<!-- bench:end -->")[0]
    check_table(table, figures)
    assert "--quick" in table.splitlines()[0]
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --from-json measures nothing and writes the same table; a file without markers is whole.
    again = tmp_path / "again.md"
    run("run.py", "--from-json", str(out_json), "--markdown", str(again), timeout=60)
    assert again.read_text() == table


def test_markers_out_of_order_are_refused_and_the_page_kept(tmp_path: Path) -> None:
    run_py = load("run.py")
    page = tmp_path / "page.md"
    text = "<!-- bench:end -->\n<!-- bench:begin -->\n"
    page.write_text(text)
    with pytest.raises(ValueError, match=r"page.md must hold one <!-- bench:begin --> and, after"):
        run_py.write_markdown(page, "| a table |\n")
    assert page.read_text() == text


# -- the figures the docs show ---------------------------------------------------------------


def test_the_docs_table_is_the_stored_runs_table() -> None:
    """docs/performance.md's table, between its markers, is exactly what bench/run.py's markdown
    writer makes of the figures stored beside it (docs/bench.json): regenerated, not edited."""
    run_py = load("run.py")
    figures = json.loads(STORED.read_text())
    assert figures["quick"] is False
    assert figures["only"] == "abcdef"
    check_rows(figures)
    page = PERFORMANCE.read_text()
    assert page.count(run_py.BEGIN) == 1
    assert page.count(run_py.END) == 1
    shown = run_py.between_markers(page)
    assert shown == run_py.markdown(figures), (
        "docs/performance.md's table is not bench/run.py's output for docs/bench.json: run "
        "`python bench/run.py --from-json docs/bench.json --markdown docs/performance.md`"
    )
    check_table(shown, figures)


def test_the_docs_show_the_stored_runs_chart() -> None:
    chart = ROOT / "docs" / "images" / "bench.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert chart.stat().st_size < 200_000
    assert "](images/bench.png)" in PERFORMANCE.read_text()
