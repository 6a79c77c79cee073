"""Hostile and odd inputs: each gets the right answer, or a clear error that changes nothing.

Non-finite gradients with and without ``SkipNonFinite``; gradients of another dtype, of no number
dtype, or as Python lists; integer, boolean, zero-size, 0-d and complex arrays; trees 10,000 levels
deep and 100,000 leaves wide; ties broken or made since ``setup``; a state whose arrays belong to
another rule. References are hand-derived arithmetic and optax; after every error the state and
the model are checked to be exactly as they were.
"""

import re
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles
from rules_under_test import RULES

import optstate as ost
from optstate import _walk

BACKENDS = {"numpy": (np, np.float64), "jax": (jnp, jnp.float32)}


def jit_update(state, model, grads):
    return jax.jit(ost.update)(state, model, grads)


STEPS = {"update": ost.update, "update_": ost.update_, "jit": jit_update}
# (backend, step): the in-place step matters for NumPy; jit is a JAX matter.
CASES = [("numpy", "update"), ("numpy", "update_"), ("jax", "update"), ("jax", "update_")]
JIT_CASES = [*CASES, ("jax", "jit")]


def snapshot(state, model):
    """Copies of every array of the state and of the model, and the identity of the model's
    leaves (a ``Transpose`` node is a pytree node: its array is a leaf)."""
    leaves = jax.tree_util.tree_leaves(model)
    return (
        [np.array(x) for x in jax.tree_util.tree_leaves(state)],
        [np.array(x) if hasattr(x, "shape") else x for x in leaves],
        [id(x) for x in leaves],
    )


def assert_unchanged(before, state, model):
    after = snapshot(state, model)
    assert after[2] == before[2], "the model holds other objects than before"
    for old, new in zip(before[0] + before[1], after[0] + after[1], strict=True):
        np.testing.assert_array_equal(new, old)


def tied(xp, dtype, w):
    """The encoder's weight, its transpose in the decoder, and a bias."""
    W = xp.asarray(np.array(w), dtype=dtype)  # a copy: update_ writes NumPy arrays
    return {"enc": W, "dec": ost.Transpose(W), "b": xp.asarray([1.0, 2.0], dtype=dtype)}


def tied_after(model, step):
    """The tie of ``tied``, as it must be after ``step`` (jit returns equal copies)."""
    if step == "jit":
        np.testing.assert_array_equal(model["dec"].parent, model["enc"])
    else:
        assert model["dec"].parent is model["enc"]


W0 = np.arange(6.0).reshape(2, 3) / 4  # quarters: every sum and step below is exact in float32


# -- non-finite gradients -----------------------------------------------------------------------


@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_non_finite_gradients_flow_into_the_parameter_without_skip(backend, step):
    """Documented: without ``SkipNonFinite`` a NaN or an infinity is arithmetic like any number,
    on every backend and without a warning; it stays in the moments for good."""
    xp, dtype = BACKENDS[backend]
    model = tied(xp, dtype, W0)
    state = ost.setup(ost.Momentum(0.5, momentum=0.5), model)
    g_enc, g_dec = np.ones((2, 3)), np.ones((2, 3))
    g_enc[0, 1], g_dec[1, 2] = np.nan, np.inf
    g_b = np.array([-np.inf, 1.0])
    grads = {
        "enc": xp.asarray(g_enc, dtype=dtype),
        "dec": ost.Transpose(xp.asarray(g_dec, dtype=dtype)),
        "b": xp.asarray(g_b, dtype=dtype),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy must not warn either
        state, model = STEPS[step](state, model, grads)
        v_w, v_b = g_enc + g_dec, g_b  # the velocity after one step from zero
        np.testing.assert_array_equal(model["enc"], W0 - 0.5 * v_w)
        np.testing.assert_array_equal(model["b"], np.array([1.0, 2.0]) - 0.5 * v_b)
        assert np.isnan(model["enc"][0, 1])
        assert model["enc"][1, 2] == -np.inf
        tied_after(model, step)

        # A finite gradient afterwards: the velocity still holds the NaN and the infinity.
        w1, b1 = np.array(model["enc"]), np.array(model["b"])
        ones = {"enc": xp.ones((2, 3), dtype), "dec": None, "b": xp.ones(2, dtype)}
        state, model = STEPS[step](state, model, ones)
        np.testing.assert_array_equal(model["enc"], w1 - 0.5 * (0.5 * v_w + 1))
        np.testing.assert_array_equal(model["b"], b1 - 0.5 * (0.5 * v_b + 1))
        assert np.isnan(model["enc"][0, 1])
        assert np.isfinite(model["enc"][0, 0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_skip_non_finite_skips_the_whole_step_and_recovers(backend, step, bad):
    """One non-finite number in any gradient under the rule skips the step of every parameter
    under it: values and inner states stay, ``skipped`` counts it, and NumPy does not warn about
    the arithmetic it throws away. The next finite step is the rule's first step."""
    xp, dtype = BACKENDS[backend]
    model = tied(xp, dtype, W0)
    state = ost.setup(ost.SkipNonFinite(ost.Momentum(0.5, momentum=0.5)), model)
    g_b = np.array([1.0, bad])
    grads = {
        "enc": xp.ones((2, 3), dtype),
        "dec": ost.Transpose(xp.ones((2, 3), dtype)),
        "b": xp.asarray(g_b, dtype=dtype),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, model = STEPS[step](state, model, grads)
    np.testing.assert_array_equal(model["enc"], W0)
    np.testing.assert_array_equal(model["b"], [1.0, 2.0])
    for s in state.states:
        assert int(s.skipped) == 1
        np.testing.assert_array_equal(s.inner.velocity, np.zeros_like(np.asarray(s.inner.velocity)))
    tied_after(model, step)

    g = np.arange(6.0).reshape(2, 3) / 8
    finite = {
        "enc": xp.asarray(g, dtype=dtype),
        "dec": ost.Transpose(xp.asarray(2 * g, dtype=dtype)),
        "b": xp.asarray([0.25, 0.5], dtype=dtype),
    }
    state, model = STEPS[step](state, model, finite)
    np.testing.assert_array_equal(model["enc"], W0 - 0.5 * (g + 2 * g))
    np.testing.assert_array_equal(model["b"], [1.0 - 0.125, 2.0 - 0.25])
    assert [int(s.skipped) for s in state.states] == [1, 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_skip_non_finite_adam_on_numpy_does_not_warn(bad):
    """Adam's arithmetic on an infinite gradient divides infinity by infinity, which NumPy warns
    about. The step is thrown away, so no warning may escape (under ``-W error`` it would be an
    exception)."""
    w = np.array([1.0, 2.0])
    state = ost.setup(ost.SkipNonFinite(ost.Adam(0.1)), {"w": w})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, model = ost.update_(state, {"w": w}, {"w": np.array([bad, 1.0])})
    np.testing.assert_array_equal(model["w"], [1.0, 2.0])
    assert int(state.states[0].skipped) == 1
    np.testing.assert_array_equal(state.states[0].inner.mu, [0.0, 0.0])


# -- gradient dtypes ------------------------------------------------------------------------------

G = np.array([[0.1, -0.3, 1 / 3], [2.0, 1e-3, -7.7]])  # not exact in float32 or float16


@pytest.mark.parametrize(
    ("backend", "param", "grad"),
    [
        ("numpy", np.float32, np.float64),
        ("numpy", np.float64, np.float32),
        ("numpy", np.float16, np.float64),
        ("numpy", np.float32, np.int64),
        ("numpy", np.complex128, np.float64),
        ("jax", jnp.float32, np.float64),  # a NumPy float64 gradient for a JAX float32 parameter
        ("jax", jnp.float32, jnp.bfloat16),
        ("jax", jnp.float32, jnp.int32),
        ("jax", jnp.complex64, jnp.float32),
    ],
    ids=lambda x: x if isinstance(x, str) else np.dtype(x).name,
)
@pytest.mark.parametrize("step", ["update", "update_"])
def test_gradients_are_cast_to_the_parameters_dtype(backend, param, grad, step):
    """Documented: a gradient of another real dtype is rounded to the parameter's dtype first
    (the step is ``p - lr * cast(g)`` in the parameter's dtype); a real gradient of a complex
    parameter is its real part. Hand arithmetic in the parameter's dtype is the reference."""
    xp = BACKENDS[backend][0]
    g = np.round(G * 100) if np.issubdtype(grad, np.integer) else G
    w0 = np.arange(6.0).reshape(2, 3)
    model = {"w": xp.asarray(w0.copy(), dtype=param)}  # a copy: update_ writes NumPy arrays
    state = ost.setup(ost.Descent(0.25), model)
    given = (np if grad is np.float64 else xp).asarray(g, dtype=grad)
    state, model = STEPS[step](state, model, {"w": given})
    assert model["w"].dtype == param
    ref_dtype = np.dtype(param)
    rounded = np.asarray(given).astype(ref_dtype)  # the gradient as given, cast
    expected = w0.astype(ref_dtype) - ref_dtype.type(0.25) * rounded
    np.testing.assert_array_equal(np.asarray(model["w"]), expected)


NOT_NUMBERS = {
    "bool array": lambda xp: xp.asarray([True, False, True]),
    "Python bool": lambda xp: True,
    "string array": lambda xp: np.array(["a", "b", "c"]),
    "object array": lambda xp: np.array([None, 1.0, 2.0], dtype=object),
    "list with a string": lambda xp: [1.0, "2", 3.0],
}


@pytest.mark.parametrize("kind", list(NOT_NUMBERS))
@pytest.mark.parametrize(("backend", "step"), CASES)
def test_gradients_that_are_not_numbers_are_refused(backend, step, kind):
    """A boolean, string or object gradient has no meaning as a derivative (a mask passed by
    mistake, say): refused with the path, instead of being read as 0 and 1 or as NaN."""
    xp, dtype = BACKENDS[backend]
    b = xp.zeros((), dtype) if kind == "Python bool" else xp.zeros(3, dtype)  # shapes that fit
    model = {"enc": {"w": xp.ones((2, 3), dtype), "b": b}}
    state = ost.setup(ost.Momentum(0.1), model)
    before = snapshot(state, model)
    grads = {"enc": {"w": xp.ones((2, 3), dtype), "b": NOT_NUMBERS[kind](xp)}}
    with pytest.raises(TypeError, match=r"gradient at grads\['enc'\]\['b'\] has dtype .*not "):
        STEPS[step](state, model, grads)
    assert_unchanged(before, state, model)


@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_complex_gradient_for_a_real_parameter_is_refused(backend, step):
    xp, dtype = BACKENDS[backend]
    model = tied(xp, dtype, W0)
    state = ost.setup(ost.Adam(), model)
    before = snapshot(state, model)
    complex_dtype = np.complex128 if backend == "numpy" else jnp.complex64
    grads = {"enc": xp.ones((2, 3), complex_dtype), "dec": None, "b": None}
    with pytest.raises(ValueError, match=r"grads\['enc'\] is complex \(complex.*\) but the param"):
        STEPS[step](state, model, grads)
    assert_unchanged(before, state, model)


# -- gradients as Python lists ----------------------------------------------------------------


@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_gradients_as_python_lists(backend, step):
    """Nested lists, tuples and Python numbers are read as arrays (integers included) and cast
    to the parameter's dtype; at a ``Transpose`` a list is dense, in the transposed orientation,
    or inside a ``Transpose`` node, in the parameter's."""
    xp, dtype = BACKENDS[backend]
    model = {**tied(xp, dtype, W0), "s": xp.asarray(1.0, dtype=dtype)}
    state = ost.setup(ost.Descent(0.5), model)
    g_enc = [[1, 2, 3], [4, 5, 6]]  # integers
    g_dec = [[0.5, 1.0], [1.5, 2.0], [2.5, 3.0]]  # the position's own (3, 2) orientation
    grads = {"enc": g_enc, "dec": g_dec, "b": (0.25, 0.5), "s": 0.5}
    _new_state, new = STEPS[step](state, model, grads)
    expected = W0 - 0.5 * (np.asarray(g_enc) + np.asarray(g_dec).T)
    np.testing.assert_array_equal(new["enc"], expected)
    np.testing.assert_array_equal(new["b"], [1.0 - 0.125, 2.0 - 0.25])
    np.testing.assert_array_equal(new["s"], 0.75)
    assert new["s"].shape == ()
    assert new["enc"].dtype == dtype
    tied_after(new, step)

    # The same gradient inside a Transpose node, in the parameter's (2, 3) orientation.
    model = {**tied(xp, dtype, W0), "s": xp.asarray(1.0, dtype=dtype)}
    in_node = {"enc": g_enc, "dec": ost.Transpose(np.asarray(g_dec).T.tolist()), "b": None}
    _, again = ost.update(state, model, {**in_node, "s": None})
    np.testing.assert_array_equal(again["enc"], expected)


@pytest.mark.parametrize(
    ("gradient", "error", "match"),
    [
        ([[1.0, 2.0, 3.0], [4.0, 5.0]], ValueError, r"grads\['enc'\] is not a rectangular array"),
        ([1.0, 2.0, 3.0], ValueError, r"grads\['enc'\] has shape \(3,\), expected \(2, 3\)"),
        ([["1", "2", "3"], ["4", "5", "6"]], TypeError, r"grads\['enc'\] has dtype <U1"),
    ],
    ids=["ragged", "wrong shape", "strings"],
)
@pytest.mark.parametrize(("backend", "step"), CASES)
def test_bad_python_list_gradients_are_refused(backend, step, gradient, error, match):
    xp, dtype = BACKENDS[backend]
    model = tied(xp, dtype, W0)
    state = ost.setup(ost.Adam(), model)
    before = snapshot(state, model)
    with pytest.raises(error, match=match):
        STEPS[step](state, model, {"enc": gradient, "dec": None, "b": [1.0, 1.0]})
    assert_unchanged(before, state, model)


# -- integer, boolean and other non-parameter leaves ----------------------------------------------


@pytest.mark.parametrize(("backend", "step"), CASES)
def test_integer_boolean_and_python_leaves_are_not_parameters(backend, step):
    """Documented: only floating and complex arrays are trained. Integer and boolean arrays
    (even one held at two positions), Python and NumPy scalars and strings come back as the very
    same objects, and whatever gradient is given at their positions is ignored."""
    xp, dtype = BACKENDS[backend]
    idx = xp.arange(3)
    model = {
        "w": xp.asarray(W0.copy(), dtype=dtype),
        "idx": idx,
        "idx_again": idx,
        "mask": xp.asarray([True, False]),
        "n": 3,
        "scale": np.float64(2.0),
        "rate": 0.5,
        "name": "encoder",
    }
    state = ost.setup(ost.Descent(0.5), model)
    assert len(state.plan.params) == 1
    assert state.plan.n_ties == 0
    junk = {
        "w": xp.ones((2, 3), dtype),
        "idx": np.ones(3),
        "idx_again": "not even a number",
        "mask": None,
        "n": 1.0,
        "scale": np.ones(7),
        "rate": object(),
        "name": None,
    }
    _, new = STEPS[step](state, model, junk)
    np.testing.assert_array_equal(new["w"], W0 - 0.5)
    for key in model:
        if key != "w":
            assert new[key] is model[key], key


def test_integer_leaves_with_jax_grad_and_under_jit():
    """``jax.grad(..., allow_int=True)`` gives ``float0`` gradients at integer leaves: ignored.
    Under ``jax.jit`` JAX itself returns a Python number leaf as a 0-d array (documented)."""
    model = {"w": jnp.asarray(W0.copy(), dtype=jnp.float32), "idx": jnp.arange(3), "n": 3}

    def loss(m):
        return jnp.sum(m["w"][:, m["idx"]] * m["n"])

    grads = jax.grad(loss, allow_int=True)(model)
    assert grads["idx"].dtype == jax.dtypes.float0
    state = ost.setup(ost.Descent(0.5), model)
    _, eager = ost.update(state, model, grads)
    _, jitted = jax.jit(ost.update)(state, model, grads)
    for new in (eager, jitted):
        np.testing.assert_array_equal(new["w"], W0 - 0.5 * 3)  # d loss / d w = n everywhere
        np.testing.assert_array_equal(new["idx"], [0, 1, 2])
    assert eager["idx"] is model["idx"]
    assert eager["n"] == 3
    assert isinstance(jitted["n"], jax.Array)
    assert int(jitted["n"]) == 3


# -- zero-size, 0-d and complex arrays -------------------------------------------------------------

# Rules that compute across a parameter (norms, trust ratios, factored moments) or across
# parameters: the ones a zero-size array could upset. NumPy runs every rule (it is cheap); each
# JAX case compiles two models, so JAX runs these.
ZERO_SIZE_JAX = ["Adam", "ClipGlobalNorm+Adam", "Lamb", "Lars", "Adafactor", "SkipNonFinite(Adam)"]


@pytest.mark.parametrize(
    ("backend", "name"),
    [("numpy", n) for n in RULES] + [("jax", n) for n in ZERO_SIZE_JAX],
)
def test_zero_size_parameters_are_harmless(backend, name):
    """A zero-size parameter (tied or not) keeps its shape, its state holds nothing, nothing
    warns, and the other parameters move exactly as they do without it (a zero-size array adds
    nothing to a global norm)."""
    xp, dtype = BACKENDS[backend]
    rule, _ = RULES[name]
    rng = np.random.default_rng(3)
    x = xp.asarray(rng.normal(size=(2, 3)), dtype=dtype)
    empty = xp.zeros((0, 3), dtype=dtype)
    with_empty = {"x": x, "e": empty, "et": ost.Transpose(empty), "v": xp.zeros((0,), dtype)}
    without = {"x": x}
    s1, s2 = ost.setup(rule, with_empty), ost.setup(rule, without)
    assert len(s1.plan.params) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            g = xp.asarray(rng.normal(size=(2, 3)), dtype=dtype)
            e = xp.zeros((0, 3), dtype=dtype)
            grads = {"x": g, "e": e, "et": ost.Transpose(e), "v": xp.zeros((0,), dtype)}
            s1, with_empty = ost.update(s1, with_empty, grads)
            s2, without = ost.update(s2, without, {"x": g})
            np.testing.assert_array_equal(with_empty["x"], without["x"])
    assert with_empty["e"].shape == (0, 3)
    assert with_empty["e"].dtype == dtype
    assert with_empty["et"].parent is with_empty["e"]
    empty_params = [k for k, p in enumerate(s1.plan.params) if 0 in p.shape]
    assert len(empty_params) == 2
    for k in empty_params:  # their states hold nothing but 0-d counters
        assert all(np.size(a) <= 1 for a in jax.tree_util.tree_leaves(s1.states[k]))


def test_zero_size_numpy_views_are_separate_parameters():
    """Documented: a zero-size array occupies no memory, so its transpose view is not recognised
    as a tie (there is nothing to train either way)."""
    empty = np.zeros((0, 3))
    state = ost.setup(ost.Adam(), {"e": empty, "et": empty.T})
    assert len(state.plan.params) == 2
    _, new = ost.update_(state, {"e": empty, "et": empty.T}, {"e": empty, "et": empty.T})
    assert new["e"].shape == (0, 3)
    assert new["et"].shape == (3, 0)


@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_zero_dimensional_parameters(backend, step):
    """A 0-d array is a parameter (tied like any other) and stays a 0-d array: NumPy scalars and
    Python floats are not parameters. Adam against optax on the model written once."""
    xp, dtype = BACKENDS[backend]
    t = xp.asarray(2.0, dtype=dtype)
    model = {"t": t, "again": [t], "np_scalar": np.float64(3.0), "py": 3.0}
    if step == "jit":
        model = {"t": t, "again": [t]}
    # Hyper-parameters exact in binary, so both sides round the same constants.
    state = ost.setup(ost.Adam(0.125, betas=(0.875, 1 - 2**-10)), model)
    assert len(state.plan.params) == 1
    assert state.plan.n_ties == 1
    grads = {"t": 0.5, "again": [xp.asarray(0.25, dtype=dtype)], "np_scalar": 1.0, "py": 1.0}
    if step == "jit":
        grads = {"t": xp.asarray(0.5, dtype=dtype), "again": [xp.asarray(0.25, dtype=dtype)]}
    _, new = STEPS[step](state, model, grads)

    tx = optax.adam(0.125, 0.875, 1 - 2**-10)
    ref = jnp.asarray(2.0, dtype=jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(jnp.asarray(0.75, dtype=jnp.float32), tx.init(ref), ref)
    # The reference is float32: its result (about 1.875) carries up to half an ulp (2**-24) of
    # rounding, and its arithmetic on the step (about 0.125) a few ulps of it (2**-26 each).
    assert abs(float(new["t"]) - float(optax.apply_updates(ref, updates))) <= 2**-23
    assert new["t"].shape == ()
    assert isinstance(new["t"], type(t))
    if step == "jit":
        np.testing.assert_array_equal(new["again"][0], new["t"])
    else:
        assert new["again"][0] is new["t"]
    if step == "update_" and backend == "numpy":
        assert new["t"] is t  # written in place
    if "py" in model:
        assert new["np_scalar"] is model["np_scalar"]
        assert new["py"] is model["py"]


def test_weakly_typed_jax_parameters_compile_once():
    """``jnp.asarray(2.0)`` is weakly typed; the compiled step's outputs are not. The first step
    must not leave the second to compile again."""
    model = {"t": jnp.asarray(2.0), "w": jnp.full((3,), 0.5)}
    assert model["t"].weak_type
    assert model["w"].weak_type
    state = ost.setup(ost.Adam(1e-2), model)
    with counting_compiles() as compiles:
        for i in range(4):
            grads = {"t": jnp.asarray(1.0 + i, jnp.float32), "w": jnp.ones(3, jnp.float32)}
            state, model = ost.update(state, model, grads)
            if i == 0:
                first = len(compiles)
    assert len(compiles) == first, "a step after the first compiled again"
    assert model["t"].dtype == jnp.float32
    assert not model["t"].weak_type


@pytest.mark.parametrize("backend", ["numpy", "jax"])
def test_complex_tied_parameters_against_optax(backend):
    """A complex parameter tied to its ``Transpose`` (a plain transpose, not the conjugate) and,
    for NumPy, to its view ``W.T``: Adam equals optax's complex Adam on the parameter written
    once with its gradients summed by hand in its orientation."""
    xp = BACKENDS[backend][0]
    cdtype = np.complex128 if backend == "numpy" else np.complex64
    rng = np.random.default_rng(5)

    def draw(shape):
        return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(cdtype)

    w0 = draw((3, 2))
    W = xp.asarray(w0)
    model = {"enc": W, "dec": ost.Transpose(W)}
    if backend == "numpy":
        model["view"] = W.T
    np.testing.assert_array_equal(np.asarray(model["dec"]), w0.T)  # not w0.conj().T
    # Hyper-parameters exact in binary, so both sides round the same constants.
    rule, tx = ost.Adam(2**-7, betas=(0.875, 1 - 2**-10)), optax.adam(2**-7, 0.875, 1 - 2**-10)
    state = ost.setup(rule, model)
    assert len(state.plan.params) == 1
    with jax.enable_x64(backend == "numpy"), jax.numpy_dtype_promotion("standard"):
        ref = jnp.asarray(w0)
        ref_state = tx.init(ref)
        for _ in range(4):
            g = {"enc": draw((3, 2)), "dec": draw((3, 2)), "view": draw((2, 3))}
            grads = {"enc": xp.asarray(g["enc"]), "dec": ost.Transpose(xp.asarray(g["dec"]))}
            total = g["enc"] + g["dec"]
            if backend == "numpy":
                grads["view"] = g["view"]
                total = total + g["view"].T
            state, model = ost.update(state, model, grads)
            updates, ref_state = tx.update(jnp.asarray(total), ref_state, ref)
            ref = optax.apply_updates(ref, updates)
            # rounding of the parameter's precision, over four steps
            tol = 1e-13 if backend == "numpy" else 2e-6
            np.testing.assert_allclose(np.asarray(model["enc"]), np.asarray(ref), rtol=tol)
    assert model["dec"].parent is model["enc"]
    if backend == "numpy":
        assert np.shares_memory(model["view"], model["enc"])


def test_complex_parameters_refused_by_adafactor_at_setup():
    with pytest.raises(TypeError, match=r"Adafactor does not support complex parameters"):
        ost.setup(ost.Adafactor(), {"w": np.ones((2, 2), np.complex128)})


# -- very deep trees -------------------------------------------------------------------------------

DEPTH = 10_000


def chain(bottom, middle, depth=DEPTH):
    """``bottom`` under ``depth`` levels of dicts, lists and tuples in turn, with ``middle`` as a
    second child half-way up. Built without recursion, as is its path."""
    tree, keys = bottom, []
    for level in range(depth):
        if level == depth // 2:
            tree, key = {"deeper": tree, "side": middle}, "['deeper']"
        elif level % 3 == 0:
            tree, key = {"deeper": tree}, "['deeper']"
        else:
            tree, key = ([tree] if level % 3 == 1 else (tree,)), "[0]"
        keys.append(key)
    return tree, "".join(reversed(keys))


def bottom_of(tree):
    while not (isinstance(tree, dict) and "w" in tree):
        tree = tree["deeper"] if isinstance(tree, dict) else tree[0]
    return tree


def side_of(tree):
    while not (isinstance(tree, dict) and "side" in tree):
        tree = tree["deeper"] if isinstance(tree, dict) else tree[0]
    return tree["side"]


def python_recursion_works():
    def down(n):
        return 0 if n == 0 else 1 + down(n - 1)

    return down(sys.getrecursionlimit() - 100) > 0


@pytest.mark.parametrize(("backend", "step"), CASES)
def test_a_tree_ten_thousand_levels_deep(backend, step):
    """Deeper than the interpreter's recursion limit, which jax's tree functions obey: setup,
    update, update_, retie and the error messages work, and leave the thread (and its recursion
    limit) as they found it."""
    assert sys.getrecursionlimit() < DEPTH
    limit = sys.getrecursionlimit()
    xp, dtype = BACKENDS[backend]
    W, b = xp.asarray(W0.copy(), dtype=dtype), xp.asarray([1.0, 2.0], dtype=dtype)
    model, path = chain({"w": W, "t": ost.Transpose(W)}, b)
    state = ost.setup(ost.Descent(0.5), model)
    assert len(state.plan.params) == 2
    assert state.plan.n_ties == 1

    g = np.arange(6.0).reshape(2, 3)
    grads, _ = chain({"w": xp.asarray(g, dtype), "t": ost.Transpose(xp.ones((2, 3), dtype))}, None)
    _new_state, new = STEPS[step](state, model, grads)
    np.testing.assert_array_equal(bottom_of(new)["w"], W0 - 0.5 * (g + 1))
    np.testing.assert_array_equal(side_of(new), [1.0, 2.0])  # no gradient: unchanged
    assert bottom_of(new)["t"].parent is bottom_of(new)["w"]
    if step == "update_" and backend == "numpy":
        assert bottom_of(new)["w"] is W

    # A broken tie (what a jitted step returns): refused with the full path; retie mends it.
    broken, _ = chain({"w": W, "t": ost.Transpose(W + 0)}, b)
    before = snapshot(state, {"w": W, "b": b})
    with pytest.raises(ost.TieError, match="the tie between model" + re.escape(path + "['t'] and")):
        STEPS[step](state, broken, grads)
    assert_unchanged(before, state, {"w": W, "b": b})
    mended = ost.retie(state, broken)
    assert bottom_of(mended)["t"].parent is bottom_of(mended)["w"]

    # A gradient of the wrong shape: the message names the whole path.
    bad, _ = chain({"w": xp.ones((3, 3), dtype), "t": None}, None)
    with pytest.raises(ValueError, match="^the gradient at grads" + re.escape(path + "['w'] has")):
        STEPS[step](state, model, bad)
    assert sys.getrecursionlimit() == limit
    assert python_recursion_works()


def test_a_tree_beyond_the_depth_limit_is_refused_with_its_depth():
    tree = np.ones(2)
    for _ in range(_walk.MAX_DEPTH + 10):
        tree = [tree]
    with pytest.raises(ost.StructureError, match=r"nested 100010 levels deep; .* up to 100000"):
        ost.setup(ost.Adam(), tree)
    assert python_recursion_works()


# -- very wide trees -------------------------------------------------------------------------------

WIDE = 100_000


def test_a_numpy_tree_of_100_000_leaves():
    """Every leaf its own parameter, except one array held at every 1000th position (a tie of
    100 positions): setup, update and update_ in seconds, each value checked."""
    rng = np.random.default_rng(11)
    values, grads_matrix = rng.normal(size=(WIDE, 2)), rng.normal(size=(WIDE, 2))
    shared = np.zeros(2)
    tied_at = np.arange(0, WIDE, 1000)
    leaves = [shared if i % 1000 == 0 else values[i].copy() for i in range(WIDE)]
    model = {f"p{i:06d}": leaf for i, leaf in enumerate(leaves)}
    grads = {f"p{i:06d}": grads_matrix[i] for i in range(WIDE)}
    expected = values - 0.5 * grads_matrix
    expected[tied_at] = shared - 0.5 * grads_matrix[tied_at].sum(axis=0)

    times = {}
    start = time.perf_counter()
    state = ost.setup(ost.Descent(0.5), model)
    times["setup"] = time.perf_counter() - start
    assert len(state.plan.params) == WIDE - len(tied_at) + 1
    for name, step in STEPS.items():
        if name == "jit":
            continue
        start = time.perf_counter()
        _, new = step(state, model, grads)
        times[name] = time.perf_counter() - start
        np.testing.assert_array_equal(np.stack(list(new.values())), expected)
        assert all(new[f"p{i:06d}"] is new["p000000"] for i in tied_at)
    assert model["p000000"] is shared
    assert np.all(shared == expected[0])
    assert sum(times.values()) < 120, times  # seconds; a generous bound against a blow-up


JAX_WIDE = 1000  # the eager step is one compiled program over all leaves: compile time grows


def test_a_jax_tree_of_a_thousand_leaves_compiles_once():
    rng = np.random.default_rng(12)
    values = rng.normal(size=(JAX_WIDE, 2)).astype(np.float32)
    shared = jnp.zeros(2, jnp.float32)
    model = {
        f"p{i:04d}": shared if i % 100 == 0 else jnp.asarray(values[i]) for i in range(JAX_WIDE)
    }
    tied_at = np.arange(0, JAX_WIDE, 100)
    state = ost.setup(ost.Descent(0.5), model)
    expected = values.copy()
    expected[tied_at] = 0.0
    with counting_compiles() as compiles:
        for step in range(3):
            g = rng.normal(size=(JAX_WIDE, 2)).astype(np.float32)
            state, model = ost.update(state, model, {k: g[i] for i, k in enumerate(model)})
            if step == 0:
                first = len(compiles)
            summed = expected[0] - np.float32(0.5) * g[tied_at].sum(axis=0, dtype=np.float64)
            expected = expected - np.float32(0.5) * g
            expected[tied_at] = summed
            # The tied parameter's ten float32 gradients (each below 5 in size) are summed in
            # an order of optstate's choosing: up to 10 roundings of 2**-22, times 0.5.
            np.testing.assert_allclose(
                np.stack(list(model.values())), expected, rtol=0, atol=10 * 2**-22
            )
            np.testing.assert_array_equal(
                np.delete(np.stack(list(model.values())), tied_at, 0),
                np.delete(expected, tied_at, 0),
            )
    assert len(compiles) == first
    assert all(model[f"p{i:04d}"] is model["p0000"] for i in tied_at)


# -- ties broken or made since setup -----------------------------------------------------------


def tie_cases(xp, dtype):
    """name -> (model at setup, model at update, error, message)."""
    W = xp.asarray(W0.copy(), dtype=dtype)
    V = xp.asarray(W0.T + 1, dtype=dtype)
    U = xp.asarray(W0 + 1, dtype=dtype)
    cases = {
        "copy at a Transpose": (
            {"enc": W, "dec": ost.Transpose(W)},
            {"enc": W, "dec": ost.Transpose(W + 0)},
            ost.TieError,
            r"the tie between model\['dec'\] and model\['enc'\] is broken.*retie",
        ),
        "same array added": (
            {"a": W, "b": U},
            {"a": W, "b": W},
            ost.TieError,
            r"model\['b'\] and model\['a'\] hold the same array now",
        ),
        "Transpose added": (
            {"a": W, "b": ost.Transpose(U)},
            {"a": W, "b": ost.Transpose(W)},
            ost.TieError,
            r"model\['b'\] and model\['a'\] hold the same array now",
        ),
        "Transpose dropped": (
            {"a": W, "b": ost.Transpose(W)},
            {"a": W, "b": W},
            ValueError,
            r"model\['b'\] had 1 Transpose layer\(s\) at setup, now 0",
        ),
    }
    if xp is np:
        cases |= {
            "view added": (
                {"a": W, "b": V},
                {"a": W, "b": W.T},
                ost.TieError,
                r"model\['a'\] and model\['b'\] share memory now, but were separate",
            ),
            "slice added": (
                {"a": W, "b": U[0]},
                {"a": W, "b": W[0]},
                ost.TieError,
                r"model\['a'\] and model\['b'\] share memory now",
            ),
            "view copied": (
                {"w": W, "wt": W.T},
                {"w": W, "wt": W.T.copy()},
                ost.TieError,
                r"the tie between model\['w'\] and model\['wt'\] is broken",
            ),
        }
    return cases


@pytest.mark.parametrize(
    ("backend", "case"),
    [("numpy", c) for c in tie_cases(np, np.float64)] + [("jax", c) for c in tie_cases(jnp, None)],
)
@pytest.mark.parametrize("step", ["update", "update_"])
def test_a_tie_broken_or_made_since_setup_is_refused(backend, step, case):
    xp, dtype = BACKENDS[backend]
    at_setup, at_update, error, match = tie_cases(xp, dtype)[case]
    state = ost.setup(ost.Momentum(0.1), at_setup)
    grads = jax.tree_util.tree_map(lambda x: xp.ones(x.shape, dtype), at_update)
    before = snapshot(state, at_update)
    with pytest.raises(error, match=match):
        STEPS[step](state, at_update, grads)
    assert_unchanged(before, state, at_update)


def test_after_a_jitted_step_the_tie_is_refused_until_retie():
    model = tied(jnp, jnp.float32, W0)
    state = ost.setup(ost.Descent(0.5), model)
    ones = {"enc": jnp.ones((2, 3)), "dec": ost.Transpose(jnp.ones((2, 3))), "b": jnp.ones(2)}
    state, copies = jax.jit(ost.update)(state, model, ones)
    assert copies["dec"].parent is not copies["enc"]
    before = snapshot(state, copies)
    with pytest.raises(ost.TieError, match=r"is broken.*optstate.retie\(state, model\)"):
        ost.update(state, copies, ones)
    assert_unchanged(before, state, copies)
    state, model = ost.update(state, ost.retie(state, copies), ones)
    np.testing.assert_array_equal(model["enc"], W0 - 0.5 * 2 - 0.5 * 2)
    assert model["dec"].parent is model["enc"]


# -- a state used with another rule ---------------------------------------------------------------


@pytest.mark.parametrize(("backend", "step"), JIT_CASES)
def test_rule_states_from_another_rule_are_refused(backend, step):
    """A state carries its rule: ``update`` takes no rule, so a state set up with Adam steps with
    Adam. What can go wrong through the public API is a state assembled from two states
    (``State.replace``, ``State(...)``): its arrays are checked against its rule when the step
    cannot run, and the error says so instead of an AttributeError from inside a rule."""
    xp, dtype = BACKENDS[backend]
    model = tied(xp, dtype, W0)
    adam, momentum = ost.setup(ost.Adam(), model), ost.setup(ost.Momentum(), model)
    grads = {"enc": xp.ones((2, 3), dtype), "dec": None, "b": xp.ones(2, dtype)}
    for state, match in [
        (
            momentum.replace(states=adam.states),
            r"rule state for model\['b'\] is AdamState\(mu=.*\), but its rule Momentum keeps "
            r"MomentumState\(velocity=.*\); .*another rule",
        ),
        (
            adam.replace(states=momentum.states),
            r"rule state for model\['b'\] is MomentumState.*but its rule Adam keeps AdamState",
        ),
        (
            adam.replace(hyper=momentum.hyper),
            r"hyper-parameters for its rule Adam are \{lr: .*, momentum: .*\}, which are not",
        ),
    ]:
        before = snapshot(state, model)
        with pytest.raises(ost.StructureError, match=match):
            STEPS[step](state, model, grads)
        assert_unchanged(before, state, model)


def test_rule_states_of_the_same_structure_are_accepted():
    """Documented limit of that check: AdamW keeps Adam's state, so Adam's moments in an AdamW
    state are taken as they are and AdamW continues from them (hand-derived arithmetic)."""
    w0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-1.0, 2.0])
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-8, 0.01
    adam = ost.setup(ost.Adam(lr), {"w": w0})
    adam, model = ost.update(adam, {"w": w0}, {"w": g1})
    adamw = ost.setup(ost.AdamW(lr, weight_decay=wd), model).replace(states=adam.states)
    _, model2 = ost.update(adamw, model, {"w": g2})
    w1 = w0 - lr * g1 / (np.abs(g1) + eps)  # Adam's first step
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    direction = (m / (1 - b1**2)) / (np.sqrt(v / (1 - b2**2)) + eps)
    np.testing.assert_allclose(model2["w"], w1 - lr * (direction + wd * w1), rtol=1e-12)
