"""The main example (examples/tied_autoencoder.py) runs and shows what the README says it shows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tied_autoencoder.py"
STEPS = 60


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tied_autoencoder", EXAMPLE)
    assert spec is not None, EXAMPLE
    assert spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    # The example is user code under JAX's default dtype promotion: optax.adam itself computes
    # ``b1 ** count`` (a Python float to an int32 power), which the suite's strict promotion
    # (conftest.py) rejects. Rank promotion stays "raise".
    with jax.numpy_dtype_promotion("standard"):
        figures: dict[str, Any] = load_example().main(["--steps", str(STEPS), "--quiet"])
    return figures


def test_import_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    load_example()
    assert capsys.readouterr().out == ""


def test_optstate_trains(figures: dict[str, Any]) -> None:
    assert figures["optstate_train_loss"] < 0.5 * figures["optstate_initial_loss"]
    assert np.isfinite(figures["optstate_test_loss"])


def test_optstate_keeps_the_tie(figures: dict[str, Any]) -> None:
    assert figures["optstate_tie_drift"] == 0.0
    assert figures["optstate_one_array_after_retie"] is True


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
