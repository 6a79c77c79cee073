"""``Transpose`` behaves as ``p.T`` and keeps ``p`` as its only child."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optstate as ost


@pytest.fixture(params=["numpy", "jax"])
def w(request):
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    return x if request.param == "numpy" else jnp.asarray(x)


def test_acts_as_the_transpose(w):
    t = ost.Transpose(w)
    dense = np.asarray(w).T
    assert t.shape == (3, 2)
    assert t.ndim == 2
    assert t.size == 6
    assert t.dtype == w.dtype
    assert len(t) == 3
    assert t.T is w
    np.testing.assert_array_equal(np.asarray(t), dense)
    np.testing.assert_array_equal(jnp.asarray(t), dense)
    left = np.ones((4, 3), np.float32)
    right = np.ones((2, 5), np.float32)
    np.testing.assert_allclose(np.asarray(left @ t), left @ dense)
    np.testing.assert_allclose(np.asarray(jnp.asarray(left) @ t), left @ dense)
    np.testing.assert_allclose(np.asarray(t @ right), dense @ right)
    np.testing.assert_allclose(np.asarray(t @ jnp.asarray(right)), dense @ right)


def test_is_a_pytree_node_with_one_child(w):
    t = ost.Transpose(w)
    leaves, treedef = jax.tree_util.tree_flatten(t)
    assert len(leaves) == 1
    assert leaves[0] is w
    assert isinstance(treedef.unflatten([w]), ost.Transpose)
    (path, _), *_ = jax.tree_util.tree_flatten_with_path({"dec": t})[0]
    assert jax.tree_util.keystr(path) == "['dec'].parent"


def test_inside_grad_and_jit():
    w = jnp.arange(6.0).reshape(2, 3) / 10
    x = jnp.ones((4, 3))

    def loss(t, x):
        return jnp.sum((x @ t) ** 2)

    g = jax.grad(loss)(ost.Transpose(w), x)
    assert isinstance(g, ost.Transpose)
    expected = jax.grad(lambda w, x: jnp.sum((x @ w.T) ** 2))(w, x)
    np.testing.assert_allclose(g.parent, expected, rtol=1e-6)
    value = jax.jit(loss)(ost.Transpose(w), x)
    np.testing.assert_allclose(value, loss(ost.Transpose(w), x), rtol=1e-6)


def test_repr():
    assert repr(ost.Transpose(np.zeros((2, 3)))) == "Transpose(ndarray[2x3])"
