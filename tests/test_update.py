"""``update``, ``update_`` and ``retie``: the step, gradient conventions, purity and jit."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost

RNG = np.random.default_rng(0)


def tied_model(xp=jnp):
    w = xp.asarray(RNG.normal(size=(3, 4)).astype(np.float32))
    return {
        "enc": {"w": w, "b": xp.zeros(4, dtype=np.float32)},
        "dec": {"w": ost.Transpose(w), "b": xp.zeros(3, dtype=np.float32)},
        "again": [w],
    }


def random_grads(model):
    def draw(x):
        return jnp.asarray(RNG.normal(size=np.shape(x)).astype(np.float32))

    return jax.tree_util.tree_map(draw, model)  # a Transpose node gets a Transpose gradient


def reference_step(tx, opt_state, w, b_enc, b_dec, grads):
    """optax on the model written with the weight once and its gradients summed by hand."""
    g_w = grads["enc"]["w"] + grads["dec"]["w"].parent + grads["again"][0]
    params = {"w": w, "be": b_enc, "bd": b_dec}
    g = {"w": g_w, "be": grads["enc"]["b"], "bd": grads["dec"]["b"]}
    with jax.numpy_dtype_promotion("standard"):  # optax itself is not strict-promotion clean
        updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize(
    ("rule", "tx"),
    [
        (ost.Momentum(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)),
        # Hyper-parameters exact in float32, so both sides round the same constants (see
        # test_rules.py for the defaults).
        (ost.Adam(2**-7, betas=(0.875, 1 - 2**-10)), optax.adam(2**-7, b1=0.875, b2=1 - 2**-10)),
    ],
    ids=["momentum", "adam"],
)
def test_tied_model_equals_the_single_parameter_reference(rule, tx):
    model = tied_model()
    state = ost.setup(rule, model)
    ref = {"w": model["enc"]["w"], "be": model["enc"]["b"], "bd": model["dec"]["b"]}
    ref_state = tx.init(ref)
    for _ in range(5):
        grads = random_grads(model)
        state, model = ost.update(state, model, grads)
        ref, ref_state = reference_step(tx, ref_state, ref["w"], ref["be"], ref["bd"], grads)
        np.testing.assert_allclose(model["enc"]["w"], ref["w"], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(model["dec"]["b"], ref["bd"], rtol=2e-6, atol=1e-7)
        assert model["dec"]["w"].parent is model["enc"]["w"] is model["again"][0]


def test_per_position_optax_breaks_the_tie():
    """The problem this library solves, checked against optax itself."""
    w = jnp.asarray(RNG.normal(size=(3, 3)).astype(np.float32))
    untied = {"a": w, "b": w}
    tx = optax.adam(1e-2)
    opt_state = tx.init(untied)
    grads = {"a": jnp.ones((3, 3)), "b": -2 * jnp.ones((3, 3))}
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(grads, opt_state)
    stepped = optax.apply_updates(untied, updates)
    assert not np.allclose(stepped["a"], stepped["b"])
    _state, model = ost.update(ost.setup(ost.Adam(1e-2), untied), untied, grads)
    assert model["a"] is model["b"]


def test_a_parameter_without_gradient_keeps_value_and_state():
    model = {"a": jnp.ones(2), "b": jnp.ones(2)}
    state = ost.setup(ost.Adam(0.1), model)
    state, model = ost.update(state, model, {"a": jnp.ones(2), "b": None})
    b = model["b"]
    state, model = ost.update(state, model, {"a": jnp.ones(2), "b": None})
    assert model["b"] is b
    assert int(state.states[0].count) == 2
    assert int(state.states[1].count) == 0
    state, model = ost.update(state, model, None)  # no gradient at all: nothing moves
    assert int(state.states[0].count) == 2


def test_none_for_whole_branches():
    model = tied_model()
    state = ost.setup(ost.Descent(1.0), model)
    grads = random_grads(model)
    _, new = ost.update(state, model, {"enc": None, "dec": grads["dec"], "again": None})
    expected = model["enc"]["w"] - grads["dec"]["w"].parent
    np.testing.assert_allclose(new["enc"]["w"], expected, rtol=1e-6)
    assert new["enc"]["b"] is model["enc"]["b"]
    assert new["dec"]["w"].parent is new["enc"]["w"] is new["again"][0]


def test_dense_gradient_at_a_transpose_position():
    model = tied_model()
    state = ost.setup(ost.Descent(1.0), model)
    grads = random_grads(model)
    dense = dict(grads, dec=dict(grads["dec"], w=grads["dec"]["w"].parent.T))
    _, a = ost.update(state, model, grads)
    _, b = ost.update(state, model, dense)
    np.testing.assert_allclose(a["enc"]["w"], b["enc"]["w"], rtol=1e-6)


def test_inputs_are_not_modified_numpy():
    w = np.ones((2, 3))
    model = {"w": w, "t": w.T}
    grads = {"w": np.ones((2, 3)), "t": np.ones((3, 2))}
    state = ost.setup(ost.Momentum(0.1), model)
    _new_state, new = ost.update(state, model, grads)
    np.testing.assert_array_equal(w, 1.0)
    np.testing.assert_array_equal(grads["w"], 1.0)
    np.testing.assert_array_equal(state.states[0].velocity, 0.0)
    assert new["t"].base is new["w"]
    assert isinstance(new["w"], np.ndarray)


def test_update_in_place_keeps_views_alive():
    w = np.arange(6.0).reshape(2, 3)
    held_elsewhere = w.T
    model = {"w": w, "t": held_elsewhere, "b": np.zeros(3)}
    state = ost.setup(ost.Momentum(0.5, momentum=0.9), model)
    grads = {"w": np.ones((2, 3)), "t": np.ones((3, 2)), "b": np.ones(3)}
    expected_state, expected = ost.update(state, model, grads)
    new_state, new = ost.update_(state, model, grads)
    assert new["w"] is w
    assert new["t"] is held_elsewhere
    np.testing.assert_allclose(w, expected["w"])
    np.testing.assert_allclose(held_elsewhere, expected["w"].T)
    np.testing.assert_allclose(new_state.states[0].velocity, expected_state.states[0].velocity)
    np.testing.assert_allclose(model["b"], expected["b"])


def test_update_in_place_falls_back_for_read_only_and_jax():
    ro = np.ones(3)
    ro.flags.writeable = False
    j = jnp.ones(3)
    model = {"ro": ro, "j": j}
    state = ost.setup(ost.Descent(1.0), model)
    _, new = ost.update_(state, model, {"ro": np.ones(3), "j": jnp.ones(3)})
    np.testing.assert_array_equal(ro, 1.0)
    np.testing.assert_array_equal(new["ro"], 0.0)
    np.testing.assert_array_equal(new["j"], 0.0)
    np.testing.assert_array_equal(j, 1.0)


def test_zero_dim_numpy_parameter_stays_an_array():
    model = {"s": np.asarray(2.0)}
    state = ost.setup(ost.Momentum(0.5), model)
    for _ in range(2):
        state, model = ost.update(state, model, {"s": np.asarray(1.0)})
        assert isinstance(model["s"], np.ndarray)
    assert ost.setup(ost.Descent(), model).plan.params[0].shape == ()
    np.testing.assert_allclose(model["s"], 2.0 - 0.5 - 0.5 * 1.9)


def test_complex_parameters_follow_optax():
    w = jnp.asarray(RNG.normal(size=(2, 2)) + 1j * RNG.normal(size=(2, 2)), dtype=jnp.complex64)
    model = {"a": w, "b": w}
    state = ost.setup(ost.Adam(1e-2), model)
    tx = optax.adam(1e-2)
    ref, ref_state = {"w": w}, tx.init({"w": w})
    for _ in range(3):
        ga = jnp.asarray(RNG.normal(size=(2, 2)) + 1j * RNG.normal(size=(2, 2)), jnp.complex64)
        gb = jnp.asarray(RNG.normal(size=(2, 2)) + 1j * RNG.normal(size=(2, 2)), jnp.complex64)
        state, model = ost.update(state, model, {"a": ga, "b": gb})
        with jax.numpy_dtype_promotion("standard"):
            updates, ref_state = tx.update({"w": ga + gb}, ref_state)
        ref = optax.apply_updates(ref, updates)
    assert model["a"].dtype == jnp.complex64
    np.testing.assert_allclose(model["a"], ref["w"], rtol=1e-5, atol=1e-6)


# -- jit ----------------------------------------------------------------------------------------


def test_jit_equals_eager_and_does_not_recompile():
    model = tied_model()
    state = ost.setup(ost.Adam(1e-2), model)
    traces = []

    def step(state, model, grads):
        traces.append(1)
        return ost.update(state, model, grads)

    jitted = jax.jit(step)
    eager_state, eager_model = state, model
    jit_state, jit_model = state, model
    for _ in range(3):
        grads = random_grads(model)
        eager_state, eager_model = ost.update(eager_state, eager_model, grads)
        jit_state, jit_model = jitted(jit_state, jit_model, grads)
        for a, b in zip(
            jax.tree_util.tree_leaves(eager_model),
            jax.tree_util.tree_leaves(jit_model),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert len(traces) == 1
    for a, b in zip(
        jax.tree_util.tree_leaves(eager_state), jax.tree_util.tree_leaves(jit_state), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The update itself is jittable directly, with the tie plan as static state structure.
    s, m = jax.jit(ost.update)(state, model, random_grads(model))
    assert s.plan == state.plan
    assert isinstance(m["dec"]["w"], ost.Transpose)


def test_jit_on_a_numpy_model():
    w = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    model = {"w": w, "t": w.T}
    state = ost.setup(ost.Momentum(0.1), model)
    grads = {"w": np.ones((2, 3), np.float32), "t": np.ones((3, 2), np.float32)}
    _, eager = ost.update(state, model, grads)
    _, jitted = jax.jit(ost.update)(state, model, grads)
    np.testing.assert_allclose(jitted["w"], eager["w"], rtol=1e-6)
    np.testing.assert_allclose(jitted["t"], eager["w"].T, rtol=1e-6)


def test_retie_after_a_jitted_step():
    model = tied_model()
    state = ost.setup(ost.Adam(1e-2), model)
    state, model = jax.jit(ost.update)(state, model, random_grads(model))
    assert model["dec"]["w"].parent is not model["enc"]["w"]  # jit returns one array per position
    with pytest.raises(ost.TieError, match=r"call optstate.retie\(state, model\)"):
        ost.update(state, model, random_grads(model))
    model = ost.retie(state, model)
    assert model["dec"]["w"].parent is model["enc"]["w"] is model["again"][0]
    state, model = ost.update(state, model, random_grads(model))
    assert model["dec"]["w"].parent is model["enc"]["w"]
    assert len(ost.setup(ost.Adam(), model).plan.params) == 3


def test_donated_update_on_a_tied_model():
    """jax.jit refuses to donate one buffer twice; update(donate=True) donates each once."""
    model = tied_model()
    state = ost.setup(ost.Adam(1e-2), model)
    grads = random_grads(model)
    _, expected = ost.update(state, model, grads)
    old_w, old_mu = model["enc"]["w"], state.states[1].mu
    new_state, new = ost.update(state, model, grads, donate=True)
    assert old_w.is_deleted()
    assert old_mu.is_deleted()
    assert not state.hyper[0][0]["lr"].is_deleted()  # hyper-parameters are kept, not donated
    assert new["dec"]["w"].parent is new["enc"]["w"] is new["again"][0]
    for a, b in zip(
        jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    new_state, new = ost.update(new_state, new, random_grads(new), donate=True)
    assert int(new_state.step) == 2


@pytest.mark.parametrize("enabled", [True, False])
def test_setup_leaves_the_garbage_collector_as_it_was(enabled):
    """``setup`` pauses the cyclic collector while it builds; it must come back as it was, also
    when ``setup`` fails."""
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        ost.setup(ost.Adam(), {"w": np.ones(3)})
        assert gc.isenabled() is enabled
        with pytest.raises(TypeError):
            ost.setup("not a rule", {"w": np.ones(3)})
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
