"""What ``setup`` counts as a tie, and what it refuses."""

from collections import namedtuple
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optstate as ost


def n_params(model):
    return len(ost.setup(ost.Descent(), model).plan.params)


def test_same_object_is_one_parameter():
    w = jnp.ones((2, 2))
    assert n_params({"a": w, "b": w, "c": [w, (w,)]}) == 1
    assert n_params({"a": w, "b": jnp.ones((2, 2))}) == 2


@pytest.mark.parametrize(
    "view",
    [lambda w: w.T, np.transpose, lambda w: w.swapaxes(0, 1), lambda w: w[:], lambda w: w.view()],
    ids=["T", "np.transpose", "swapaxes", "full-slice", "view"],
)
def test_numpy_views_of_the_same_memory_are_ties(view):
    w = np.arange(6.0).reshape(2, 3)
    state = ost.setup(ost.Descent(), {"w": w, "v": view(w)})
    assert len(state.plan.params) == 1


def test_view_first_then_owner():
    w = np.arange(6.0).reshape(2, 3)
    model = [w.T, w]  # the owner of the memory is the base orientation, wherever it stands
    state = ost.setup(ost.Descent(1.0), model)
    (param,) = state.plan.params
    assert param.shape == (2, 3)
    _, new = ost.update(state, model, [np.ones((3, 2)), np.ones((2, 3))])
    np.testing.assert_allclose(new[1], w - 2)
    assert new[0].base is new[1]


def test_higher_rank_permutations():
    w = np.arange(24.0).reshape(2, 3, 4)
    model = {"w": w, "p": w.transpose(1, 2, 0), "r": w.T}
    state = ost.setup(ost.Descent(1.0), model)
    assert len(state.plan.params) == 1
    g = {"w": np.ones((2, 3, 4)), "p": np.full((3, 4, 2), 2.0), "r": np.full((4, 3, 2), 3.0)}
    _, new = ost.update(state, model, g)
    np.testing.assert_allclose(new["w"], w - 6)
    np.testing.assert_array_equal(new["p"], new["w"].transpose(1, 2, 0))
    np.testing.assert_array_equal(new["r"], new["w"].T)


PERMUTED = {  # views of 5-D and 6-D arrays: any permutation of the axes is a tie
    "5-D swapaxes": ((2, 3, 4, 5, 6), (1, 0, 2, 3, 4)),
    "5-D reversed": ((2, 3, 4, 5, 6), (4, 3, 2, 1, 0)),
    "6-D mixed": ((2, 3, 1, 4, 5, 2), (5, 3, 0, 1, 4, 2)),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(PERMUTED))
def test_any_permutation_of_many_axes_is_a_tie(case, backend):
    """The tie is found from the strides for any number of axes (once limited to 4); the step is
    hand arithmetic: the gradient of the view permuted back and added to the base's."""
    import torch

    shape, perm = PERMUTED[case]
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=shape)
    gw, gv = rng.normal(size=shape), rng.normal(size=tuple(shape[a] for a in perm))
    if backend == "torch":
        w, as_view, to = torch.tensor(w0), lambda x: x.permute(perm), torch.tensor
    else:
        w, as_view, to = w0.copy(), lambda x: x.transpose(perm), np.asarray
    model = {"w": w, "v": as_view(w)}
    state = ost.setup(ost.Descent(0.5), model)
    assert len(state.plan.params) == 1
    expected = w0 - 0.5 * (gw + gv.transpose(np.argsort(perm)))
    _, new = ost.update(state, model, {"w": to(gw), "v": to(gv)})
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(new["v"]), expected.transpose(perm))
    _, same = ost.update_(state, model, {"w": to(gw), "v": to(gv)})
    assert same["w"] is w
    np.testing.assert_allclose(np.asarray(w), expected, rtol=1e-15)
    np.testing.assert_array_equal(np.asarray(model["v"]), expected.transpose(perm))


def test_transpose_of_a_view_composes():
    w = np.arange(6.0).reshape(2, 3)
    model = {"w": w, "t": ost.Transpose(w.T)}  # Transpose(w.T) is w itself
    state = ost.setup(ost.Descent(1.0), model)
    _, new = ost.update(state, model, {"w": np.ones((2, 3)), "t": np.ones((2, 3))})
    np.testing.assert_allclose(new["w"], w - 2)
    np.testing.assert_array_equal(np.asarray(new["t"]), new["w"])


@pytest.mark.parametrize(
    ("other", "what"),
    [
        (lambda w: w[0], "slice"),
        (lambda w: w[:, :2], "slice"),
        (lambda w: w.reshape(3, 2), "reshape"),
        (lambda w: w.reshape(-1), "reshape"),
    ],
)
def test_other_overlaps_are_refused(other, what):
    w = np.arange(6.0).reshape(2, 3)
    with pytest.raises(ost.TieError, match=r"model\['a'\] and model\['b'\] share memory"):
        ost.setup(ost.Descent(), {"a": w, "b": other(w)})


def test_partial_overlap_between_two_views_is_refused():
    buf = np.arange(10.0)
    with pytest.raises(ost.TieError, match=r"model\[0\] and model\[1\] share memory.*shapes"):
        ost.setup(ost.Descent(), [buf[0:6], buf[4:10]])


def test_disjoint_views_of_one_buffer_are_separate_parameters():
    buf = np.arange(12.0).reshape(3, 4)
    model = [buf[:, 0], buf[:, 1], buf[:2], buf[2:]]
    with pytest.raises(ost.TieError):  # rows overlap the columns
        ost.setup(ost.Descent(), model)
    assert n_params([buf[:, 0], buf[:, 1]]) == 2
    assert n_params([buf[:1], buf[1:]]) == 2


def test_non_trainable_leaves_pass_through():
    ints = np.arange(3)
    model = {
        "int_array": ints,
        "bool_array": np.array([True, False]),
        "py": (1, 2.0, True, "name", None),
        "fn": jax.nn.relu,
        "x": np.ones(2, np.float32),
    }
    state = ost.setup(ost.Momentum(0.1), model)
    assert len(state.plan.params) == 1
    grads = {"int_array": None, "bool_array": None, "py": None, "fn": None, "x": np.ones(2)}
    _, new = ost.update(state, model, grads)
    assert new["int_array"] is ints
    assert new["py"] == (1, 2.0, True, "name", None)
    assert new["fn"] is jax.nn.relu


def test_same_integer_array_twice_is_no_tie():
    ints = np.arange(3)
    assert ost.setup(ost.Descent(), {"a": ints, "b": ints}).plan.params == ()


Point = namedtuple("Point", ["w", "b"])


@jax.tree_util.register_dataclass
@dataclass
class Layer:
    w: object
    b: object


class Tied(eqx.Module):
    enc: jax.Array
    dec: ost.Transpose
    act: object = eqx.field(static=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda w: Point(w, [w]),
        lambda w: Layer(w, {"again": w}),
        lambda w: Tied(w, ost.Transpose(w), jax.nn.relu),
        lambda w: {"params": {"Dense_0": {"kernel": w}, "Dense_1": {"kernel": ost.Transpose(w)}}},
    ],
    ids=["namedtuple", "dataclass", "equinox", "flax-dict"],
)
def test_pytree_kinds(make):
    w = jnp.arange(4.0).reshape(2, 2)
    model = make(w)
    state = ost.setup(ost.Momentum(0.1), model)
    assert len(state.plan.params) == 1
    grads = jax.tree_util.tree_map(jnp.ones_like, model)
    _, new = ost.update(state, model, grads)
    leaves = jax.tree_util.tree_leaves(new)
    assert all(leaf is leaves[0] for leaf in leaves)
    assert type(new) is type(model)
    np.testing.assert_allclose(leaves[0], w - 0.1 * len(leaves))


def test_flax_frozen_dict():
    from flax.core import freeze

    w = jnp.ones((2, 3))
    model = freeze({"params": {"a": {"kernel": w}, "b": {"kernel": w}}})
    state = ost.setup(ost.Descent(1.0), model)
    _, new = ost.update(state, model, jax.tree_util.tree_map(jnp.ones_like, model))
    assert new["params"]["a"]["kernel"] is new["params"]["b"]["kernel"]
    np.testing.assert_allclose(new["params"]["a"]["kernel"], w - 2)
