"""examples/muon_tied_lm.py runs: both runs train, the tie holds, the hybrid gives the hidden
matrices to Muon, and the figure is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "muon_tied_lm.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("muon_tied_lm", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    plot = tmp_path_factory.mktemp("figure") / "curves.png"
    result: dict[str, Any] = load_example().main(["--steps", "40", "--quiet", "--plot", str(plot)])
    return result


def test_import_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    load_example()
    assert capsys.readouterr().out == ""


def test_both_runs_train_and_keep_the_tie(figures: dict[str, Any]) -> None:
    assert figures["steps"] == 40
    for run in ("final_loss_muon_adamw", "final_loss_adamw"):
        assert np.isfinite(figures[run])
        assert figures[run] < 0.75 * figures["initial_loss"]
    assert figures["tie_kept"] is True


def test_the_hybrid_gives_muon_the_hidden_matrices(figures: dict[str, Any]) -> None:
    assert figures["rules_muon_adamw"] == ["AdamW", "Muon"]
    module = load_example()
    model = module.init_model(20, 0)
    state = module.ost.setup(module.muon_adamw, model)
    muon = state.plan.rules.index(next(r for r in state.plan.rules if r.name() == "Muon"))
    shapes = [
        p.shape for p, r in zip(state.plan.params, state.plan.param_rules, strict=True) if r == muon
    ]
    assert len(shapes) == 6 * module.BLOCKS
    assert all(len(s) == 2 for s in shapes)


def test_the_figure_is_written(figures: dict[str, Any]) -> None:
    assert Path(figures["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
