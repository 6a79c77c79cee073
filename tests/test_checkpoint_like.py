"""Checkpoints and ``like``: a file that does not fit ``like`` is refused naming the first path
that differs; what only ``like`` can give (classes of other packages, functions) comes from it;
what training changed comes from the file.

References: hand-computed values, and the states and models that were saved.
"""

from __future__ import annotations

import collections
import gc
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_cases import (
    assert_same_arrays,
    numpy_grads,
    saved,
    small_checkpoint,
    tied_numpy_model,
    unchanged,
)

import optstate as ost
from optstate.checkpoint import CheckpointError, CheckpointMismatchError

# -- files that do not fit ``like`` ------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, ost.State, Any]:
    return small_checkpoint(tmp_path)


def test_a_file_for_another_model_structure(small):
    path, _, model = small
    other = {**model, "extra": np.ones(2)}
    like = (ost.setup(ost.Adam(1e-2), other), other)
    copy = unchanged(like[1])
    with pytest.raises(
        CheckpointMismatchError,
        match=r"another structure; in like but not in the file: model\['extra'\]; first "
        r"difference at model: the file has a dict with keys \['again', 'dec', 'enc', 'name', "
        r"'steps'\], like has a dict with keys \['again', 'dec', 'enc', 'extra', 'name'",
    ):
        ost.load(path, like=like)
    assert_same_arrays(like[1], copy)  # like is only read


def test_a_file_with_other_ties(small):
    path, _, model = small
    untied = {**model, "dec": {"w": model["enc"]["w"].T.copy(), "b": model["dec"]["b"]}}
    with pytest.warns(ost.CopyWarning, match=r"model\['dec'\]\['w'\] holds the values of"):
        like = (ost.setup(ost.Adam(1e-2), untied), untied)  # the copy is on purpose
    with pytest.raises(
        CheckpointMismatchError,
        match=r"other ties: in the file model\['again'\]\[0\] is tied to model\['again'\]\[1\], "
        r"model\['dec'\]\['w'\], model\['enc'\]\['w'\] through 1 Transpose layer\(s\); in like "
        r"it is tied to model\['again'\]\[1\], model\['enc'\]\['w'\] through 1 Transpose",
    ):
        ost.load(path, like=like)


def test_a_state_for_a_different_rule(small):
    path, _, model = small
    with pytest.raises(
        CheckpointMismatchError,
        match=r"the state of model\['again'\]\[0\] is for Adam\(\) in the file, for "
        r"Momentum\(\) in like",
    ):
        ost.load(path, like=ost.setup(ost.Momentum(0.1), model))
    with pytest.raises(CheckpointMismatchError, match=r"for Adam\(mu_dtype=bfloat16\) in like"):
        ost.load(path, like=ost.setup(ost.Adam(mu_dtype=jnp.bfloat16), model))


# Two classes that print alike: a named tuple ``Layer`` of two modules, and the user's own ``Adam``.
FirstLayer = collections.namedtuple("Layer", ["w", "b"], module="first_package.layers")
SecondLayer = collections.namedtuple("Layer", ["w", "b"], module="second_package.layers")


@dataclass(frozen=True)
class Adam(ost.Adam):
    """The user's own Adam, a subclass of optstate's with the same name."""


def test_two_classes_of_one_name_are_told_apart(tmp_path):
    """Where the file and ``like`` have two different classes of the same name, the message shows
    each with its module, not ``the file has a Layer, like has a Layer``."""
    w = np.ones((2, 3))
    model = {"layer": FirstLayer(w, np.zeros(3))}
    path = saved(tmp_path, ost.setup(ost.Adam(), model), model)
    other = {"layer": SecondLayer(w, np.zeros(3))}
    with pytest.raises(
        CheckpointMismatchError,
        match=r"model\['layer'\]: the file has a first_package\.layers\.Layer with fields "
        r"\['w', 'b'\], like has a second_package\.layers\.Layer with fields",
    ):
        ost.load(path, like=(ost.setup(ost.Adam(), other), other))
    with pytest.raises(
        CheckpointMismatchError,
        match=r"is for optstate\.rules\.adam\.Adam\(\) in the file, for "
        r"test_checkpoint_like\.Adam\(\) in like",
    ):
        ost.load(path, like=ost.setup(Adam(), model))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"b": np.zeros(4, np.float32)}, r"model\['enc'\]\['b'\] is float32\[3\] in the file, "),
        ({"b": np.zeros(3, np.float64)}, r"float32\[3\] in the file, float64\[3\] in like"),
    ],
)
def test_a_model_with_other_shapes_or_dtypes(small, change, message):
    path, _, model = small
    other = {**model, "enc": {**model["enc"], **change}}
    with pytest.raises(CheckpointMismatchError, match=message):
        ost.load(path, like=(ost.setup(ost.Adam(1e-2), other), other))


def test_like_must_be_a_state_or_a_pair(small):
    path, _, model = small
    with pytest.raises(TypeError, match=r"like must be a State .* got dict"):
        ost.load(path, like=model)


# -- what only ``like`` can give back ----------------------------------------------------------


class Tied(eqx.Module):
    embed: jax.Array
    unembed: jax.Array
    act: Any = eqx.field(static=True)


@dataclass(frozen=True)
class HalfStep(ost.Rule):
    """A rule of the user's own: half a gradient step."""

    lr: float = 0.1
    hyper_names = ("lr",)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        return state, 0.5 * hyper["lr"] * grad


def test_an_equinox_model_and_a_custom_rule_need_like(tmp_path):
    w = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
    model = Tied(w, w, jnp.tanh)
    state = ost.setup(HalfStep(0.2), model)
    state, model = ost.update(state, model, Tied(jnp.ones((2, 3)), jnp.ones((2, 3)), jnp.tanh))
    path = saved(tmp_path, state, model)
    with pytest.raises(
        CheckpointError, match=r"model is a Tied \(from test_checkpoint_like\).*like="
    ):
        ost.load(path)

    fresh = Tied(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.tanh)
    fresh = Tied(fresh.embed, fresh.embed, jnp.tanh)
    loaded_state, loaded_model = ost.load(path, like=(ost.setup(HalfStep(0.2), fresh), fresh))
    assert loaded_model.unembed is loaded_model.embed
    np.testing.assert_array_equal(loaded_model.embed, w - 0.5 * 0.2 * 2.0)  # by hand
    assert loaded_state.plan == state.plan
    assert int(loaded_state.step) == 1

    plain = {"w": w}
    path = saved(tmp_path, ost.setup(HalfStep(), plain), plain, "rule.npz")
    with pytest.raises(
        CheckpointError, match=r"a rule is a HalfStep \(from test_checkpoint_like\)"
    ):
        ost.load(path)


def test_leaves_that_are_not_data_come_from_like(tmp_path):
    model = {"w": np.ones(3), "act": np.tanh, "key": jax.random.key(7), "rate": 0.5}
    state = ost.setup(ost.Descent(0.1), model)
    path = saved(tmp_path, state, model)
    with pytest.raises(CheckpointError, match=r"model\['act'\] held a ufunc.*like="):
        ost.load(path)
    fresh = {**model, "act": np.sin, "rate": 0.0}
    _, loaded = ost.load(path, like=(state, fresh))
    assert loaded["act"] is np.sin  # not stored: like's
    assert loaded["rate"] == 0.5  # stored: the file's
    np.testing.assert_array_equal(
        jax.random.key_data(loaded["key"]), jax.random.key_data(jax.random.key(7))
    )


def test_adjusted_and_frozen_states_come_back_as_saved(tmp_path):
    """adjust (a schedule in place of a number, a variant of the rule group's hyper-parameters
    for one subtree) and freeze change the state after setup; a fresh ``like`` does not have
    them, the file does."""
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    state = ost.adjust(state, "dec", lr=ost.schedules.linear(1e-2, 1e-3, 10))
    state = ost.freeze(state, ("enc", "b"))
    state, model = ost.update(state, model, numpy_grads(model, 1))
    path = saved(tmp_path, state, model)
    fresh = tied_numpy_model()
    loaded_state, loaded_model = ost.load(path, like=(ost.setup(ost.Adam(1e-2), fresh), fresh))
    assert loaded_state.plan == state.plan
    assert len(loaded_state.plan.rules) == 1
    assert len(loaded_state.hyper[0]) == 2  # the subtree's own variant
    assert sum(loaded_state.plan.frozen) == 1
    assert_same_arrays(loaded_state, state)
    grads = numpy_grads(model, 2)
    assert_same_arrays(
        ost.update(loaded_state, loaded_model, grads), ost.update(state, model, grads)
    )


def test_a_version_1_file_loads():
    """tests/data/checkpoint_v1.npz was written by optstate 0.1.0 (format version 1, before rule
    groups had variants and clocks): three steps of a clipped Adam with a schedule on a tied
    model. It loads as one variant per group with its clocks at the step count, and it continues
    as the same run made from scratch by this version continues."""
    path = Path(__file__).parent / "data" / "checkpoint_v1.npz"
    with np.load(path, allow_pickle=False) as npz:
        stored = {name: npz[name] for name in npz.files if name != "optstate.json"}
    w = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    model = {"enc": w, "dec": ost.Transpose(w), "b": np.array([0.1, -0.2, 0.3])}
    lr = ost.schedules.piecewise_constant([0.1, 0.01], [2])
    rule = ost.OptimiserChain(ost.ClipGlobalNorm(5.0), ost.Adam(lr))

    def grads(i):
        return {
            "enc": np.full((2, 3), 0.5 + i),
            "dec": ost.Transpose(np.full((2, 3), 0.25 * i)),
            "b": np.array([1.0, -1.0, 0.5 * i]),
        }

    state = ost.setup(rule, model)
    for i in range(3):
        state, model = ost.update(state, model, grads(i))
    fresh = {"enc": np.zeros((2, 3)), "b": np.zeros(3)}
    fresh["dec"] = ost.Transpose(fresh["enc"])
    for like in (None, (ost.setup(rule, fresh), fresh)):
        loaded_state, loaded_model = ost.load(path, like=like)
        np.testing.assert_array_equal(loaded_model["enc"], stored["model['enc']"])
        np.testing.assert_array_equal(loaded_state.states[0][1].nu, stored["state.states[0][1].nu"])
        assert loaded_model["dec"].parent is loaded_model["enc"]
        assert len(loaded_state.hyper[0]) == 1
        assert [int(c) for c in loaded_state.clocks[0]] == [3, 3] == [int(loaded_state.step)] * 2
        assert ost.hyperparams(loaded_state)["b"][1]["lr"] == 0.01
        assert_same_arrays(loaded_state, state)
        assert_same_arrays(
            ost.update(loaded_state, loaded_model, grads(3)), ost.update(state, model, grads(3))
        )


# -- classes that moved since the file was written ---------------------------------------------


def renamed_classes(path: Path, rename: Callable[[str, str], tuple[str, str]]) -> set[str]:
    """Rewrite the file's metadata as if its classes had other names (``rename(module,
    qualname)`` gives the name the file records instead); the names that were changed."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    changed: set[str] = set()

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            is_name = len(node) == 2 and all(isinstance(x, str) for x in node)
            if is_name and node[0].startswith("optstate") and list(rename(*node)) != node:
                changed.add(".".join(node))
                return list(rename(*node))
            return [walk(v) for v in node]
        return node

    meta = walk(json.loads(members["optstate.json"]))
    members["optstate.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return changed


def moved(modules: dict[str, str]) -> Callable[[str, str], tuple[str, str]]:
    return lambda module, qualname: (modules.get(module, module), qualname)


def moved_checkpoint(tmp_path: Path) -> tuple[Path, ost.State, Any]:
    w = np.array([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    model = {"enc": w, "dec": ost.Transpose(w), "b": np.array([0.1, -0.2, 0.3])}
    rule = ost.OptimiserChain(ost.ClipGlobalNorm(5.0), ost.Adam(ost.schedules.linear(0.1, 0.0, 4)))
    state = ost.setup(rule, model)
    grads = {"enc": np.full((2, 3), 0.5), "dec": ost.Transpose(np.ones((2, 3))), "b": np.ones(3)}
    state, model = ost.update(state, model, grads)
    return saved(tmp_path, state, model), state, model


def test_classes_that_moved_are_found_by_their_name(tmp_path):
    """A file names its classes by module and qualified name. One written when the schedules'
    classes lived in ``optstate.schedules`` (the module is there, the attribute is gone), or
    naming a rule module that no longer exists, loads: each class is the one optstate class of
    that name, and the state and model are the ones saved."""
    path, state, model = moved_checkpoint(tmp_path)
    moves = {"optstate._schedules": "optstate.schedules", "optstate.rules.adam": "optstate.adam"}
    assert renamed_classes(path, moved(moves)) == {
        "optstate._schedules.Linear",
        "optstate.rules.adam.Adam",
        "optstate.rules.adam.AdamState",
    }
    loaded_state, loaded_model = ost.load(path)
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)
    assert loaded_model["dec"].parent is loaded_model["enc"]


def test_a_class_of_no_name_optstate_has_is_refused(tmp_path):
    path, _, _ = moved_checkpoint(tmp_path)
    renamed = {"AdamState": ("optstate.rules.adam_v9", "AdamStateV9")}
    renamed_classes(path, lambda module, qualname: renamed.get(qualname, (module, qualname)))
    with pytest.raises(
        CheckpointError,
        match=r"the checkpoint names optstate\.rules\.adam_v9\.AdamStateV9, which this optstate "
        r"does not have",
    ):
        ost.load(path)


def test_a_moved_class_whose_name_two_classes_have_is_refused(tmp_path):
    """Two optstate classes of the recorded name: the file cannot say which one it means."""
    path, _, _ = moved_checkpoint(tmp_path)
    renamed_classes(path, moved({"optstate._schedules": "optstate.schedules"}))

    class Linear(ost.schedules.Schedule):
        pass

    Linear.__module__ = "optstate.elsewhere"
    Linear.__qualname__ = "Linear"
    try:
        with pytest.raises(
            CheckpointError,
            match=r"names optstate\.schedules\.Linear, which has moved, and this optstate has 2 "
            r"classes of that name \(optstate\._schedules\.Linear, optstate\.elsewhere\.Linear\)",
        ):
            ost.load(path)
    finally:
        del Linear
        gc.collect()  # the class leaves Schedule.__subclasses__() for the tests that follow
