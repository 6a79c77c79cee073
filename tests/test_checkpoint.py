"""Checkpoints: ``save`` / ``load`` keep ties, dtypes and shardings; training resumed from a file
follows the uninterrupted run.

References: a round trip must give back the very arrays that were saved (compared leaf by leaf,
with dtypes), and training resumed from a checkpoint must follow the uninterrupted trajectory of
optax on the model written with each tied weight once (its gradients summed by hand). Stored
bytes are checked against NumPy's own view of the arrays. The files that ``load`` refuses are in
test_checkpoint_files.py, the files that do not fit ``like`` in test_checkpoint_like.py, torch in
test_checkpoint_torch.py.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from checkpoint_cases import (
    assert_same_arrays,
    jax_model,
    make_mesh,
    numpy_grads,
    optax_trajectory,
    positions,
    saved,
    tied_numpy_model,
    train,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from rules_under_test import RULES

import optstate as ost

# -- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_round_trips_without_like(tmp_path, name):
    """Each rule of the suite's list is rebuilt from the file alone (rule structure, state tree,
    hyper-parameters), and the next step from the loaded pair equals the one from the original."""
    rule, _ = RULES[name]
    model = tied_numpy_model()
    state = ost.setup(rule, model)
    for seed in (1, 2):
        state, model = ost.update(state, model, numpy_grads(model, seed))
    loaded_state, loaded_model = ost.load(saved(tmp_path, state, model))
    assert loaded_state.plan == state.plan
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)
    grads = numpy_grads(model, 3)
    assert_same_arrays(
        ost.update(loaded_state, loaded_model, grads), ost.update(state, model, grads)
    )


def test_numpy_ties_come_back_as_one_array(tmp_path):
    model = tied_numpy_model()
    state = ost.setup(ost.Momentum(0.1), model)
    state, model = ost.update(state, model, numpy_grads(model, 1))
    _, loaded = ost.load(saved(tmp_path, state, model))
    w = loaded["enc"]["w"]
    assert loaded["again"][1] is w
    assert loaded["again"][0].parent is w
    assert np.shares_memory(loaded["dec"]["w"], w)
    np.testing.assert_array_equal(loaded["dec"]["w"], w.T)
    assert w.flags.writeable  # update_ can write into it, and the views see the step
    state2, _ = ost.load(tmp_path / "ckpt.npz")
    ost.update_(state2, loaded, numpy_grads(loaded, 2))
    np.testing.assert_array_equal(loaded["dec"]["w"], w.T)
    assert not np.shares_memory(w, model["enc"]["w"])


def test_one_stored_array_per_unique_parameter(tmp_path):
    """A weight at three positions is stored once: the archive holds one member for it, and the
    file's size is the bytes of the unique arrays plus a small overhead."""
    w = np.ones((256, 256), np.float32)
    model = {"a": w, "b": ost.Transpose(w), "c": w.T, "bias": np.zeros(256, np.float32)}
    state = ost.setup(ost.Descent(0.1), model)  # no moments: the state is two small counters
    path = saved(tmp_path, state, model)
    with zipfile.ZipFile(path) as zf:
        params = [n for n in zf.namelist() if n.startswith("model")]
    assert params == ["model['a'].npy", "model['bias'].npy"]
    unique_bytes = w.nbytes + 256 * 4
    assert unique_bytes < path.stat().st_size < unique_bytes + 8192


def test_portable_npz_keeps_every_dtype(tmp_path):
    """bfloat16, float16 and complex64 parameters and a bfloat16 first moment keep their dtypes;
    the file opens with plain NumPy and no pickle, bfloat16 as its raw 16-bit patterns."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(4, 3)), jnp.bfloat16)
    model = {
        "w": w,
        "wt": ost.Transpose(w),
        "h": jnp.asarray(rng.normal(size=5), jnp.float16),
        "z": jnp.asarray(rng.normal(size=3) + 1j * rng.normal(size=3), jnp.complex64),
    }
    low = ost.Adam(1e-2, mu_dtype=jnp.bfloat16)  # a bfloat16 first moment for the real ones
    rule = {"w": low, "wt": low, "h": low, "z": ost.Adam(1e-2)}
    state = ost.setup(rule, model)
    grads = jax.tree.map(jnp.ones_like, model)
    state, model = ost.update(state, model, grads)
    path = saved(tmp_path, state, model)

    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["optstate.json"])
        records = {r["member"]: r for r in meta["arrays"]}
        stored = npz["model['w']"]
        assert stored.dtype == np.uint16
        assert records["model['w'].npy"]["dtype"] == "bfloat16"
        np.testing.assert_array_equal(stored, np.asarray(model["w"]).view(np.uint16))
        assert npz["model['h']"].dtype == np.float16
        np.testing.assert_array_equal(npz["model['h']"], np.asarray(model["h"]))
        assert npz["model['z']"].dtype == np.complex64
        assert npz["state.states[0].mu"].dtype == np.uint16  # bfloat16 mu, stored raw

    loaded_state, loaded_model = ost.load(path, like=(ost.setup(rule, model), model))
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)
    assert loaded_model["wt"].parent is loaded_model["w"]
    np_state, np_model = ost.load(path)  # without like: NumPy arrays of the same dtypes
    assert np_model["w"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert isinstance(np_state.states[0].mu, np.ndarray)
    assert np_state.states[0].mu.dtype == np.dtype(ml_dtypes.bfloat16)


def test_big_endian_arrays_round_trip(tmp_path):
    """Arrays read from FITS or HDF5 are often big-endian (``>f8``). They train, and a checkpoint
    keeps their byte order: loaded with or without ``like``, the model and state have the saved
    dtypes and values, and the next step equals the uninterrupted one. Reference: the same run on
    the same values in native byte order, which must give the same numbers."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 4)).astype(">f8")
    model = {"w": w, "wt": w.T, "b": rng.normal(size=4).astype(">f4")}
    native = {"w": w.astype("<f8"), "b": model["b"].astype("<f4")}
    native["wt"] = native["w"].T

    def grads(seed: int) -> dict[str, Any]:
        g = np.random.default_rng(seed).normal(size=(3, 4))
        return {"w": g, "wt": 2 * g.T, "b": g[0].astype(np.float32)}

    state, state_n = ost.setup(ost.Adam(0.1), model), ost.setup(ost.Adam(0.1), native)
    for seed in (1, 2):
        state, model = ost.update(state, model, grads(seed))
        state_n, native = ost.update(state_n, native, grads(seed))
    assert model["w"].dtype == np.dtype(">f8")
    assert state.states[1].mu.dtype == np.dtype(">f8")  # states[0] is the bias's
    np.testing.assert_array_equal(model["w"], native["w"])
    path = saved(tmp_path, state, model)
    with np.load(path, allow_pickle=False) as npz:
        assert npz["model['w']"].dtype == np.dtype(">f8")

    fresh = {"w": np.zeros((3, 4), ">f8"), "b": np.zeros(4, ">f4")}
    fresh["wt"] = fresh["w"].T
    for loaded_state, loaded_model in [
        ost.load(path),
        ost.load(path, like=(ost.setup(ost.Adam(0.1), fresh), fresh)),
    ]:
        assert loaded_state.plan == state.plan
        assert_same_arrays(loaded_state, state)
        assert_same_arrays(loaded_model, model)
        assert np.shares_memory(loaded_model["w"], loaded_model["wt"])
        got = ost.update(loaded_state, loaded_model, grads(3))
        assert_same_arrays(got, ost.update(state, model, grads(3)))
        np.testing.assert_array_equal(got[1]["w"], ost.update(state_n, native, grads(3))[1]["w"])


# -- JAX: resuming on a mesh, against optax ----------------------------------------------------


def test_resume_on_a_mesh_follows_the_uninterrupted_optax_run(tmp_path):
    """Train 3 steps, save, load onto a 2-device mesh through ``like``, train 2 more: the result is
    optax's 5-step trajectory, the loaded arrays have like's shardings, the tie is one array."""
    mesh = make_mesh()
    shardings = {"w": NamedSharding(mesh, P("x", None)), "b": NamedSharding(mesh, P())}
    model = jax_model()
    state, model = train(ost.setup(ost.Adam(1e-2), model), model, 0, 3)
    path = saved(tmp_path, state, model)

    fresh = jax_model(shardings)
    like_state = ost.setup(ost.Adam(1e-2), fresh)
    loaded_state, loaded_model = ost.load(path, like=(like_state, fresh))
    assert loaded_model["dec"].parent is loaded_model["enc"]
    assert loaded_model["enc"].sharding.is_equivalent_to(shardings["w"], 2)
    for got, want in zip(jax.tree.leaves(loaded_state), jax.tree.leaves(like_state), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
    assert int(loaded_state.step) == 3
    assert int(loaded_state.states[0].count) == 3

    state, model = train(loaded_state, loaded_model, 3, 5)
    assert model["dec"].parent is model["enc"]
    assert model["enc"].sharding.is_equivalent_to(shardings["w"], 2)
    want = optax_trajectory(5)
    # The sharded gradient sums its terms in another order than the unsharded reference: the
    # weights may differ by a few float32 ulps of their own scale (|w| ~ 2), not more.
    scale = 4 * np.finfo(np.float32).eps * float(jnp.max(jnp.abs(want["w"])))
    np.testing.assert_allclose(model["enc"], want["w"], rtol=0, atol=scale)
    np.testing.assert_allclose(model["b"], want["b"], rtol=0, atol=scale)


# -- moving between devices --------------------------------------------------------------------


def test_moving_and_resharding_keep_the_plan_and_ties():
    """``jax.device_put`` moves a state with its plan; a moved model gets its ties back with
    ``retie``; resharding over a 2-device mesh likewise. Each following step equals optax."""
    dev1 = jax.devices()[1]
    model = jax_model()  # set up before any move: a moved model holds a copy at each position
    state, model = train(ost.setup(ost.Adam(1e-2), model), model, 0, 1)

    moved_state = jax.device_put(state, dev1)
    moved_model = ost.retie(moved_state, jax.device_put(model, dev1))
    assert moved_state.plan == state.plan
    assert moved_model["dec"].parent is moved_model["enc"]
    assert {d for x in jax.tree.leaves((moved_state, moved_model)) for d in x.devices()} == {dev1}
    state1, model1 = train(moved_state, moved_model, 1, 2)
    assert model1["dec"].parent is model1["enc"]
    assert model1["enc"].devices() == {dev1}
    want = optax_trajectory(2)
    np.testing.assert_allclose(model1["enc"], want["w"], rtol=2e-6, atol=2e-7)

    mesh = make_mesh()
    rows, whole = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
    sharded_state = jax.device_put(
        state1, jax.tree.map(lambda x: rows if x.shape == (8, 6) else whole, state1)
    )
    sharded_model = jax.device_put(model1, {"enc": rows, "dec": ost.Transpose(rows), "b": whole})
    sharded_model = ost.retie(sharded_state, sharded_model)
    assert sharded_model["dec"].parent is sharded_model["enc"]
    state2, model2 = train(sharded_state, sharded_model, 2, 3)
    assert model2["dec"].parent is model2["enc"]
    assert model2["enc"].sharding.is_equivalent_to(rows, 2)
    assert state2.states[1].mu.sharding.is_equivalent_to(rows, 2)  # states[0] is the bias's
    want = optax_trajectory(3)
    np.testing.assert_allclose(model2["enc"], want["w"], rtol=2e-6, atol=2e-7)


# -- orbax-checkpoint --------------------------------------------------------------------------


def test_orbax_round_trip(tmp_path):
    """The recipe of docs/checkpoints.md: orbax saves the state and model as pytrees; restoring
    into a target derived from ``like`` gives the plan back, and ``retie`` the ties."""
    model = jax_model()
    state, model = train(ost.setup(ost.Adam(1e-2), model), model, 0, 2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "orbax", {"state": state, "model": model})
        checkpointer.wait_until_finished()
        fresh = jax_model()
        like = {"state": ost.setup(ost.Adam(1e-2), fresh), "model": fresh}
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = checkpointer.restore(tmp_path / "orbax", target)
    loaded_state = restored["state"]
    loaded_model = ost.retie(loaded_state, restored["model"])
    assert loaded_model["dec"].parent is loaded_model["enc"]
    assert loaded_state.plan == state.plan
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)
    _, resumed = train(loaded_state, loaded_model, 2, 3)
    np.testing.assert_allclose(resumed["enc"], optax_trajectory(3)["w"], rtol=2e-6, atol=2e-7)


# -- the round-trip property -------------------------------------------------------------------

PROPERTY_RULES = [
    ost.Adam(1e-2),
    ost.Momentum(0.1),
    ost.OptimiserChain(ost.ClipGrad(1.0), ost.AdamW(1e-2)),
    ost.OptimiserChain(ost.AccumGrad(2), ost.Nesterov(0.1)),
    ost.SkipNonFinite(ost.RMSProp(1e-2)),
    ost.MixedPrecision(ost.Adam(1e-2)),
    ost.Adam(lr=ost.schedules.warmup_cosine(1e-2, warmup_steps=2, decay_steps=10)),
]
DTYPES = [np.float32, np.float64, np.float16, np.complex64]
SHAPES = [(2, 3), (3,), (2, 2, 2), ()]
USES = ["same", "transpose", "view", "fresh", "int", "float"]


@st.composite
def tied_models(draw: Any) -> tuple[Any, Any, list[Any]]:
    """A dict/list/tuple tree whose positions use a few shared arrays: as themselves, through
    ``Transpose``, as NumPy transpose views; plus fresh arrays, integer arrays and floats."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    real = draw(st.booleans())
    bases = []
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES if not real else DTYPES[:3]))
        shape = draw(st.sampled_from(SHAPES))
        values = rng.normal(size=shape) + (
            1j * rng.normal(size=shape) if dtype == np.complex64 else 0
        )
        bases.append(np.asarray(values, dtype))
    uses = draw(st.lists(st.sampled_from(USES), min_size=2, max_size=7))
    leaves = []
    for use in uses:
        b = bases[draw(st.integers(0, len(bases) - 1))]
        leaves.append(
            {
                "same": b,
                "transpose": ost.Transpose(b),
                "view": b.T,
                "fresh": b.copy(),
                "int": np.arange(3),
                "float": 0.5,
            }[use]
        )
    layout = draw(
        st.lists(
            st.sampled_from(["top", "list", "tuple"]), min_size=len(leaves), max_size=len(leaves)
        )
    )
    model: dict[str, Any] = {"list": [], "tuple": []}
    for i, (leaf, where) in enumerate(zip(leaves, layout, strict=True)):
        if where == "top":
            model[f"p{i}"] = leaf
        else:
            model[where].append(leaf)
    model["tuple"] = tuple(model["tuple"])
    model["none"] = None
    rule = draw(st.sampled_from(PROPERTY_RULES))
    return model, rule, [rng.integers(0, 2**31) for _ in range(3)]


def property_grads(model: Any, seed: int) -> Any:
    rng = np.random.default_rng(seed)

    def g(x: Any) -> Any:
        if isinstance(x, ost.Transpose):
            return ost.Transpose(g(x.parent)) if rng.random() < 0.5 else g(np.asarray(x))
        if not (isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.inexact)):
            return None
        values = rng.normal(size=x.shape)
        if np.iscomplexobj(x):
            values = values + 1j * rng.normal(size=x.shape)
        return np.asarray(values, x.dtype)

    return jax.tree.map(g, model, is_leaf=lambda x: isinstance(x, ost.Transpose))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property")


# Derandomised, with no example database, so CI runs the same examples every time.
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=tied_models(), adjust=st.booleans(), freeze=st.booleans())
@pytest.mark.filterwarnings("ignore::optstate.CopyWarning")  # "fresh" uses copy on purpose
def test_save_load_round_trips_equal(scratch, case, adjust, freeze):
    model, rule, seeds = case
    initial = model
    state = ost.setup(rule, model)
    selectable = [k for k in model if holds_parameter(model[k])]
    if adjust and selectable:  # a rule split in two for one subtree
        state = ost.adjust(state, selectable[0], lr=5e-3)
    if freeze and selectable:
        state = ost.freeze(state, selectable[-1])
    # Adam's eps rounds to 0 in float16, so a tiny gradient may give an infinite step: NumPy's
    # floating-point warnings say so, and inf and nan round-trip like any other value.
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        for seed in seeds[:2]:
            state, model = ost.update(state, model, property_grads(model, seed))
        path = scratch / "ckpt.npz"
        ost.save(path, state, model)

        loaded = ost.load(path)
        liked = ost.load(path, like=(ost.setup(rule, initial), initial))  # values from the file
        grads = property_grads(model, seeds[2])
        want = ost.update(state, model, grads)
        for got_state, got_model in [loaded, liked]:
            assert got_state.plan == state.plan
            assert_same_arrays(got_state, state)
            assert_same_arrays(got_model, model)
            assert_ties(got_state.plan, got_model)
            assert_same_arrays(ost.update(got_state, got_model, grads), want)


def holds_parameter(tree: Any) -> bool:
    arrays = [x.parent if isinstance(x, ost.Transpose) else x for x in positions(tree)]
    return any(isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.inexact) for x in arrays)


def assert_ties(plan: Any, model: Any) -> None:
    """Every position of a parameter holds the one array: itself, in a ``Transpose``, or a NumPy
    view of it; different parameters share no memory."""
    leaves = positions(model)
    bases = []
    for param in plan.params:
        base = leaves[param.primary]
        while isinstance(base, ost.Transpose):
            base = base.parent
        for pos in param.positions:
            leaf = leaves[pos]
            while isinstance(leaf, ost.Transpose):
                leaf = leaf.parent
            if leaf is not base:  # a view: the same memory, the parameter's values
                assert np.shares_memory(leaf, base) or leaf.size == 0
                np.testing.assert_array_equal(np.sort(leaf, axis=None), np.sort(base, axis=None))
        bases.append(base)
    for i, a in enumerate(bases):
        assert not any(np.shares_memory(a, b) for b in bases[i + 1 :] if a.size and b.size)
