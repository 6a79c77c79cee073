"""The examples: every import of examples/ is installed by the ``examples`` extra, every example
is run by a test and answers ``--help``; the main one (examples/tied_autoencoder.py) runs and shows
what the README says it shows."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest itself requires tomli before Python 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXAMPLE = ROOT / "examples" / "tied_autoencoder.py"
STEPS = 60


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tied_autoencoder", EXAMPLE)
    assert spec is not None, EXAMPLE
    assert spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str]:
    """The example's figures and printed text, its figure saved in a temporary directory."""
    figure = tmp_path_factory.mktemp("figure") / "tied_autoencoder.png"
    argv = ["--steps", str(STEPS), "--quiet", "--figure", str(figure)]
    out = io.StringIO()
    # The example is user code under JAX's default dtype promotion: optax.adam itself computes
    # ``b1 ** count`` (a Python float to an int32 power), which the suite's strict promotion
    # (conftest.py) rejects. Rank promotion stays "raise".
    with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(out):
        figures: dict[str, Any] = load_example().main(argv)
    return figures, out.getvalue()


@pytest.fixture(scope="module")
def figures(run: tuple[dict[str, Any], str]) -> dict[str, Any]:
    return run[0]


def test_import_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    load_example()
    assert capsys.readouterr().out == ""


def test_optstate_trains(figures: dict[str, Any]) -> None:
    assert figures["optstate_train_loss"] < 0.5 * figures["optstate_initial_loss"]
    assert np.isfinite(figures["optstate_test_loss"])


def test_optstate_keeps_the_tie(figures: dict[str, Any]) -> None:
    assert figures["optstate_tie_drift"] == 0.0
    # ost.jit returns the tied weight as one array: checked after every step, no retie needed.
    assert figures["optstate_one_array_every_step"] is True


def test_optax_per_position_breaks_the_tie(figures: dict[str, Any]) -> None:
    assert figures["optax_tie_drift"] > 0.0


def test_optstate_matches_single_parameter_reference(figures: dict[str, Any]) -> None:
    # Both runs are Adam on the same summed gradient; they differ only in float32 rounding (optax
    # forms 1 - beta in float64, optstate in float32), which can move a parameter by about one
    # ulp per step. Allow twice that over the whole run, relative to the largest parameter.
    tolerance = 2 * STEPS * float(np.finfo(np.float32).eps)  # 1.4e-5 for 60 steps
    assert figures["max_rel_diff_to_reference"] < tolerance
    assert figures["optstate_train_loss"] == pytest.approx(figures["reference_train_loss"], 1e-4)
    # The rounding gap is orders of magnitude below what per-position Adam does to the tie.
    assert figures["max_diff_to_reference"] < 1e-3 * figures["optax_tie_drift"]


def test_the_comparison_is_fair(figures: dict[str, Any]) -> None:
    # By hand: a 64 x 32 weight, a 32-bias and a 64-bias; untied, a second 32 x 64 weight.
    assert figures["tied_parameters"] == 64 * 32 + 32 + 64 == 2144
    assert figures["optax_parameters"] == 2 * 64 * 32 + 32 + 64 == 4192
    assert figures["untied_parameters"] == 4192
    assert figures["untied_train_loss"] < 0.5 * figures["untied_initial_loss"]
    assert np.isfinite(figures["untied_test_loss"])


def test_the_curves_are_the_runs(figures: dict[str, Any]) -> None:
    curves = figures["curves"]
    assert set(curves) == {"optstate", "reference", "optax", "untied"}
    assert all(len(curve) == STEPS + 1 for curve in curves.values())
    for run in ("optstate", "optax"):  # both start from the same tied weights
        assert curves[run][0] == pytest.approx(figures["optstate_initial_loss"], rel=1e-6)
        assert curves[run][-1] == pytest.approx(figures[f"{run}_train_loss"], rel=1e-6)
    assert curves["untied"][0] == figures["untied_initial_loss"]
    np.testing.assert_allclose(curves["optstate"], curves["reference"], rtol=1e-4)
    drift = figures["optax_tie_drift_curve"]
    assert len(drift) == STEPS + 1
    assert drift[0] == 0.0
    assert drift[-1] == pytest.approx(figures["optax_tie_drift"], rel=1e-6)


def test_the_figure_is_written(figures: dict[str, Any]) -> None:
    assert Path(figures["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_text_explains_the_lower_loss_and_the_tie(run: tuple[dict[str, Any], str]) -> None:
    figures, out = run
    said = " ".join(out.split())
    assert "4,192 free weights, not 2,144" in said
    assert (
        f"reaches {figures['untied_train_loss']:.5f} (test {figures['untied_test_loss']:.5f})"
        in said
    )
    assert "after every step dec.w holds enc.w's array itself (ost.jit" in said
    assert "False" not in out


# -- every example ---------------------------------------------------------------------------


def requirement_name(requirement: str) -> str:
    """The distribution a requirement names, normalised (PEP 503): ``"optstate[torch]"`` ->
    ``"optstate"``, ``"scikit-learn>=1.3"`` -> ``"scikit-learn"``."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match[1]).lower()


def examples_extra() -> set[str]:
    """The distributions ``pip install optstate[examples]`` installs by name: the runtime
    dependencies and the ``examples`` extra, with the extras of optstate it names expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names, todo, seen = set(), [*project["dependencies"], *extras["examples"]], set()
    while todo:
        requirement = todo.pop()
        name = requirement_name(requirement)
        if name == "optstate":
            inner = re.search(r"\[(.*?)\]", requirement)
            for extra in inner[1].split(",") if inner else []:
                if extra.strip() not in seen:
                    seen.add(extra.strip())
                    todo += extras[extra.strip()]
        else:
            names.add(name)
    return names


def top_level_imports(source: str) -> set[str]:
    """The first name of every absolute import in ``source``, at any depth (a lazy import inside
    a function needs its distribution as much as one at the top)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def not_in_the_extra(source: str) -> list[str]:
    """The imports of ``source`` that neither the standard library, optstate, its runtime
    dependencies nor the ``examples`` extra provide, each with the distribution it comes from."""
    allowed = examples_extra()
    providers = importlib.metadata.packages_distributions()
    missing = []
    for name in sorted(top_level_imports(source) - set(sys.stdlib_module_names) - {"optstate"}):
        dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(name, [])}
        if not dists & allowed:
            missing.append(
                f"{name} (from {', '.join(sorted(dists)) or 'no installed distribution'})"
            )
    return missing


def test_the_extra_lists_the_distributions_by_hand() -> None:
    # Read by hand from pyproject.toml: a change there is a change to what users install.
    assert {"torch", "scikit-learn", "tqdm", "matplotlib", "optax", "equinox", "flax"} <= (
        examples_extra()
    )
    assert {"numpy", "jax", "jaxlib"} <= examples_extra()
    assert "hypothesis" not in examples_extra()  # the test extra's, not the examples'


def test_an_import_the_extra_lacks_is_caught() -> None:
    source = "import json\nimport numpy as np\ndef f():\n    from hypothesis import given\n"
    assert not_in_the_extra(source) == ["hypothesis (from hypothesis)"]
    assert not_in_the_extra("import optstate\nfrom sklearn.datasets import load_digits\n") == []


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_import_of_the_examples_comes_with_the_extra(example: Path) -> None:
    missing = not_in_the_extra(example.read_text())
    assert not missing, (
        f"examples/{example.name} imports {', '.join(missing)}, which the `examples` extra of "
        "pyproject.toml does not install"
    )


def test_there_are_eight_examples() -> None:
    # A new example is run by a test and listed in RUN_BY (and in the README).
    assert [p.name for p in EXAMPLES] == sorted(RUN_BY)


# Where each example is run (its quick mode: few steps), and the call that runs it.
RUN_BY = {
    "data_parallel.py": ("test_sharding.py", 'load(DATA_PARALLEL).main(["--steps", "30"'),
    "equinox_tied.py": ("test_equinox.py", "example.main("),
    "flax_shared.py": ("test_flax.py", "example.main("),
    "migrate_implicit.py": ("test_implicit.py", "module.main("),
    "multiprocess.py": ("test_sharding.py", 'str(MULTIPROCESS), "--steps", "20"'),
    "muon_tied_lm.py": ("test_example_muon.py", 'load_example().main(["--steps", "40"'),
    "tied_autoencoder.py": ("test_examples.py", "load_example().main(argv)"),
    "torch_tied_lm.py": ("test_torch.py", 'load_example().main(["--steps", "40"'),
}


@pytest.mark.parametrize("example", sorted(RUN_BY))
def test_every_example_is_run_by_a_test(example: str) -> None:
    test_file, call = RUN_BY[example]
    text = (ROOT / "tests" / test_file).read_text()
    assert f'"examples" / "{example}"' in text, f"{test_file} does not load examples/{example}"
    assert call in text, f"{test_file} no longer runs examples/{example} with {call!r}"


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    assert spec is not None, path
    assert spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (Equinox, Flax modules) look it up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_answers_help(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load(example)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    assert "--steps" in out
