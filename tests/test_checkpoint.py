"""Checkpoints: ``save`` / ``load`` keep ties, dtypes and shardings, write atomically, and refuse
broken, foreign or mismatched files with a clear error.

References: a round trip must give back the very arrays that were saved (compared leaf by leaf,
with dtypes), and training resumed from a checkpoint must follow the uninterrupted trajectory of
optax on the model written with each tied weight once (its gradients summed by hand). Stored
bytes are checked against NumPy's own view of the arrays.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from test_rule_properties import RULES

import optstate as ost
from optstate.checkpoint import CheckpointError, CheckpointMismatchError

ROOT = Path(__file__).resolve().parents[1]


# -- helpers -----------------------------------------------------------------------------------


def positions(model: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(model, is_leaf=lambda x: isinstance(x, ost.Transpose))


def assert_same_arrays(a: Any, b: Any) -> None:
    """Same structure (with the static tie plan of a state), and every leaf equal with its dtype.
    Positions holding a ``Transpose`` are compared as such."""
    is_t = lambda x: isinstance(x, ost.Transpose)  # noqa: E731
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=is_t)
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=is_t)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if isinstance(x, ost.Transpose):
            x, y = x.parent, y.parent
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        if hasattr(x, "dtype"):
            assert x.dtype == y.dtype
            assert np.shape(x) == np.shape(y)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


def tied_numpy_model() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3))
    return {
        "enc": {"w": w, "b": np.zeros(3, np.float32)},
        "dec": {"w": w.T, "b": np.zeros(4)},
        "again": [ost.Transpose(w), w],
        "steps": np.arange(3),  # an integer array: not a parameter, stored as data
        "name": "tied",
    }


def numpy_grads(model: dict[str, Any], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def g(x: Any) -> Any:
        return rng.normal(size=np.shape(x)).astype(x.dtype)

    return {
        "enc": {"w": g(model["enc"]["w"]), "b": g(model["enc"]["b"])},
        "dec": {"w": g(model["dec"]["w"]), "b": g(model["dec"]["b"])},
        "again": [ost.Transpose(g(model["again"][1])), g(model["again"][1])],
        "steps": None,
        "name": None,
    }


def saved(tmp_path: Path, state: ost.State, model: Any = None, name: str = "ckpt.npz") -> Path:
    path = tmp_path / name
    ost.save(path, state, model)
    return path


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


# -- JAX: resuming on a mesh, against optax ----------------------------------------------------


def make_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:2]), ("x",))


def jax_model(shardings: dict[str, Any] | None = None) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    b = jnp.zeros(6, jnp.float32)
    if shardings is not None:
        w, b = jax.device_put(w, shardings["w"]), jax.device_put(b, shardings["b"])
    return {"enc": w, "dec": ost.Transpose(w), "b": b}


def loss_fn(model: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ model["enc"] + model["b"][None, :])
    return jnp.mean((h @ model["dec"] - x) ** 2)


def batch(seed: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(5, 8)), jnp.float32)


GRAD = jax.jit(jax.grad(loss_fn))


@functools.cache
def optax_trajectory(steps: int) -> dict[str, jax.Array]:
    """Adam by optax on the model written with ``w`` once; the gradient of ``w`` is the sum of
    its two positions' gradients, taken by hand."""
    start = jax_model()
    params = {"w": start["enc"], "b": start["b"]}
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    for i in range(steps):
        model = {"enc": params["w"], "dec": ost.Transpose(params["w"]), "b": params["b"]}
        g = GRAD(model, batch(i))
        summed = {"w": g["enc"] + g["dec"].parent, "b": g["b"]}
        with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
            updates, opt_state = opt.update(summed, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


def train(state: ost.State, model: Any, first: int, last: int) -> tuple[ost.State, Any]:
    for i in range(first, last):
        state, model = ost.update(state, model, GRAD(model, batch(i)))
    return state, model


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


# -- atomic writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error):
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    path = saved(tmp_path, state, model)
    before = path.read_bytes()
    state2, model2 = ost.update(state, model, numpy_grads(model, 1))

    real = np.lib.format.write_array
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 4:  # halfway through the archive
            raise error
        real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(type(error)):
        ost.save(path, state2, model2)
    monkeypatch.undo()
    assert len(calls) == 4
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # the temporary file is gone
    loaded_state, loaded_model = ost.load(path)
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import optstate as ost

    real = np.lib.format.write_array
    calls = []

    def slow(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            print("mid-write", flush=True)
            time.sleep(60)

    np.lib.format.write_array = slow
    model = {"w": np.full((64, 64), 2.0), "v": np.full(8, 2.0)}
    ost.save(sys.argv[1], ost.setup(ost.Momentum(0.1), model), model)
    """
)


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    model = {"w": np.full((64, 64), 1.0), "v": np.full(8, 1.0)}
    state = ost.setup(ost.Momentum(0.1), model)
    path = saved(tmp_path, state, model)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    watchdog = threading.Timer(60, child.kill)  # never wait forever on a child that hangs
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line == "mid-write\n", child.stderr.read()
        partial = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(partial) == 1
        assert (tmp_path / partial[0]).stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        watchdog.cancel()
    loaded_state, loaded_model = ost.load(path)
    assert_same_arrays(loaded_model, model)
    assert_same_arrays(loaded_state, state)


def test_save_checks_everything_before_touching_the_file(tmp_path):
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    path = saved(tmp_path, state, model)
    before = path.read_bytes()
    broken = {**model, "again": [ost.Transpose(model["enc"]["w"].copy()), model["enc"]["w"]]}
    with pytest.raises(ost.TieError, match=r"model\['again'\]\[0\].*retie"):
        ost.save(path, state, broken)
    other = {**model, "enc": {"w": model["enc"]["w"], "b": np.zeros(4, np.float32)}}
    with pytest.raises(ValueError, match=r"model\['enc'\]\['b'\] changed since setup"):
        ost.save(path, state, other)

    jstate = ost.setup(ost.Adam(1e-2), jax_model())
    jstate.states[0].mu.delete()  # what donation does to the old state
    with pytest.raises(ValueError, match=r"state\.states\[0\]\.mu has been deleted"):
        ost.save(path, jstate)
    with pytest.raises(TypeError, match="expects the State"):
        ost.save(path, {"not": "a state"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ost.save(tmp_path / "missing" / "ckpt.npz", state, model)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


# -- files that are not (good) checkpoints -----------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, ost.State, Any]:
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    state, model = ost.update(state, model, numpy_grads(model, 1))
    return saved(tmp_path, state, model), state, model


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused(small, keep):
    path, _, _ = small
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"ckpt\.npz (is truncated or corrupted|is not an)"):
        ost.load(path)


def test_no_corrupted_byte_goes_unnoticed(small):
    """Flip one byte at a time over the file (every 7th): every load either fails with a
    CheckpointError or gives back exactly what was saved (a flip in a zip timestamp changes
    nothing that is loaded)."""
    path, state, model = small
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:  # where each member's bytes (arrays, metadata) lie
        spans = []
        for info in zf.infolist():
            head = data[info.header_offset : info.header_offset + 30]
            start = info.header_offset + 30 + int.from_bytes(head[26:28], "little")
            start += int.from_bytes(head[28:30], "little")
            spans.append(range(start, start + info.compress_size))
    for offset in range(0, len(data), 7):
        bad = bytearray(data)
        bad[offset] ^= 0x5A
        path.write_bytes(bytes(bad))
        try:
            loaded_state, loaded_model = ost.load(path)
        except CheckpointError:
            continue
        assert not any(offset in span for span in spans), offset  # content is always checked
        assert_same_arrays(loaded_state, state)
        assert_same_arrays(loaded_model, model)


def test_a_flipped_array_bit_is_refused_and_like_is_untouched(small):
    path, _, model = small
    data = bytearray(path.read_bytes())
    at = bytes(data).index(model["enc"]["w"].tobytes())  # the tied weight's stored values
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    like_state, like_model = ost.setup(ost.Adam(1e-2), model), model
    copies = unchanged((like_state, like_model))
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(.*model\['again'\]\[1\]"):
        ost.load(path, like=(like_state, like_model))
    assert_same_arrays((like_state, like_model), copies)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not an optstate checkpoint"):
        ost.load(text)
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(CheckpointError, match=r"array\.npy is a single NumPy array"):
        ost.load(npy)
    npz = tmp_path / "plain.npz"
    np.savez(npz, w=np.ones(3))
    with pytest.raises(CheckpointError, match=r"plain\.npz is a \.npz file but not .*holds w"):
        ost.load(npz)
    with pytest.raises(FileNotFoundError):
        ost.load(tmp_path / "absent.npz")


def rewrite_metadata(path: Path, change: Any) -> None:
    """Rewrite the checkpoint with its metadata changed (what a future optstate might write)."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["optstate.json"])
    change(meta)
    members["optstate.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_a_newer_format_version_is_refused(small):
    path, _, _ = small
    rewrite_metadata(path, lambda meta: meta.update(version=2, optstate="9.0"))
    with pytest.raises(CheckpointError, match=r"format version 2 \(by optstate 9\.0\).* up to 1"):
        ost.load(path)
    rewrite_metadata(path, lambda meta: meta.update(format="something.else"))
    with pytest.raises(CheckpointError, match="not an optstate checkpoint"):
        ost.load(path)


def test_malformed_metadata_is_refused(small):
    path, _, _ = small
    rewrite_metadata(path, lambda meta: meta["plan"].pop("slots"))
    with pytest.raises(CheckpointError, match=r"malformed metadata \(KeyError: 'slots'\)"):
        ost.load(path)


# -- files that do not fit ``like`` ------------------------------------------------------------


def unchanged(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, tree)


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
    with pytest.raises(CheckpointError, match=r"model is a Tied \(from test_checkpoint\).*like="):
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
    with pytest.raises(CheckpointError, match=r"a rule is a HalfStep \(from test_checkpoint\)"):
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
    """adjust (a schedule in place of a number, a rule split for one subtree) and freeze change
    the state after setup; a fresh ``like`` does not have them, the file does."""
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    state = ost.adjust(state, "dec", lr=ost.schedules.linear(1e-2, 1e-3, 10))
    state = ost.freeze(state, ("enc", "b"))
    state, model = ost.update(state, model, numpy_grads(model, 1))
    path = saved(tmp_path, state, model)
    fresh = tied_numpy_model()
    loaded_state, loaded_model = ost.load(path, like=(ost.setup(ost.Adam(1e-2), fresh), fresh))
    assert loaded_state.plan == state.plan
    assert len(loaded_state.plan.rules) == 2
    assert sum(loaded_state.plan.frozen) == 1
    assert_same_arrays(loaded_state, state)
    grads = numpy_grads(model, 2)
    assert_same_arrays(
        ost.update(loaded_state, loaded_model, grads), ost.update(state, model, grads)
    )


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
    ost.Adam(lr=ost.schedules.warmup_cosine(1e-2, 2, 10)),
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


def assert_ties(plan: ost.Plan, model: Any) -> None:
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
