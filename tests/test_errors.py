"""Bad input: a clear error naming the tree path, expected against actual, and nothing changed."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost


@pytest.fixture
def case():
    w = np.arange(6.0).reshape(2, 3)
    model = {"enc": {"w": w, "b": np.zeros(3)}, "dec": {"w": ost.Transpose(w), "b": np.zeros(2)}}
    state = ost.setup(ost.Momentum(0.1), model)
    grads = {
        "enc": {"w": np.ones((2, 3)), "b": np.ones(3)},
        "dec": {"w": ost.Transpose(np.ones((2, 3))), "b": np.ones(2)},
    }
    return state, model, grads


@pytest.fixture(params=[ost.update, ost.update_], ids=["update", "update_"])
def step(request, case):
    """Runs the step expecting an error, then checks that nothing was modified."""
    state, model, _ = case
    before = [np.array(model["enc"]["w"]), np.array(model["enc"]["b"])]
    velocity = [np.array(s.velocity) for s in state.states]
    yield request.param
    np.testing.assert_array_equal(model["enc"]["w"], before[0])
    np.testing.assert_array_equal(model["enc"]["b"], before[1])
    for s, v in zip(state.states, velocity, strict=True):
        np.testing.assert_array_equal(s.velocity, v)


def test_gradient_of_another_structure(case, step):
    state, model, grads = case
    bad = {"enc": grads["enc"], "decoder": grads["dec"]}
    with pytest.raises(ost.StructureError, match=r"at grads: expected \{'dec': \*, 'enc': \*\}"):
        step(state, model, bad)
    bad = {"enc": [grads["enc"]["b"], grads["enc"]["w"]], "dec": grads["dec"]}
    with pytest.raises(ost.StructureError, match=r"at grads\['enc'\]: expected \{'b': \*, 'w'"):
        step(state, model, bad)


def test_gradient_of_the_wrong_shape(case, step):
    state, model, grads = case
    bad = {**grads, "enc": {**grads["enc"], "b": np.ones(4)}}
    with pytest.raises(
        ValueError, match=r"gradient at grads\['enc'\]\['b'\] has shape \(4,\), expected \(3,\)"
    ):
        step(state, model, bad)


def test_dense_gradient_at_a_transpose_in_the_parents_orientation(case, step):
    state, model, grads = case
    bad = {**grads, "dec": {**grads["dec"], "w": np.ones((2, 3))}}
    with pytest.raises(
        ValueError,
        match=r"grads\['dec'\]\['w'\] has shape \(2, 3\), expected \(3, 2\) \(the transpose "
        r"of the parameter\).*optstate.Transpose\(g\)",
    ):
        step(state, model, bad)


def test_gradient_that_is_not_an_array(case, step):
    state, model, grads = case
    bad = {**grads, "enc": {**grads["enc"], "b": "oops"}}
    with pytest.raises(TypeError, match=r"gradient at grads\['enc'\]\['b'\] must be an array"):
        step(state, model, bad)


def test_complex_gradient_for_a_real_parameter(case, step):
    state, model, grads = case
    bad = {**grads, "enc": {**grads["enc"], "b": np.ones(3, complex)}}
    with pytest.raises(ValueError, match=r"grads\['enc'\]\['b'\] is complex .* real \(float64\)"):
        step(state, model, bad)


def test_transpose_gradient_where_the_model_has_none(case, step):
    state, model, grads = case
    bad = {**grads, "enc": {**grads["enc"], "w": ost.Transpose(np.ones((3, 2)))}}
    with pytest.raises(ValueError, match=r"grads\['enc'\]\['w'\] is a Transpose, but the model"):
        step(state, model, bad)


def test_not_a_rule():
    with pytest.raises(TypeError, match=r"setup expects an optstate rule.*GradientTransformation"):
        ost.setup(optax.adam(1e-3), {"w": np.ones(2)})
    with pytest.raises(TypeError, match=r"a rule class: call it, e.g. Adam\(\)"):
        ost.setup(ost.Adam, {"w": np.ones(2)})


def test_not_a_state(case):
    _, model, grads = case
    with pytest.raises(TypeError, match=r"expected the State returned by optstate.setup, got dict"):
        ost.update(model, model, grads)


def test_state_for_a_different_model(case, step):
    state, model, grads = case
    other = {"enc": model["enc"]}
    with pytest.raises(
        ost.StructureError, match=r"different model\?.*missing from the model: model\['dec'\]"
    ):
        step(state, other, {"enc": grads["enc"]})


def test_state_for_a_model_of_other_shapes(case, step):
    state, model, grads = case
    w = np.ones((3, 3))
    other = {
        "enc": {"w": w, "b": model["enc"]["b"]},
        "dec": {"w": ost.Transpose(w), "b": np.zeros(2)},
    }
    with pytest.raises(
        ValueError,
        match=r"model\['dec'\]\['w'\] changed since setup: the state is for float64\[2, 3\], "
        r"the model holds ndarray float64\[3, 3\]",
    ):
        step(state, other, grads)
    cast = {**model, "enc": {**model["enc"], "b": model["enc"]["b"].astype(np.float32)}}
    with pytest.raises(ValueError, match=r"model\['enc'\]\['b'\] changed since setup.*float32"):
        step(state, cast, grads)


def test_new_parameter_where_there_was_none(case, step):
    _state, model, grads = case
    other = {**model, "enc": {**model["enc"], "b": np.zeros(3, int)}}
    state2 = ost.setup(ost.Momentum(0.1), other)
    with pytest.raises(ValueError, match=r"model\['enc'\]\['b'\] holds a parameter .* not there"):
        step(state2, model, grads)


def test_tie_added_since_setup(step):
    a = np.ones((2, 3))
    state = ost.setup(ost.Descent(), {"a": a, "b": a.copy()})
    with pytest.raises(
        ost.TieError, match=r"model\['b'\] and model\['a'\] hold the same array now"
    ):
        step(state, {"a": a, "b": a}, {"a": np.ones((2, 3)), "b": np.ones((2, 3))})


def test_tie_broken_since_setup(case, step):
    state, model, grads = case
    broken = {**model, "enc": {**model["enc"], "w": model["enc"]["w"].copy()}}
    with pytest.raises(
        ost.TieError, match=r"tie between model\['dec'\]\['w'\] and model\['enc'\]\['w'\] is broken"
    ):
        step(state, broken, grads)


def test_jax_model_errors_name_paths_too():
    w = jnp.ones((2, 3))
    model = [w, {"t": ost.Transpose(w)}]
    state = ost.setup(ost.Adam(), model)
    with pytest.raises(
        ValueError, match=r"grads\[1\]\['t'\] has shape \(3, 3\), expected \(3, 2\)"
    ):
        ost.update(state, model, [jnp.ones((2, 3)), {"t": jnp.ones((3, 3))}])


def test_numpy_array_of_a_dtype_numpy_cannot_compute_with():
    import ml_dtypes

    model = {"a": np.ones(3), "w": np.ones(3, ml_dtypes.bfloat16)}
    with pytest.raises(TypeError, match=r"model\['w'\] is a NumPy array of bfloat16.*JAX array"):
        ost.setup(ost.Adam(), model)
    # The same dtype as a JAX array trains.
    _, new = ost.update(
        ost.setup(ost.Adam(), {"w": jnp.ones(3, jnp.bfloat16)}),
        {"w": jnp.ones(3, jnp.bfloat16)},
        {"w": jnp.ones(3, jnp.bfloat16)},
    )
    assert new["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("rule", [ost.Adam, ost.AdamW, ost.NAdam, ost.AMSGrad, ost.OAdam])
def test_real_mu_dtype_for_a_complex_parameter(rule):
    with pytest.raises(TypeError, match=r"mu_dtype=.*real dtype, but the parameter is complex64"):
        ost.setup(rule(mu_dtype=jnp.bfloat16), {"z": jnp.ones(3, jnp.complex64)})
