"""The tied-weight cases of ../shared/reference/tied-cases.md (Optimisers.jl's suite), with their
independently computed numbers."""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tied_reference import G_M, G_T, G_V, MAT, T3_DESCENT, T3B_A

import optstate as ost


def close(actual, expected, rtol=1e-9):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=1e-9)


# -- T1: the same array twice in a tuple -------------------------------------------------------


@pytest.fixture
def t1():
    twice = np.array([1.0, 2.0])
    model = (twice, (twice.copy(), twice))
    return model, ost.setup(ost.Momentum(0.1, momentum=0.9), model)


def test_t1_both_gradients(t1):
    model, state = t1
    g = (np.array([3.0, 3.0]), (np.array([10.0, 10.0]), np.array([7.0, 7.0])))
    _, new = ost.update(state, model, g)
    close(new[0], [0, 1])
    close(new[1][0], [0, 1])
    assert new[0] is new[1][1]
    assert new[1][0] is not new[0]


def test_t1_second_branch_none(t1):
    model, state = t1
    _, new = ost.update(state, model, (np.array([3.0, 3.0]), None))
    close(new[0], [0.7, 1.7])
    close(new[1][0], [1, 2])
    assert new[0] is new[1][1]
    assert new[1][0] is model[1][0]  # no gradient: the very same array comes back


def test_t1_first_position_none(t1):
    model, state = t1
    _, new = ost.update(state, model, (None, (np.array([5.0, 5.0]), np.array([7.0, 7.0]))))
    close(new[0], [0.3, 1.3])
    close(new[1][0], [0.5, 1.5])
    assert new[0] is new[1][1]


def test_t1_update_is_pure(t1):
    model, state = t1
    before = [np.array(x) for x in jax.tree_util.tree_leaves(model)]
    g = (np.array([3.0, 3.0]), (np.array([10.0, 10.0]), np.array([7.0, 7.0])))
    ost.update(state, model, g)
    for x, y in zip(jax.tree_util.tree_leaves(model), before, strict=True):
        close(x, y)
    assert all(float(np.abs(v).sum()) == 0 for v in jax.tree_util.tree_leaves(state.states))


# -- T2: one float32 array at three depths, beside non-trainable leaves -------------------------


def t2_model():
    thrice = np.array([3.0], dtype=np.float32)
    return {
        "a": {"x": thrice, "y": np.array([4, 5, 6], np.float32), "z": True},
        "b": ({"m": (0, 1, thrice)},),
        "c": {"x": np.array([7, 8], np.float32), "y": thrice},
    }


def t2_grads(b_branch=True):
    f32 = np.float32
    return {
        "a": {"x": np.array([24], f32), "y": np.array([32, 40, 48], f32), "z": None},
        "b": ({"m": (None, None, np.array([96], f32))},) if b_branch else None,
        "c": {"x": np.array([56, 64], f32), "y": np.array([24], f32)},
    }


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_t2_three_depths(backend):
    model = t2_model()
    if backend == "jax":
        model = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, model
        )
        thrice = model["a"]["x"]
        model["b"][0]["m"] = (0, 1, thrice)
        model["c"]["y"] = thrice
    state = ost.setup(ost.Momentum(0.1, momentum=0.9), model)
    assert len(state.plan.params) == 3
    _, new = ost.update(state, model, t2_grads())
    close(new["a"]["x"], [-11.4], rtol=1e-6)
    assert new["a"]["x"] is new["b"][0]["m"][2] is new["c"]["y"]
    assert new["a"]["x"].dtype == np.float32
    close(new["a"]["y"], [0.8, 1.0, 1.2], rtol=1e-6)
    close(new["c"]["x"], [1.4, 1.6], rtol=1e-6)
    assert new["a"]["z"] is True
    assert new["b"][0]["m"][:2] == (0, 1)
    assert type(new["a"]["y"]) is type(model["a"]["y"])  # NumPy stays NumPy, JAX stays JAX

    _, new = ost.update(state, model, t2_grads(b_branch=False))
    close(new["a"]["x"], [-1.8], rtol=1e-6)
    assert new["a"]["x"] is new["b"][0]["m"][2] is new["c"]["y"]


# -- T3: a weight and its lazy transpose -------------------------------------------------------


def t3_model(transpose=ost.Transpose):
    mat = MAT.copy()
    return {"m": mat, "f": np.log, "t": transpose(mat), "v": np.array([7.0, 8.0, 9.0])}


def test_t3_gradients_from_jax_grad():
    """jax.grad gives the per-position gradients of the reference (a Transpose at ``t``)."""
    with jax.enable_x64(True):
        mat = jnp.asarray(MAT)
        model = {"m": mat, "t": ost.Transpose(mat), "v": jnp.array([7.0, 8.0, 9.0])}

        def loss(model, x):
            return jnp.sum((model["m"] @ jnp.log(model["t"] @ x + model["v"])) ** 2)

        g = jax.grad(loss)(model, jnp.array([1.0, 0.1]))
        assert isinstance(g["t"], ost.Transpose)
        close(g["m"], G_M, rtol=1e-9)
        close(g["t"].parent, G_T.T, rtol=1e-9)
        close(g["v"], G_V, rtol=1e-9)
        state = ost.setup(ost.Descent(0.1), model)
        _, new = ost.update(state, model, g)
        close(new["m"], T3_DESCENT)
        assert new["t"].parent is new["m"]


@pytest.mark.parametrize("transpose", [ost.Transpose, np.transpose], ids=["Transpose", "view"])
def test_t3_descent(transpose):
    model = t3_model(transpose)
    state = ost.setup(ost.Descent(0.1), model)
    _, new = ost.update(state, model, {"m": G_M, "f": None, "t": G_T, "v": G_V})
    close(new["m"], T3_DESCENT)
    if transpose is ost.Transpose:
        assert new["t"].parent is new["m"]
    else:
        assert new["t"].base is new["m"]
        close(new["t"], np.asarray(T3_DESCENT).T)
    assert new["f"] is np.log
    close(model["m"], MAT)  # pure


def test_t3_transpose_gradient_as_node():
    model = t3_model()
    state = ost.setup(ost.Descent(0.1), model)
    grads = {"m": G_M, "f": None, "t": ost.Transpose(G_T.T), "v": G_V}
    _, new = ost.update(state, model, grads)
    close(new["m"], T3_DESCENT)


def test_t3_clipping_acts_on_the_summed_gradient():
    model = t3_model()
    rule = ost.OptimiserChain(ost.ClipGrad(10), ost.Descent(0.1), ost.ClipGrad(10))
    state = ost.setup(rule, model)
    _, new = ost.update(state, model, {"m": G_M, "f": None, "t": G_T, "v": G_V})
    close(new["m"], [[0, 1, 2], [3, 4, 5]])
    assert new["t"].parent is new["m"]


# -- T3b: the transposed position comes first -------------------------------------------------


def test_t3b_transposed_position_first():
    mat = MAT.copy()
    tri = {"a": ost.Transpose(mat), "b": mat, "c": ost.Transpose(mat), "d": 4.0}
    g = {
        "a": np.array([[63887.76, 162949.68], [84137.04, 214596.72], [104386.32, 266243.76]]),
        "b": np.array([[82717.2, 93950.4, 105183.6], [197578.44, 224410.08, 251241.72]]),
        "c": np.array([[10778.16, 107781.6], [14238.6, 142386.0], [17699.04, 176990.4]]),
        "d": None,
    }
    state = ost.setup(ost.Descent(0.1), tri)
    _, new = ost.update(state, tri, g)
    expected_a = T3B_A
    close(np.asarray(new["a"]), expected_a)
    close(new["b"], np.asarray(expected_a).T)
    assert new["a"].parent is new["b"] is new["c"].parent
    assert new["d"] == 4.0


def test_t3b_gradients_from_jax_grad():
    with jax.enable_x64(True):
        mat = jnp.asarray(MAT)
        tri = {"a": ost.Transpose(mat), "b": mat, "c": ost.Transpose(mat)}

        def loss(tri, d):
            inner = tri["b"] @ (tri["c"] @ jnp.array([0.1, 1.0]) + d) - d
            return jnp.sum((tri["a"] @ inner) ** 2)

        g = jax.grad(loss)(tri, 4.0)
        state = ost.setup(ost.Descent(0.1), tri)
        _, new = ost.update(state, tri, g)
        expected_a = T3B_A
        close(jnp.asarray(new["a"]), expected_a)
        assert new["a"].parent is new["b"] is new["c"].parent


# -- T4: equal values are not ties ------------------------------------------------------------


def test_t4_equal_values_are_not_ties():
    model = {k: np.array([1.0, 2.0]) for k in "abcd"}
    state = ost.setup(ost.Momentum(0.1, momentum=0.9), model)
    assert len(state.plan.params) == 4
    assert state.plan.n_ties == 0
    grads = {k: np.array([v, v]) for k, v in zip("abcd", [3.0, 7.0, 3.0, 10.0], strict=True)}
    state, model = ost.update(state, model, grads)
    close(model["c"], [0.7, 1.7])
    state, model = ost.update(state, model, grads)
    close(model["c"], [0.13, 1.13])
    assert not np.allclose(model["a"], model["b"])


def test_t4_numbers_are_never_parameters():
    model = {"i": 3, "f": 2.5, "s": np.float32(1.0), "b": True, "n": None}
    state = ost.setup(ost.Momentum(0.1), model)
    assert state.plan.params == ()
    _, new = ost.update(state, model, {"i": 1.0, "f": 1.0, "s": 1.0, "b": None, "n": None})
    assert new == model


# -- T5: containers that share arrays ----------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class Pair:
    x: object
    y: object


@pytest.mark.parametrize("lists", [True, False], ids=["list-grads", "array-grads"])
def test_t5_containers_that_share_arrays(lists):
    pair = Pair(x=np.array([1.0]), y=np.array([2.0]))
    model = {"a": pair, "b": pair, "c": Pair(pair.x, pair.y)}
    state = ost.setup(ost.Momentum(0.01, momentum=0.9), model)
    assert len(state.plan.params) == 2
    wrap = list if lists else np.array
    grads = {
        "a": Pair(wrap([1.0]), wrap([10.0])),
        "b": Pair(wrap([100.0]), wrap([1000.0])),
        "c": Pair(wrap([1 / 3]), wrap([1 / 30])),
    }
    _, new = ost.update(state, model, grads)
    for key in "abc":
        close(new[key].x, [-0.0133333333333], rtol=1e-9)
        close(new[key].y, [-8.1003333333333], rtol=1e-9)
    assert new["a"].x is new["b"].x is new["c"].x
    assert new["a"].y is new["b"].y is new["c"].y
