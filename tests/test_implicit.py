"""optstate.implicit, the implicit-parameters bridge, against independent references.

References: ``jax.grad`` of hand-written functions of the *unique* weights (each tied weight an
argument once, its uses written out), numbers worked out by hand and checked by finite
differences, and ``optstate.update`` fed with ``jax.grad``'s structural gradient of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optstate as ost
from optstate import implicit

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "migrate_implicit.py"


def f32(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def close(actual: Any, expected: Any, rtol: float = 1e-6) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=1e-6)


RNG = np.random.default_rng(0)
W0 = f32(RNG.normal(size=(4, 3)))
X = f32(RNG.normal(size=(5, 4)))


def tied_model(kind: str) -> dict[str, Any]:
    """An autoencoder whose decoder reuses the encoder's weight, tied in one of three ways."""
    if kind == "numpy_view":
        w: Any = W0.copy()
        dec: Any = w.T  # a NumPy view: the same memory, transposed
    else:
        w = jnp.asarray(W0)
        dec = ost.Transpose(w) if kind == "transpose" else w.T
    model = {"enc": {"w": w, "b": jnp.zeros(3)}, "dec": {"w": dec, "b": jnp.zeros(4)}}
    if kind == "same":  # the same object twice: a weight applied twice (4x4, so it composes)
        sq = jnp.asarray(f32(RNG.normal(size=(4, 4))))
        model = {"enc": {"w": sq, "b": jnp.zeros(4)}, "dec": {"w": sq, "b": jnp.zeros(4)}}
    return model


def ae_loss(model: dict[str, Any], x: Any) -> jax.Array:
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    return jnp.mean((h @ model["dec"]["w"] + model["dec"]["b"][None, :] - x) ** 2)


def reference_gradient(kind: str, model: dict[str, Any]) -> dict[str, Any]:
    """jax.grad of the loss written as a function of the unique weights (W appears once)."""
    w = jnp.asarray(model["enc"]["w"])

    def loss(w: Any, b_enc: Any, b_dec: Any) -> jax.Array:
        dec = w if kind == "same" else w.T
        h = jnp.tanh(X @ w + b_enc[None, :])
        return jnp.mean((h @ dec + b_dec[None, :] - X) ** 2)

    gw, ge, gd = jax.grad(loss, argnums=(0, 1, 2))(w, model["enc"]["b"], model["dec"]["b"])
    return {"w": gw, "b_enc": ge, "b_dec": gd}


# -- params --------------------------------------------------------------------------------


def test_same_object_twice_is_one_parameter() -> None:
    w, other = np.ones((2, 3)), np.zeros(3)
    ps = implicit.params({"a": w, "b": [w, other], "c": w})
    assert len(ps) == 2
    assert [id(p) for p in ps] == [id(w), id(other)]
    assert ps.where(w) == ("model['a']", "model['b'][0]", "model['c']")


@pytest.mark.parametrize("lib", [np, jnp])
def test_transpose_resolves_to_its_parent(lib: Any) -> None:
    w = lib.ones((2, 3))
    ps = implicit.params([ost.Transpose(w)])
    assert len(ps) == 1
    assert next(iter(ps)) is w
    assert w in ps
    assert ost.Transpose(w) in ps
    assert ost.Transpose(ost.Transpose(w)) in ps
    assert implicit.params([w, ost.Transpose(w)]).where(w) == ("model[0]", "model[1]")


def test_numpy_views_resolve_to_their_parent() -> None:
    w = np.ones((2, 3))
    ps = implicit.params({"t": w.T, "w": w, "alias": w[:]})
    assert len(ps) == 1
    assert next(iter(ps)) is w
    assert w.T in ps
    assert np.transpose(w) in ps
    assert w.swapaxes(0, 1) in ps
    only_view = implicit.params([w.T])
    assert len(only_view) == 1
    assert w in only_view


def test_equal_values_are_not_tied() -> None:
    a = np.array([1.0, 2.0])
    ps = implicit.params([a, a.copy(), jnp.asarray(a), np.array([1.0, 2.0])])
    assert len(ps) == 4
    assert a.copy() not in ps


def test_only_float_and_complex_arrays_are_parameters() -> None:
    model = {
        "f": np.ones(2, np.float32),
        "c": jnp.ones(2, jnp.complex64),
        "i": np.arange(3),
        "bool": jnp.ones(2, bool),
        "num": 1.5,
        "s": "text",
        "fn": np.sum,
        "none": None,
    }
    ps = implicit.params(model)
    assert {ps.where(p)[0] for p in ps} == {"model['f']", "model['c']"}
    assert model["i"] not in ps
    assert 1.5 not in ps


def test_jax_transpose_is_a_new_array_not_an_alias() -> None:
    w = jnp.ones((2, 3))
    assert w.T not in implicit.params([w])


def test_slices_are_refused() -> None:
    w = np.ones((3, 3))
    with pytest.raises(ost.TieError, match=r"model\['a'\] and model\['b'\] share memory"):
        implicit.params({"a": w, "b": w[0]})


def test_plain_objects_are_walked_through_their_attributes() -> None:
    class Layer:
        def __init__(self, w: Any) -> None:
            self.w = w
            self.b = np.zeros(w.shape[1])
            self.owner: Any = None

    w = np.ones((2, 3))
    net = [Layer(w), Layer(ost.Transpose(w))]
    net[1].owner = net  # a cycle back to the container: walked once
    ps = implicit.params(net)
    assert len(ps) == 3
    assert ps.where(w) == ("model[0].w", "model[1].w")


def test_repr_names_the_positions() -> None:
    w = np.ones((2, 3), np.float32)
    text = repr(implicit.params({"enc": w, "dec": ost.Transpose(w), "b": np.zeros(2)}))
    assert text == ("Params(float64[2] at model['b']; float32[2, 3] at model['dec'], model['enc'])")


# -- gradient: the total over all uses -----------------------------------------------------


@pytest.mark.parametrize("kind", ["transpose", "numpy_view", "same"])
def test_gradient_of_a_tied_model_is_the_total(kind: str) -> None:
    model = tied_model(kind)
    ps = implicit.params(model)
    assert len(ps) == 3
    value, grads = implicit.value_and_gradient(lambda: ae_loss(model, X), ps)
    ref = reference_gradient(kind, model)
    close(value, ae_loss(model, X))
    close(grads[model["enc"]["w"]], ref["w"])
    close(grads[model["enc"]["b"]], ref["b_enc"])
    close(grads[model["dec"]["b"]], ref["b_dec"])


def test_numpy_parameters_get_numpy_gradients_of_their_dtype() -> None:
    w = np.array([[1.0, 2.0]])  # float64; JAX computes in float32 unless x64 is enabled
    model = {"w": w, "t": w.T}
    grads = implicit.gradient(lambda: jnp.sum(model["w"] @ model["t"]), implicit.params(model))
    g = grads[w]
    assert isinstance(g, np.ndarray)
    assert g.dtype == np.float64
    close(g, [[2.0, 4.0]])  # d/dw (w w^T) = 2w: both uses
    w -= 0.5 * g  # the implicit style's in-place step works on a NumPy parameter
    close(model["t"], [[0.0], [0.0]])


_SCRIPT_W = np.array([[1.0, 2.0]], dtype=np.float32)
_SCRIPT_WT = _SCRIPT_W.T


def _script_loss() -> jax.Array:
    return jnp.sum(_SCRIPT_W @ _SCRIPT_WT)  # w.w = 5


def _script_entry() -> jax.Array:
    return 3.0 * _script_loss()


def test_gradient_follows_globals_and_helpers_of_the_module() -> None:
    grads = implicit.gradient(_script_entry, implicit.params([_SCRIPT_W]))
    close(grads[_SCRIPT_W], 3.0 * 2.0 * _SCRIPT_W)
    assert isinstance(_SCRIPT_W, np.ndarray)
    assert _SCRIPT_WT.base is _SCRIPT_W


def test_immutable_containers_are_rebuilt_for_the_call_and_put_back() -> None:
    w = jnp.asarray(f32([[1.0, 2.0], [3.0, 4.0]]))
    pair = (w, ost.Transpose(w))
    model = {"pair": pair}
    seen = []

    def loss() -> jax.Array:
        seen.append(id(model["pair"]))  # the loss does not name the tuple itself
        a, b = model["pair"]
        return jnp.sum(a @ b)

    grads = implicit.gradient(loss, implicit.params(model))
    close(grads[w], jax.grad(lambda v: jnp.sum(v @ v.T))(w))
    assert seen != [id(pair)]  # a rebuilt tuple holding the traced values
    assert model["pair"] is pair
    assert pair[1].parent is w


def test_methods_partials_and_callable_objects() -> None:
    class Net:
        def __init__(self) -> None:
            self.w = jnp.asarray(f32([[1.0, -1.0]]))
            self.t = ost.Transpose(self.w)

        def __call__(self) -> jax.Array:
            return jnp.sum((self.w @ self.t) ** 2)  # (w.w)^2: gradient 4 (w.w) w

    net = Net()
    expected = 4 * 2.0 * net.w
    for loss in (net, net.__call__, functools.partial(Net.__call__, net)):
        close(implicit.gradient(loss, implicit.params(net))[net.w], expected)


def test_untouched_parameter_gets_zeros() -> None:
    model = {"used": jnp.ones(2), "np": np.ones((2, 2), np.float32), "jax": jnp.ones(3)}
    grads = implicit.gradient(lambda: jnp.sum(model["used"] ** 2), implicit.params(model))
    assert isinstance(grads[model["np"]], np.ndarray)
    assert grads[model["np"]].dtype == np.float32
    assert np.all(grads[model["np"]] == 0.0)
    assert np.all(grads[model["jax"]] == 0.0)
    close(grads[model["used"]], [2.0, 2.0])


def test_a_loss_reaching_no_parameter_is_an_error() -> None:
    model = {"w": jnp.ones(2)}
    ps = implicit.params(model)
    model = {"w": jnp.ones(2)}  # a new model: the closure no longer sees the recorded one
    with pytest.raises(ValueError, match="does not depend on any of the 1 parameters"):
        implicit.gradient(lambda: jnp.sum(model["w"]), ps)


def test_the_loss_must_be_a_real_scalar() -> None:
    model = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match="must return a real scalar"):
        implicit.gradient(lambda: model["w"] * 2.0, implicit.params(model))


# -- always restored -------------------------------------------------------------------------


def test_everything_is_put_back_when_the_loss_raises() -> None:
    w = jnp.ones((2, 2))
    view_base = np.ones((2, 3), np.float32)
    t = ost.Transpose(w)
    inner = (w, view_base.T)
    model = {"w": w, "t": t, "inner": inner, "v": view_base}
    held = w

    def loss() -> jax.Array:
        total = jnp.sum(held @ model["t"]) + jnp.sum(model["inner"][1])
        raise RuntimeError(f"boom at {type(total).__name__}")

    with pytest.raises(RuntimeError, match="boom"):
        implicit.gradient(loss, implicit.params(model))
    assert model["w"] is w
    assert model["t"] is t
    assert t.parent is w
    assert held is w
    assert model["inner"] is inner
    assert inner[1].base is view_base
    assert not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(model))


def test_everything_is_put_back_when_jax_refuses_the_loss() -> None:
    model = {"w": jnp.ones(2)}
    w = model["w"]
    with pytest.raises(jax.errors.ConcretizationTypeError):
        implicit.gradient(lambda: jnp.asarray(float(model["w"][0])), implicit.params(model))
    assert model["w"] is w


def test_globals_are_put_back_after_an_error() -> None:
    def failing() -> jax.Array:
        assert isinstance(_SCRIPT_W, jax.core.Tracer)
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        implicit.gradient(failing, implicit.params([_SCRIPT_W]))
    assert isinstance(_SCRIPT_W, np.ndarray)
    assert _SCRIPT_WT.base is _SCRIPT_W


# -- stale params: replaced arrays are errors --------------------------------------------------


def test_a_replaced_array_is_an_error_in_gradient() -> None:
    model = {"enc": {"w": jnp.ones(2)}, "b": jnp.ones(2)}
    ps = implicit.params(model)
    model["enc"]["w"] = jnp.zeros(2)
    with pytest.raises(implicit.StaleParamsError, match=r"gradient: model\['enc'\]\['w'\] held"):
        implicit.gradient(lambda: jnp.sum(model["enc"]["w"] * model["b"]), ps)


def test_a_replaced_array_is_an_error_in_to_tree() -> None:
    model = {"w": jnp.ones(2)}
    ps = implicit.params(model)
    grads = implicit.gradient(lambda: jnp.sum(model["w"] ** 2), ps)
    model["w"] = jnp.zeros(2)
    with pytest.raises(implicit.StaleParamsError, match=r"to_tree: model\['w'\] held .*another"):
        grads.to_tree(model)
    _, new = ost.update(ost.setup(ost.Descent(), {"w": jnp.ones(2)}), {"w": jnp.ones(2)}, None)
    with pytest.raises(implicit.StaleParamsError, match=r"take implicit\.params"):
        grads.to_tree(new)  # the model update returned: new arrays, so new params


def test_a_removed_position_or_attribute_is_an_error() -> None:
    class Layer:
        def __init__(self) -> None:
            self.w = np.ones(2)

    layer = Layer()
    ps = implicit.params(layer)
    layer.w = np.ones(2)
    with pytest.raises(implicit.StaleParamsError, match=r"model\.w held"):
        implicit.gradient(lambda: jnp.sum(layer.w), ps)
    model = {"a": np.ones(2)}
    ps = implicit.params(model)
    del model["a"]
    with pytest.raises(implicit.StaleParamsError, match="position is gone"):
        implicit.gradient(lambda: jnp.sum(jnp.ones(2)), ps)


def test_a_new_view_of_the_same_parameter_is_not_stale() -> None:
    w = np.ones((2, 3), np.float32)
    model = {"w": w, "t": w.T}
    ps = implicit.params(model)
    model["t"] = w.T  # another view object, the same parameter in the same orientation
    grads = implicit.gradient(lambda: jnp.sum(model["w"] @ model["t"]), ps)
    # sum(w w^T) = |w_1 + w_2|^2 over the rows w_i, so each row's gradient is 2 (w_1 + w_2)
    close(grads[w], np.broadcast_to(2 * w.sum(axis=0), (2, 3)))


# -- lookups -----------------------------------------------------------------------------------


def test_alias_lookups_give_the_total_in_the_alias_orientation() -> None:
    model = tied_model("transpose")
    w = model["enc"]["w"]
    grads = implicit.gradient(lambda: ae_loss(model, X), implicit.params(model))
    total = reference_gradient("transpose", model)["w"]
    close(grads[w], total)
    close(grads[model["dec"]["w"]], total.T)
    close(grads[ost.Transpose(w)], total.T)  # a fresh alias object works too
    close(grads[ost.Transpose(ost.Transpose(w))], total)
    assert grads[ost.Transpose(w)].shape == (3, 4)


def test_numpy_view_lookups_follow_any_axis_permutation() -> None:
    base = f32(RNG.normal(size=(2, 3, 4)))
    model = {"p": base.transpose(1, 2, 0)}  # only a view is in the model
    coef = f32(RNG.normal(size=(3, 4, 2)))
    grads = implicit.gradient(lambda: jnp.sum(model["p"] * coef), implicit.params(model))
    close(grads[model["p"]], coef)  # the view's own orientation
    close(grads[base], coef.transpose(2, 0, 1))  # the base's
    close(grads[base.transpose(2, 1, 0)], coef.transpose(2, 0, 1).transpose(2, 1, 0))


def test_looking_up_a_non_parameter_is_a_key_error() -> None:
    w = np.ones((3, 2), np.float32)
    j = jnp.ones((2, 2))
    model = {"w": w, "j": j}
    grads = implicit.gradient(
        lambda: jnp.sum(model["w"]) + jnp.sum(model["j"]), implicit.params(model)
    )
    with pytest.raises(KeyError, match=r"NumPy float32\[3, 2\] is not one of the 2 parameters"):
        grads[w.copy()]
    with pytest.raises(KeyError, match=r"in JAX p\.T is a new array"):
        grads[j.T]
    with pytest.raises(KeyError, match=r"slice or reshape of it"):
        grads[w[0]]
    with pytest.raises(KeyError, match="parameters are arrays"):
        grads["w"]
    assert grads.get(w.copy()) is None
    assert w[0] not in grads
    assert j in grads


def test_grads_is_a_mapping_over_the_params() -> None:
    model = {"a": np.ones(2, np.float32), "b": ost.Transpose(np.ones((2, 2), np.float32))}
    ps = implicit.params(model)
    grads = implicit.gradient(lambda: jnp.sum(model["a"] * 3.0), ps)
    assert len(grads) == 2
    assert grads.params is ps
    assert [id(k) for k in grads] == [id(k) for k in ps] == [id(k) for k in grads]
    assert [id(k) for k, _ in grads.items()] == [id(k) for k in ps]
    close(next(iter(grads.values())), [3.0, 3.0])
    assert repr(grads) == "Grads(float32[2], float32[2, 2])"


# -- to_tree: counted once by update -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["transpose", "numpy_view", "same"])
@pytest.mark.parametrize(
    "rule", [ost.Momentum(0.1, momentum=0.9), ost.Adam(1e-2)], ids=["momentum", "adam"]
)
def test_update_with_to_tree_equals_update_with_the_structural_gradient(
    kind: str, rule: ost.Rule
) -> None:
    start = tied_model(kind)
    bridged, explicit = start, start
    s1 = s2 = ost.setup(rule, start)

    def bridge_loss() -> jax.Array:  # implicit style: reads the current model
        return ae_loss(bridged, X)

    for _ in range(3):
        ps = implicit.params(bridged)
        tree = implicit.gradient(bridge_loss, ps).to_tree(bridged)
        n_given = sum(g is not None for g in jax.tree.leaves(tree, is_leaf=_is_none_or_leaf))
        assert n_given == len(ps)  # one position per parameter
        s1, bridged = ost.update(s1, bridged, tree)
        s2, explicit = ost.update(s2, explicit, jax.grad(ae_loss)(explicit, X))
    for a, b in zip(jax.tree.leaves(bridged), jax.tree.leaves(explicit), strict=True):
        close(a, b, rtol=1e-5)


def _is_none_or_leaf(x: Any) -> bool:
    return x is None or isinstance(x, ost.Transpose)


def test_to_tree_gives_each_position_its_form() -> None:
    w = np.ones((2, 3), np.float32)
    base = np.ones((2, 3, 4), np.float32)
    model = {"only_t": ost.Transpose(w), "perm": base.transpose(2, 0, 1), "b": np.zeros(2)}
    totals = [np.arange(24.0).reshape(2, 3, 4), np.zeros(2), np.full((2, 3), 7.0)]
    ps = implicit.params(model)
    assert [p.shape for p in ps] == [(2,), (2, 3), (4, 2, 3)]  # b, only_t, perm
    tree = implicit.Grads(ps, [totals[1], totals[2], totals[0].transpose(2, 0, 1)]).to_tree(model)
    assert isinstance(tree["only_t"], ost.Transpose)
    assert tree["only_t"].parent.shape == (2, 3)
    assert tree["perm"].shape == (4, 2, 3)
    _, new = ost.update(ost.setup(ost.Descent(1.0), model), model, tree)
    close(new["only_t"].parent, w - 7.0)
    close(new["perm"], model["perm"] - totals[0].transpose(2, 0, 1))


def test_to_tree_puts_the_total_where_the_array_itself_sits() -> None:
    w = np.ones((2, 3), np.float32)
    model = {"a": ost.Transpose(w), "b": w.T, "c": w, "d": ost.Transpose(w)}
    tree = implicit.Grads(implicit.params(model), [np.full((2, 3), 4.0)]).to_tree(model)
    assert tree["a"] is None
    assert tree["b"] is None
    assert tree["d"] is None
    close(tree["c"], np.full((2, 3), 4.0))


def test_grads_from_totals_checks_their_shapes() -> None:
    w, b = np.ones((2, 3), np.float32), np.zeros(2, np.float32)
    ps = implicit.params({"b": b, "w": w})
    grads = implicit.Grads(ps, [jnp.ones(2), np.ones((2, 3))])  # cast to each parameter's kind
    assert isinstance(grads[b], np.ndarray)
    assert grads[w].dtype == np.float32
    with pytest.raises(ValueError, match=r"model\['b'\] has shape \(2, 3\), expected \(2,\)"):
        implicit.Grads(ps, [np.ones((2, 3)), np.ones(2)])  # the order of params matters


def test_to_tree_refuses_parameters_inside_plain_objects() -> None:
    class Layer:
        def __init__(self, w: Any) -> None:
            self.w = w

    w = jnp.ones(2)
    model = {"layer": Layer(w), "w": w}
    ps = implicit.params(model)
    grads = implicit.gradient(lambda: jnp.sum(model["layer"].w * model["w"]), ps)
    close(grads[w], 2 * w)  # gradient sees both uses
    with pytest.raises(TypeError, match=r"model\['layer'\]\.w lives inside an object"):
        grads.to_tree(model)


def test_update_accepts_grads_directly() -> None:
    model = tied_model("transpose")
    state = ost.setup(ost.Adam(1e-2), model)
    grads = implicit.gradient(lambda: ae_loss(model, X), implicit.params(model))
    _, direct = ost.update(state, model, grads)
    _, via_tree = ost.update(state, model, grads.to_tree(model))
    for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(via_tree), strict=True):
        np.testing.assert_array_equal(a, b)


# -- from_tree ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["transpose", "numpy_view", "same"])
def test_from_tree_sums_the_positions_of_each_parameter(kind: str) -> None:
    model = tied_model(kind)
    grads = implicit.Grads.from_tree(model, jax.grad(ae_loss)(model, X))
    ref = reference_gradient(kind, model)
    close(grads[model["enc"]["w"]], ref["w"])
    close(grads[model["dec"]["w"]], ref["w"] if kind == "same" else ref["w"].T)
    close(grads[model["dec"]["b"]], ref["b_dec"])


def test_from_tree_conventions() -> None:
    w = np.zeros((2, 3), np.float32)
    model = {"enc": w, "dec": ost.Transpose(w), "b": np.zeros(2, np.float32)}
    dense_t = np.full((3, 2), 2.0)  # a dense gradient at a Transpose: the transposed orientation
    grads = implicit.Grads.from_tree(model, {"enc": np.ones((2, 3)), "dec": dense_t, "b": None})
    close(grads[w], np.full((2, 3), 3.0))
    assert grads[w].dtype == np.float32
    assert np.all(grads[model["b"]] == 0.0)  # no gradient anywhere: zeros
    only_dec = implicit.Grads.from_tree(
        model, {"enc": None, "dec": ost.Transpose(w + 1), "b": None}
    )
    close(only_dec[w], np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"grads\['dec'\] has shape \(2, 3\), expected \(3, 2\)"):
        implicit.Grads.from_tree(model, {"enc": None, "dec": np.ones((2, 3)), "b": None})
    with pytest.raises(ost.StructureError):
        implicit.Grads.from_tree(model, [1.0])


# -- the six aliasing cases of the Zygote discussion -------------------------------------------
#
# x is a 2x1 column and xt its transpose, as ``Transpose(x)`` or as the NumPy view ``x.T``. Loss
# A is sum(x.T * x) = (x1 + x2)^2, with gradient 2 (x1 + x2) = 6 in both entries of x = [1, 2];
# loss B is sum(xt.parent * x) = x1^2 + x2^2, with gradient 2x = [2, 4]. (``xt.parent`` is
# ``xt.T`` for the NumPy view: a view of x in x's orientation.) Zygote's implicit gradients gave
# only part of the gradient under the key looked up in cases 2, 3 and 6, and nothing for xt in
# case 5; here every case has one parameter and the full gradient under every alias.

X_COLUMN = [[1.0], [2.0]]
GRAD_A = [[6.0], [6.0]]  # by hand: 2 * (1 + 2)
GRAD_B = [[2.0], [4.0]]  # by hand: 2 * x


def _six_case(case: int, alias_kind: str) -> tuple[np.ndarray, Any, Any, Any]:
    x = f32(X_COLUMN)
    xt: Any = ost.Transpose(x) if alias_kind == "transpose" else x.T

    def dense(a: Any) -> Any:  # xt as an array in its own orientation
        return jnp.asarray(a) if isinstance(a, ost.Transpose) else a

    def parent(a: Any) -> Any:
        return a.parent if isinstance(a, ost.Transpose) else a.T

    given, loss, expected = {
        1: ([x], lambda: jnp.sum(x.T * x), GRAD_A),
        2: ([x], lambda: jnp.sum(dense(xt) * x), GRAD_A),
        3: ([x, xt], lambda: jnp.sum(dense(xt) * x), GRAD_A),
        4: ([x], lambda: jnp.sum(parent(xt) * x), GRAD_B),
        5: ([x, xt], lambda: jnp.sum(parent(xt) * x), GRAD_B),
        6: ([xt], lambda: jnp.sum(parent(xt) * x), GRAD_B),
    }[case]
    return x, xt, implicit.gradient(loss, implicit.params(given)), expected


@pytest.mark.parametrize("alias_kind", ["transpose", "numpy_view"])
@pytest.mark.parametrize("case", [1, 2, 3, 4, 5, 6])
def test_six_aliasing_cases(case: int, alias_kind: str) -> None:
    x, xt, grads, expected = _six_case(case, alias_kind)
    assert len(grads.params) == 1  # x and xt are one parameter, whatever went into params
    assert x in grads
    assert xt in grads
    np.testing.assert_array_equal(grads[x], f32(expected))
    np.testing.assert_array_equal(grads[xt], f32(expected).T)  # the same total, xt's orientation
    assert isinstance(xt, ost.Transpose) or xt.base is x  # put back after the call


def test_six_case_reference_numbers() -> None:
    """The hand-worked gradients agree with finite differences and with jax.grad of x alone."""
    x = np.asarray(X_COLUMN)
    cases = [
        (lambda v: np.sum(v.T * v), lambda v: jnp.sum(v.T * v), GRAD_A),
        (lambda v: np.sum(v * v), lambda v: jnp.sum(v * v), GRAD_B),
    ]
    for f, f_jax, expected in cases:
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = 1e-6
            fd[i] = (f(x + e) - f(x - e)) / 2e-6
        close(fd, expected, rtol=1e-5)
        close(jax.grad(f_jax)(f32(x)), expected)


# -- the example -------------------------------------------------------------------------------


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("migrate_implicit", EXAMPLE)
    assert spec is not None, EXAMPLE
    assert spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_bridge_and_explicit_training_are_identical(
    capsys: pytest.CaptureFixture[str],
) -> None:
    module = load_example()
    assert capsys.readouterr().out == ""  # importing does not run it
    figures = module.main(["--steps", "8"])
    assert figures["max_abs_diff"] == 0.0
    assert figures["ties_kept"] is True
    assert figures["implicit_loss"] == figures["explicit_loss"] < figures["initial_loss"]
    assert "max |implicit - explicit| over all weights: 0.0" in capsys.readouterr().out


# -- every place the loss reaches a parameter is substituted, or refused: never a partial gradient
#
# W = [1, 2] read twice, once through the model and once through another place: the loss is
# sum(W * W), whose gradient jax.grad gives as 2W = [2, 4]. Substituting only the model's W would
# give [1, 2] (the other read a constant).

W_TWICE = [1.0, 2.0]


def twice_reference() -> jax.Array:
    return jax.grad(lambda w: jnp.sum(w * w))(jnp.asarray(W_TWICE))


class Slotted:
    __slots__ = ("__hidden", "w")

    def __init__(self, w: Any) -> None:
        self.w = w
        self.__hidden = w  # a private (name-mangled) slot

    def hidden(self) -> Any:
        return self.__hidden


@dataclasses.dataclass(slots=True)
class SlottedData:
    w: Any


@dataclasses.dataclass(frozen=True)
class FrozenPlain:  # not a pytree: JAX sees it as a leaf
    w: Any


class AttrDict(dict):  # type: ignore[type-arg]
    def __getattr__(self, name: str) -> Any:
        return self[name]


class Items(list):  # type: ignore[type-arg]
    pass


class Holder:
    pass


def dense(w: Any) -> Any:
    """A layer as a closure, the way script-style code builds one."""
    return lambda x: x * w


def reading(obj: Any, read: Any) -> Any:
    """A function of no arguments that reads ``obj`` (held in its closure) with ``read``."""
    return lambda: read(obj)


def _second_reads() -> dict[str, tuple[jax.Array, Any]]:
    """A function of no arguments reading W through each kind of place, keyed by the place."""
    w = jnp.asarray(W_TWICE)
    holder = Holder()
    holder.enc = dense(w)
    return {
        "slots": (w, reading(Slotted(w), lambda s: s.w)),
        "mangled slot": (w, reading(Slotted(w), lambda s: s.hidden())),
        "dataclass slots": (w, reading(SlottedData(w), lambda s: s.w)),
        "frozen dataclass": (w, reading(FrozenPlain(w), lambda s: s.w)),
        "dict subclass": (w, reading(AttrDict(w=w), lambda d: d.w)),
        "list subclass": (w, reading(Items([w]), lambda items: items[0])),
        "closure in a list": (w, reading([dense(w)], lambda fs: fs[0](1.0))),
        "closure as an attribute": (w, reading(holder, lambda h: h.enc(1.0))),
        "default argument": (w, lambda v=w: v),
        "keyword-only default": (w, lambda *, v=w: v),
        "partial in a dict": (
            w,
            reading({"f": functools.partial(jnp.multiply, w)}, lambda ops: ops["f"](1.0)),
        ),
        "bound method in a list": (w, reading([Slotted(w).hidden], lambda ms: ms[0]())),
    }


@pytest.mark.parametrize("place", list(_second_reads()))
def test_every_place_the_loss_reads_a_parameter_gets_the_traced_value(place: str) -> None:
    w, second = _second_reads()[place]
    model = {"w": w}
    grads = implicit.gradient(lambda: jnp.sum(model["w"] * second()), implicit.params(model))
    close(grads[w], twice_reference())
    assert model["w"] is w
    assert second() is w or np.array_equal(second(), w)  # put back: the original array again


@pytest.mark.parametrize("make", [Slotted, SlottedData], ids=["slots", "dataclass-slots"])
def test_params_of_a_slots_model_finds_its_parameters(make: Any) -> None:
    w = jnp.asarray(W_TWICE)
    model = make(w)
    ps = implicit.params(model)
    assert len(ps) == 1
    assert "model.w" in ps.where(w)
    grads = implicit.gradient(lambda: jnp.sum(model.w * model.w), ps)
    close(grads[w], twice_reference())


def test_params_finds_the_arrays_of_closures_held_by_the_model() -> None:
    """``net.enc = dense(W)``: the closure's W is a parameter of ``net``, found and traced."""
    w, b = jnp.asarray(W_TWICE), jnp.asarray([0.5, -1.0])
    net = Holder()
    net.enc = dense(w)
    net.items = AttrDict(b=b)
    ps = implicit.params(net)
    assert len(ps) == 2
    assert ps.where(w) == ("model.enc<closure w>",)
    assert ps.where(b) == ("model.items['b']",)
    grads = implicit.gradient(lambda: jnp.sum(net.enc(net.items.b) ** 2), ps)
    ref_w, ref_b = jax.grad(lambda w, b: jnp.sum((b * w) ** 2), argnums=(0, 1))(w, b)
    close(grads[w], ref_w)
    close(grads[b], ref_b)


def test_closure_positions_in_to_tree_and_stale_checks() -> None:
    """A parameter held by a closure of the model: to_tree refuses it (update cannot reach it),
    and replacing the closure's array makes params stale, both naming the closure's variable."""
    w = jnp.asarray(W_TWICE)
    net = Holder()
    net.enc = dense(w)
    ps = implicit.params(net)
    grads = implicit.gradient(lambda: jnp.sum(net.enc(1.0)), ps)
    with pytest.raises(TypeError, match=r"parameter at model\.enc<closure w> lives inside"):
        grads.to_tree(net)
    net.enc = dense(jnp.asarray(W_TWICE))  # an equal array, not the recorded one
    with pytest.raises(implicit.StaleParamsError, match=r"model\.enc<closure w> held"):
        implicit.gradient(lambda: jnp.sum(net.enc(1.0)), ps)


@pytest.mark.parametrize("lib", [np, jnp])
def test_ties_through_the_new_places(lib: Any) -> None:
    """One weight read as itself (a slots object), as its Transpose (a closure in a list) and
    through a jitted helper reading a NumPy view or a Transpose of it from its closure: the
    total of all four uses, as jax.grad gives it for the weight written once."""
    w = lib.asarray(f32([[1.0, 2.0], [3.0, -1.0]]))
    alias = w.T if lib is np else ost.Transpose(w)
    layer = Slotted(w)
    transposed = ost.Transpose(w)
    layers = [lambda v, t=transposed: v * jnp.asarray(t)]  # a default argument
    x = f32([[0.5, -2.0]])

    def dense_alias() -> Any:
        return jnp.asarray(alias) if isinstance(alias, ost.Transpose) else alias

    helper = jax.jit(lambda v: jnp.sum(v @ dense_alias()))
    helper(x)  # compiled before, with the weight as a constant
    ps = implicit.params([layer])
    grads = implicit.gradient(
        lambda: jnp.sum((x @ layer.w) ** 2) + jnp.sum(layers[0](x) * x) + helper(x), ps
    )

    def reference(v: Any) -> Any:
        return jnp.sum((x @ v) ** 2) + jnp.sum(x * v.T * x) + jnp.sum(x @ v.T)

    close(grads[w], jax.grad(reference)(jnp.asarray(w)))
    assert layer.w is w
    close(helper(x), reference(jnp.asarray(w)) - jnp.sum((x @ w) ** 2) - jnp.sum(x * w.T * x))


def test_places_combined_and_put_back_after_an_error() -> None:
    """A slots object in a dict subclass holding a closure with a default: all walked, and all
    put back when the loss raises."""
    w = jnp.asarray(W_TWICE)
    inner = Slotted(lambda v=w: v)
    outer = AttrDict(layer=inner)
    model = {"w": w}
    ps = implicit.params(model)
    grads = implicit.gradient(lambda: jnp.sum(model["w"] * outer.layer.w()), ps)
    close(grads[w], twice_reference())

    def failing() -> jax.Array:
        assert isinstance(outer.layer.w(), jax.core.Tracer)
        raise RuntimeError("inside")

    with pytest.raises(RuntimeError, match="inside"):
        implicit.gradient(failing, ps)
    assert outer.layer.w() is w
    assert outer["layer"] is inner


def test_a_helper_module_reading_its_own_global(tmp_path: Path) -> None:
    """A function of another (user) module reading that module's global, reached both as a
    function and through the module object."""
    (tmp_path / "helper_module_for_implicit.py").write_text(
        "import jax.numpy as jnp\n\nW = None\n\n\ndef times_w(x):\n    return x * W\n"
    )
    spec = importlib.util.spec_from_file_location(
        "helper_module_for_implicit", tmp_path / "helper_module_for_implicit.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    w = jnp.asarray(W_TWICE)
    module.W = w
    model = {"w": w}
    times_w = module.times_w
    ps = implicit.params(model)
    close(implicit.gradient(lambda: jnp.sum(model["w"] * times_w(1.0)), ps)[w], twice_reference())
    close(implicit.gradient(lambda: jnp.sum(model["w"] * module.W), ps)[w], twice_reference())
    assert module.W is w


def test_a_class_attribute_is_substituted() -> None:
    w = jnp.asarray(W_TWICE)

    class Shared:
        weight = w

        def __call__(self) -> Any:
            return self.weight

    model = {"w": w}
    grads = implicit.gradient(lambda: jnp.sum(model["w"] * Shared()()), implicit.params(model))
    close(grads[w], twice_reference())
    assert Shared.weight is w


class Pair(tuple):  # type: ignore[type-arg]
    """A tuple subclass JAX does not flatten: it cannot be rebuilt with a traced value."""


def test_a_place_that_cannot_be_substituted_is_refused_by_name() -> None:
    w = jnp.asarray(W_TWICE)
    pair = Pair((w, 1.0))
    model = {"w": w}
    with pytest.raises(TypeError, match=r"cannot substitute the parameter at .*pair.*\[0\]"):
        implicit.gradient(lambda: jnp.sum(model["w"] * pair[0]), implicit.params(model))
    assert pair[0] is w
    assert model["w"] is w


# -- jitted helpers that read the model from their closure -------------------------------------


def _jit_kinds() -> list[str]:
    kinds = ["jax.jit"]
    if importlib.util.find_spec("equinox") is not None:
        kinds.append("equinox.filter_jit")
    return kinds


def _jit(kind: str) -> Any:
    if kind == "equinox.filter_jit":
        import equinox as eqx

        return eqx.filter_jit
    return jax.jit


@pytest.mark.parametrize("kind", _jit_kinds())
@pytest.mark.parametrize("compiled_before", [True, False], ids=["compiled-before", "first-call"])
def test_a_jitted_helper_reading_the_model_from_its_closure(
    kind: str, compiled_before: bool
) -> None:
    """loss = sum(w) + sum(w² x) with x = 1: the gradient is 1 + 2w = [3, 5, 7] (jax.grad)."""
    w = jnp.asarray([1.0, 2.0, 3.0])
    model = {"w": w}
    helper = _jit(kind)(lambda x: jnp.sum(model["w"] ** 2 * x))
    if compiled_before:
        close(helper(1.0), 14.0)
    expected = jax.grad(lambda v: jnp.sum(v) + jnp.sum(v**2))(w)
    close(expected, [3.0, 5.0, 7.0])
    ps = implicit.params(model)
    for _ in range(2):
        grads = implicit.gradient(lambda: jnp.sum(model["w"]) + helper(1.0), ps)
        close(grads[w], expected)
    close(helper(2.0), 28.0)  # jit's cache holds no tracer: later plain calls work
    assert model["w"] is w


def test_a_jitted_helper_given_the_parameters_as_arguments_stays_compiled() -> None:
    w = jnp.asarray([1.0, 2.0, 3.0])
    model = {"w": w}
    runs = []

    @jax.jit
    def helper(v: jax.Array) -> jax.Array:
        runs.append(1)  # runs while jit traces, not at every call
        return jnp.sum(v**2)

    ps = implicit.params(model)
    for _ in range(3):
        grads = implicit.gradient(lambda: helper(model["w"]), ps)
        close(grads[w], 2 * w)
    assert len(runs) == 1


SHARED: dict[str, Any] = {}


def _read_shared() -> jax.Array:
    return jnp.sum(SHARED["w"] ** 2)


class WithHelpers:
    """Jitted helpers reading the global SHARED, held by a class in three ways."""

    def __init__(self, w: Any) -> None:
        self.w = w
        self.bound = jax.jit(self.read)  # a jitted bound method

    static = staticmethod(jax.jit(_read_shared))
    attribute = jax.jit(lambda self: _read_shared(), static_argnums=0)  # a jitted method

    def read(self) -> jax.Array:
        return _read_shared()


@pytest.mark.parametrize("helper", ["static", "attribute", "bound"])
def test_jitted_helpers_held_by_a_class_or_an_object(helper: str) -> None:
    """loss = sum(w) + sum(w²) through the helper: gradient 1 + 2w (jax.grad)."""
    w = jnp.asarray([1.0, 2.0])
    SHARED["w"] = w
    net = WithHelpers(w)
    close(getattr(net, helper)(), 5.0)  # compiled before, with the array as a constant
    grads = implicit.gradient(
        lambda: jnp.sum(net.w) + getattr(net, helper)(), implicit.params(SHARED)
    )
    close(grads[w], jax.grad(lambda v: jnp.sum(v) + jnp.sum(v**2))(w))
    assert SHARED["w"] is w
    assert isinstance(vars(WithHelpers)["static"], staticmethod)
    close(getattr(net, helper)(), 5.0)  # jit's cache is clean


def test_a_jitted_helper_that_cannot_be_swapped_is_refused_with_the_remedy() -> None:
    w = jnp.asarray([1.0, 2.0])
    SHARED["w"] = w
    helpers = Pair((jax.jit(_read_shared),))  # a tuple JAX does not flatten: cannot be rebuilt
    remedy = r"jitted function at helpers\[0\].*Pass the parameters to it as arguments"
    with pytest.raises(TypeError, match=remedy):
        implicit.gradient(lambda: helpers[0](), implicit.params(SHARED))
    assert SHARED["w"] is w
    close(helpers[0](), 5.0)  # jit's cache is clean


def test_a_library_object_refusing_a_substitution_is_named() -> None:
    """An object whose __setattr__ raises its own error: ours names the place."""

    class Locked:
        def __init__(self, w: Any) -> None:
            object.__setattr__(self, "w", w)

        def __setattr__(self, name: str, value: Any) -> None:
            raise RuntimeError("locked")

    w = jnp.asarray(W_TWICE)
    locked = Locked(w)
    model = {"w": w}
    with pytest.raises(TypeError, match=r"cannot substitute the parameter at locked\.w.*locked"):
        implicit.gradient(lambda: jnp.sum(model["w"] * locked.w), implicit.params(model))
    assert locked.w is w
    assert model["w"] is w


# -- the loss's type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [
        lambda m: jnp.sum(m["w"] > 0),
        lambda m: jnp.sum(m["w"]).astype(jnp.int32),
        lambda m: 3,
        lambda m: True,
    ],
    ids=["bool-sum", "int32", "python-int", "python-bool"],
)
def test_an_integer_or_boolean_loss_is_not_differentiable(loss: Any) -> None:
    model = {"w": jnp.ones(2)}
    with pytest.raises(TypeError, match=r"not a differentiable \(floating\) scalar"):
        implicit.gradient(lambda: loss(model), implicit.params(model))
