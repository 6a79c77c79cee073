"""Models, training loops and comparisons shared by the checkpoint tests (test_checkpoint*.py).

References: a round trip must give back the very arrays that were saved (``assert_same_arrays``
compares leaf by leaf, with dtypes), and training resumed from a checkpoint follows optax's
uninterrupted run on the model written with each tied weight once (``optax_trajectory``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import optstate as ost

# -- NumPy models ------------------------------------------------------------------------------


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


# -- small checkpoints to break --------------------------------------------------------------


def small_checkpoint(tmp_path: Path) -> tuple[Path, ost.State, Any]:
    """A checkpoint of the tied NumPy model after one Adam step: (path, state, model)."""
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    state, model = ost.update(state, model, numpy_grads(model, 1))
    return saved(tmp_path, state, model), state, model


def unchanged(tree: Any) -> Any:
    """A copy of ``tree``'s NumPy arrays, to check later that ``tree`` was only read."""
    return jax.tree.map(lambda x: x.copy() if isinstance(x, np.ndarray) else x, tree)
