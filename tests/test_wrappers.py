"""Rules that look across parameters or change when and how another rule steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost

RNG = np.random.default_rng(5)


def normal(*shape, scale=1.0, dtype=jnp.float32):
    return jnp.asarray(scale * RNG.normal(size=shape), dtype=dtype)


def optax_steps(tx, params, grad_list):
    """optax's steps, compiled as optstate compiles its own (XLA may keep a bfloat16 product
    in float32 where op-by-op evaluation rounds it)."""
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):
        step = jax.jit(tx.update)
        for g in grad_list:
            updates, state = step(g, state, params)
            params = optax.apply_updates(params, updates)
    return params


def test_clip_global_norm_counts_a_tie_once():
    w, b = normal(3, 2), normal(4)
    model = {"a": w, "t": ost.Transpose(w), "b": b}
    grads = [
        {"a": normal(3, 2, scale=4), "t": ost.Transpose(normal(3, 2, scale=4)), "b": normal(4)}
        for _ in range(3)
    ]
    rule = ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Momentum(0.125, momentum=0.5))
    state = ost.setup(rule, model)
    for g in grads:
        state, model = ost.update(state, model, g)
    # The reference holds w once, with its two positions' gradients summed by hand.
    summed = [{"w": g["a"] + g["t"].parent, "b": g["b"]} for g in grads]
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.125, momentum=0.5))
    expected = optax_steps(tx, {"w": w, "b": b}, summed)
    np.testing.assert_allclose(model["a"], expected["w"], rtol=2e-6)
    np.testing.assert_allclose(model["b"], expected["b"], rtol=2e-6)
    assert model["t"].parent is model["a"]


def test_clip_global_norm_float64_and_within_bound():
    params = [RNG.normal(size=(3,)), RNG.normal(size=(2, 2))]
    grads = [RNG.normal(size=(3,)) * 10, RNG.normal(size=(2, 2)) * 10]
    state = ost.setup(ost.ClipGlobalNorm(2.0), params)
    _, new = ost.update(state, params, grads)
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    for p, g, n in zip(params, grads, new, strict=True):
        np.testing.assert_allclose(n, p - g * 2.0 / norm, rtol=1e-12)
    _, unclipped = ost.update(ost.setup(ost.ClipGlobalNorm(1e9), params), params, grads)
    for p, g, n in zip(params, grads, unclipped, strict=True):
        np.testing.assert_array_equal(n, p - g)


def test_accum_grad_matches_optax_multisteps():
    params = {"w": normal(3), "v": normal(2, 2)}
    grads = [{"w": normal(3), "v": normal(2, 2)} for _ in range(8)]
    rule = ost.OptimiserChain(ost.AccumGrad(4), ost.Adam(2**-6, betas=(0.875, 1 - 2**-10)))
    state = ost.setup(rule, params)
    model = params
    trajectory = []
    for g in grads:
        state, model = ost.update(state, model, g)
        trajectory.append(model["w"])
    tx = optax.MultiSteps(optax.adam(2**-6, b1=0.875, b2=1 - 2**-10), every_k_schedule=4)
    expected = optax_steps(tx, params, grads)
    np.testing.assert_allclose(model["w"], expected["w"], rtol=2e-6)
    np.testing.assert_allclose(model["v"], expected["v"], rtol=2e-6)
    # It moves only on every 4th call, and Adam's count only advances then.
    np.testing.assert_array_equal(trajectory[0], params["w"])
    np.testing.assert_array_equal(trajectory[2], params["w"])
    assert not np.array_equal(trajectory[3], params["w"])
    assert int(state.states[0][1].count) == 2


def test_accum_grad_under_jit_without_recompiling():
    params = {"w": normal(3)}
    state = ost.setup(ost.OptimiserChain(ost.AccumGrad(2), ost.Momentum(0.5)), params)
    traces = []

    @jax.jit
    def step(state, model, g):
        traces.append(1)
        return ost.update(state, model, g)

    eager_state, eager = state, params
    model = params
    for _ in range(4):
        g = {"w": normal(3)}
        state, model = step(state, model, g)
        eager_state, eager = ost.update(eager_state, eager, g)
    np.testing.assert_allclose(model["w"], eager["w"], rtol=1e-6)
    assert len(traces) == 1


def test_skip_non_finite_keeps_everything_and_counts():
    params = {"w": normal(3), "v": normal(2)}
    rule = ost.SkipNonFinite(ost.Adam(1e-2))
    state = ost.setup(rule, params)
    state, model = ost.update(state, params, {"w": normal(3), "v": normal(2)})
    bad = {"w": jnp.asarray([1.0, jnp.nan, 0.0]), "v": normal(2)}
    skipped_state, skipped = ost.update(state, model, bad)
    for key in params:
        np.testing.assert_array_equal(skipped[key], model[key])
    for a, b in zip(
        jax.tree_util.tree_leaves([s.inner for s in skipped_state.states]),
        jax.tree_util.tree_leaves([s.inner for s in state.states]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert [int(s.skipped) for s in skipped_state.states] == [1, 1]
    inf = {"w": normal(3), "v": jnp.asarray([jnp.inf, 1.0])}
    twice, _ = jax.jit(ost.update)(skipped_state, skipped, inf)
    assert [int(s.skipped) for s in twice.states] == [2, 2]


def test_skip_non_finite_equals_optax_apply_if_finite():
    params = {"w": normal(4)}
    grads = [{"w": normal(4)}, {"w": jnp.full(4, jnp.nan)}, {"w": normal(4)}]
    state = ost.setup(ost.SkipNonFinite(ost.Momentum(0.125, momentum=0.5)), params)
    model = params
    for g in grads:
        state, model = ost.update(state, model, g)
    tx = optax.apply_if_finite(optax.sgd(0.125, momentum=0.5), max_consecutive_errors=100)
    expected = optax_steps(tx, params, grads)
    np.testing.assert_allclose(model["w"], expected["w"], rtol=2e-6)


def test_without_skipping_nan_poisons_the_state():
    params = {"w": normal(2)}
    state = ost.setup(ost.Adam(1e-2), params)
    state, model = ost.update(state, params, {"w": jnp.asarray([jnp.nan, 1.0])})
    assert np.isnan(np.asarray(model["w"][0]))
    assert np.isnan(np.asarray(state.states[0].mu[0]))


def test_mixed_precision_keeps_a_float32_master():
    w32 = normal(64, scale=1.0)
    w16 = w32.astype(jnp.bfloat16)
    model = {"w": w16, "t": ost.Transpose(w16), "f": w32}
    rule = ost.MixedPrecision(ost.Descent(2**-12))
    state = ost.setup(rule, model)
    w_at, f_at = state.plan.slots[2].param, state.plan.slots[0].param  # positions f, t, w
    assert state.states[w_at].master.dtype == jnp.float32
    assert state.states[f_at].master is None  # float32 parameters need no copy
    grads = [{"w": normal(64, dtype=jnp.bfloat16), "t": None, "f": normal(64)} for _ in range(20)]
    master = w16.astype(jnp.float32)
    for g in grads:
        state, model = ost.update(state, model, g)
        master = master - 2**-12 * g["w"].astype(jnp.float32)
    assert model["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(model["w"], master.astype(jnp.bfloat16))
    np.testing.assert_allclose(state.states[w_at].master, master, rtol=1e-6)
    # Without the master copy, steps this small round away in bfloat16.
    plain_state = ost.setup(ost.Descent(2**-12), model)
    _, plain = ost.update(plain_state, model, grads[0])
    assert np.mean(np.asarray(plain["w"] == model["w"])) > 0.5


def test_mixed_precision_must_be_outermost():
    with pytest.raises(TypeError, match="must be the outermost rule"):
        ost.OptimiserChain(ost.MixedPrecision(ost.Adam()), ost.ClipGrad(1.0))
    with pytest.raises(TypeError, match="must be the outermost rule"):
        ost.SkipNonFinite(ost.MixedPrecision(ost.Adam()))
    with pytest.raises(
        TypeError, match="SkipNonFinite takes optstate rules, got GradientTransformation"
    ):
        ost.SkipNonFinite(optax.adam(1e-3))
    with pytest.raises(ValueError, match="positive integer"):
        ost.AccumGrad(0)


def test_adam_mu_dtype_matches_optax():
    params = {"w": normal(8)}
    grads = [{"w": normal(8)} for _ in range(4)]
    rule = ost.Adam(2**-7, betas=(0.875, 1 - 2**-10), mu_dtype=jnp.bfloat16)
    state = ost.setup(rule, params)
    model = params
    for g in grads:
        state, model = ost.update(state, model, g)
    assert state.states[0].mu.dtype == jnp.bfloat16
    tx = optax.adam(2**-7, b1=0.875, b2=1 - 2**-10, mu_dtype=jnp.bfloat16)
    expected = optax_steps(tx, params, grads)
    np.testing.assert_allclose(model["w"], expected["w"], rtol=2e-6)


def test_clip_global_norm_complex_matches_optax():
    rng = np.random.default_rng(9)

    def draw(*shape):
        return np.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape), np.complex128)

    params = {"a": draw(3), "b": draw(2, 2)}
    grads = [{"a": 3 * draw(3), "b": 3 * draw(2, 2)} for _ in range(3)]
    state = ost.setup(ost.ClipGlobalNorm(1.5), params)
    model = params
    for g in grads:
        state, model = ost.update(state, model, g)
    with jax.enable_x64(True):
        tx = optax.chain(optax.clip_by_global_norm(1.5), optax.scale(-1.0))
        expected = optax_steps(tx, jax.tree_util.tree_map(jnp.asarray, params), grads)
    for key in params:
        np.testing.assert_allclose(model[key], expected[key], rtol=1e-12)
