"""Schedules against optax's, and evaluated inside jit without recompiling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost
from optstate import schedules

STEPS = [0, 1, 2, 5, 9, 10, 11, 37, 99, 100, 101, 250]

CASES = {
    "constant": (schedules.constant(0.5), optax.constant_schedule(0.5)),
    "linear": (schedules.linear(1.0, 0.25, 40, begin=5), optax.linear_schedule(1.0, 0.25, 40, 5)),
    "cosine": (
        schedules.cosine_decay(2.0, 100, alpha=0.125),
        optax.cosine_decay_schedule(2.0, 100, 0.125),
    ),
    "warmup_cosine": (
        schedules.warmup_cosine(1.0, 10, 100, init=0.125, end=0.0625),
        optax.warmup_cosine_decay_schedule(0.125, 1.0, 10, 100, 0.0625),
    ),
    "exponential": (
        schedules.exponential_decay(1.0, 0.5, 20, begin=3),
        optax.exponential_decay(1.0, 20, 0.5, transition_begin=3),
    ),
    "exponential_staircase_end": (
        schedules.exponential_decay(1.0, 0.5, 20, staircase=True, end=0.1),
        optax.exponential_decay(1.0, 20, 0.5, staircase=True, end_value=0.1),
    ),
    "exponential_growth_end": (
        schedules.exponential_decay(1.0, 2.0, 20, end=4.0),
        optax.exponential_decay(1.0, 20, 2.0, end_value=4.0),
    ),
    "piecewise": (
        schedules.piecewise_constant([1.0, 0.5, 0.05], [10, 100]),
        optax.piecewise_constant_schedule(1.0, {10: 0.5, 100: 0.1}),
    ),
    "join": (
        schedules.join([schedules.constant(0.25), schedules.linear(1.0, 0.0, 50)], [10]),
        optax.join_schedules(
            [optax.constant_schedule(0.25), optax.linear_schedule(1.0, 0.0, 50)], [10]
        ),
    ),
}


def evaluated(schedule, like, steps):
    """The schedule as ``setup`` stores it (numbers as arrays like ``like``), at each step."""
    state = ost.setup(ost.Descent(schedule), {"w": like})
    stored = state.hyper[0]["lr"]
    counter = type(state.step)
    xp = jnp if counter is not np.ndarray else np
    return [float(stored(xp.asarray(t, dtype=xp.int32))) for t in steps]


@pytest.mark.parametrize("name", CASES)
def test_matches_optax(name):
    ours, theirs = CASES[name]
    with jax.numpy_dtype_promotion("standard"):
        expected32 = [float(theirs(t)) for t in STEPS]
        with jax.enable_x64(True):
            expected64 = [float(theirs(t)) for t in STEPS]
    np.testing.assert_allclose(
        evaluated(ours, jnp.ones(2), STEPS), expected32, rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        evaluated(ours, np.ones(2), STEPS), expected64, rtol=1e-12, atol=1e-15
    )


def test_the_learning_rate_follows_the_schedule_inside_jit():
    lrs = schedules.linear(1.0, 0.0, 4)
    model = {"w": jnp.zeros(1)}
    state = ost.setup(ost.Descent(lrs), model)
    traces = []

    @jax.jit
    def step(state, model):
        traces.append(1)
        return ost.update(state, model, {"w": jnp.ones(1)})

    positions = []
    for _ in range(6):
        state, model = step(state, model)
        positions.append(float(model["w"][0]))
    # steps 0..5 use lr 1, 0.75, 0.5, 0.25, 0, 0
    np.testing.assert_allclose(positions, np.cumsum([-1, -0.75, -0.5, -0.25, 0, 0]))
    assert len(traces) == 1
    assert int(state.step) == 6


def test_adjust_a_schedule_without_recompiling():
    model = {"w": jnp.zeros(1)}
    state = ost.setup(ost.Descent(schedules.cosine_decay(1.0, 10)), model)
    traces = []

    @jax.jit
    def step(state, model):
        traces.append(1)
        return ost.update(state, model, {"w": jnp.ones(1)})

    state, model = step(state, model)
    state = ost.adjust(state, lr=schedules.cosine_decay(0.5, 20))
    state, model = step(state, model)
    assert len(traces) == 1
    expected = -1.0 - 0.5 * 0.5 * (1 + np.cos(np.pi / 20))
    np.testing.assert_allclose(float(model["w"][0]), expected, rtol=1e-6)


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="one more value than boundaries"):
        schedules.piecewise_constant([1.0], [10])
    with pytest.raises(ValueError, match="boundaries must increase"):
        schedules.piecewise_constant([1.0, 2.0, 3.0], [10, 5])
    with pytest.raises(ValueError, match="0 < warmup_steps < decay_steps"):
        schedules.warmup_cosine(1.0, 10, 5)
    with pytest.raises(TypeError, match="join takes schedules"):
        schedules.join([schedules.constant(1.0), 0.5], [3])
