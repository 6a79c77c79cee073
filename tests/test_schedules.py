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
        schedules.warmup_cosine(1.0, warmup_steps=10, decay_steps=100, init=0.125, end=0.0625),
        optax.warmup_cosine_decay_schedule(0.125, 1.0, 10, 100, 0.0625),
    ),
    "exponential": (
        schedules.exponential_decay(1.0, rate=0.5, steps=20, begin=3),
        optax.exponential_decay(1.0, 20, 0.5, transition_begin=3),
    ),
    "exponential_staircase_end": (
        schedules.exponential_decay(1.0, rate=0.5, steps=20, staircase=True, end=0.1),
        optax.exponential_decay(1.0, 20, 0.5, staircase=True, end_value=0.1),
    ),
    "exponential_growth_end": (
        schedules.exponential_decay(1.0, rate=2.0, steps=20, end=4.0),
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
    stored = state.hyper[0][0]["lr"]
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
        schedules.warmup_cosine(1.0, warmup_steps=10, decay_steps=5)
    with pytest.raises(TypeError, match="join takes schedules"):
        schedules.join([schedules.constant(1.0), 0.5], [3])


# -- schedules count the steps their rule took --------------------------------------------------


def _optax(fn):
    with jax.numpy_dtype_promotion("standard"), jax.enable_x64(True):
        return fn()


def _optax_run(tx, grads, param=0.0):
    def run():
        params = jnp.asarray([param])
        opt = tx.init(params)
        for g in grads:
            updates, opt = tx.update(jnp.asarray([g]), opt, params)
            params = optax.apply_updates(params, updates)
        return float(params[0])

    return _optax(run)


def _ours(rule, grads, param=0.0):
    w = np.array([param])
    model = {"w": w, "wt": ost.Transpose(w)}  # tied: each step's gradient split over two positions
    state = ost.setup(rule, model)
    for g in grads:
        half = np.array([g / 2])
        state, model = ost.update(state, model, {"w": half, "wt": ost.Transpose(half)})
    return state, float(model["w"][0])


def test_a_schedule_after_accumulation_counts_rounds():
    """The issue's case: optax.MultiSteps gives the inner schedule its own count."""
    rule = ost.OptimiserChain(
        ost.AccumGrad(3), ost.Descent(schedules.piecewise_constant([1.0, 0.0], [2]))
    )
    grads = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    state, ours = _ours(rule, grads)
    sgd = optax.sgd(optax.piecewise_constant_schedule(1.0, {2: 0.0}))
    expected = _optax_run(
        optax.MultiSteps(sgd, every_k_schedule=3).gradient_transformation(), grads
    )
    assert ours == expected == -7.0
    assert ost.hyperparams(state)["w"][1]["lr"] == 0.0  # two rounds taken: the boundary passed
    assert int(state.step) == 6


def test_adam_warmup_after_accumulation_equals_multisteps():
    sched = schedules.warmup_cosine(0.1, warmup_steps=3, decay_steps=8, end=0.01)
    rule = ost.OptimiserChain(ost.AccumGrad(2), ost.Adam(sched))
    grads = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5, 3.0, -2.0, 1.0, 0.5, -0.5, 2.5]
    _, ours = _ours(rule, grads, param=1.0)
    adam = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 0.1, 3, 8, 0.01))
    tx = optax.MultiSteps(adam, every_k_schedule=2).gradient_transformation()
    # optax evaluates its schedules in float32 even under x64 (ours: in float64)
    assert ours == pytest.approx(_optax_run(tx, grads, param=1.0), rel=1e-7)


def test_a_skipped_step_does_not_use_up_the_schedule():
    rule = ost.SkipNonFinite(ost.Descent(schedules.piecewise_constant([1.0, 0.0], [2])))
    grads = [float("nan"), 1.0, 1.0]
    state, ours = _ours(rule, grads)
    sgd = optax.sgd(optax.piecewise_constant_schedule(1.0, {2: 0.0}))
    expected = _optax_run(optax.apply_if_finite(sgd, max_consecutive_errors=5), grads)
    assert ours == expected == -2.0
    state, _ = _ours(rule, grads[:2])
    assert ost.hyperparams(state)["w"]["lr"] == 1.0  # one step taken, one skipped
    assert int(state.clocks[0]) == 1
    assert int(state.step) == 2


def test_a_schedule_before_accumulation_counts_every_call():
    """A member before AccumGrad takes every step: its schedule counts calls, the one after it
    counts rounds (optax: ``chain(clip(sched), MultiSteps(...))`` keeps both counts)."""
    clip = schedules.piecewise_constant([10.0, 0.5], [2])
    rule = ost.OptimiserChain(
        ost.ClipGrad(clip), ost.AccumGrad(2), ost.Descent(schedules.linear(1.0, 0.5, 2))
    )
    grads = [3.0, 1.0, 2.0, 4.0, 1.0, 1.0]
    state, ours = _ours(rule, grads)
    # calls 1, 2 unclipped (3, 1), then clipped to 0.5: rounds (3+1)/2 = 2 at lr 1.0,
    # (0.5+0.5)/2 = 0.5 at lr 0.75, (0.5+0.5)/2 = 0.5 at lr 0.5.
    assert ours == pytest.approx(-(2 * 1.0 + 0.5 * 0.75 + 0.5 * 0.5))
    values = ost.hyperparams(state)["w"]
    assert values[0]["delta"] == 0.5
    assert values[2]["lr"] == 0.5


# -- long runs: exact step arithmetic, saturating counts ----------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "steps"),
    [
        (
            schedules.piecewise_constant([1.0, 0.5], [16_777_217]),
            optax.piecewise_constant_schedule(1.0, {16_777_217: 0.5}),
            [16_777_215, 16_777_216, 16_777_217, 2**31 - 1],
        ),
        (
            schedules.linear(1.0, 0.0, 10, begin=100_000_000),
            optax.linear_schedule(1.0, 0.0, 10, 100_000_000),
            [99_999_999, 100_000_000, 100_000_005, 100_000_010, 2**31 - 1],
        ),
        (
            schedules.join([schedules.constant(1.0), schedules.linear(1.0, 0.0, 8)], [2**31 - 10]),
            optax.join_schedules(
                [optax.constant_schedule(1.0), optax.linear_schedule(1.0, 0.0, 8)], [2**31 - 10]
            ),
            [2**31 - 11, 2**31 - 10, 2**31 - 6, 2**31 - 1],
        ),
        (
            schedules.exponential_decay(1.0, rate=0.5, steps=4, begin=2**30, staircase=True),
            optax.exponential_decay(1.0, 4, 0.5, 2**30, staircase=True),
            [2**30 - 1, 2**30 + 3, 2**30 + 4, 2**30 + 9],
        ),
    ],
    ids=["piecewise-2^24", "linear-1e8", "join-2^31", "exponential-2^30"],
)
def test_schedules_are_exact_at_large_steps(ours, theirs, steps):
    """Evaluated as the state stores them (JAX: float32 values, int32 counts) at int32 counts."""
    state = ost.setup(ost.Descent(ours), {"w": jnp.ones(2)})
    stored = state.hyper[0][0]["lr"]
    got = [float(stored(jnp.asarray(t, dtype=jnp.int32))) for t in steps]
    expected = _optax(lambda: [float(theirs(jnp.asarray(t, dtype=jnp.int32))) for t in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_counts_saturate_at_the_int32_limit():
    """optax's counts saturate (``safe_int32_increment``); so do the state's step, the
    schedules' clocks and a rule's own count, so a run past 2**31 steps keeps its values.
    In float64, so that the hyper-parameters are stored exactly as optax's Python floats."""
    top = 2**31 - 1
    # optax's linear schedule computes in float32 even under x64: values exact in float32
    tx = optax.adam(optax.linear_schedule(1.0, 0.5, 64, top - 32))
    g = [0.5, 0.25]

    def reference():
        params = jnp.asarray([1.0, -2.0])
        opt = tx.init(params)
        near = jnp.asarray(top - 1, dtype=jnp.int32)
        opt = (opt[0]._replace(count=near), opt[1]._replace(count=near))
        for _ in range(3):
            updates, opt = tx.update(jnp.asarray(g), opt, params)
            params = optax.apply_updates(params, updates)
        return np.asarray(params)

    expected = _optax(reference)
    with jax.enable_x64(True):
        model = {"w": jnp.asarray([1.0, -2.0])}
        sched = schedules.linear(1.0, 0.5, 64, begin=top - 32)
        state = ost.setup(ost.Adam(sched), model)
        near = jnp.asarray(top - 1, dtype=jnp.int32)
        adam = state.states[0]._replace(count=near)
        state = state.replace(states=(adam,), clocks=(near,), step=near)
        for _ in range(3):
            state, model = ost.update(state, model, {"w": jnp.asarray(g)})
    assert int(state.step) == int(state.clocks[0]) == int(state.states[0].count) == top
    np.testing.assert_allclose(model["w"], expected, rtol=1e-12)


# -- a schedule called directly ------------------------------------------------------------------


@pytest.mark.parametrize("step", [7, np.int64(7), np.int32(7), np.asarray(7), jnp.asarray(7)])
@pytest.mark.parametrize("name", ["linear", "warmup_cosine", "piecewise", "join"])
def test_schedules_take_python_and_numpy_integers(name, step):
    ours, theirs = CASES[name]
    expected = _optax(lambda: float(theirs(7)))
    assert float(ours(step)) == pytest.approx(expected, rel=1e-6)


def test_a_schedule_refuses_a_float_step():
    with pytest.raises(TypeError, match=r"a schedule's step must be an integer, got 2\.5"):
        schedules.linear(1.0, 0.0, 10)(2.5)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: schedules.linear(1.0, 0.0, 0), ValueError, r"linear\(steps=...\) must be in \[1"),
        (
            lambda: schedules.linear(1.0, 0.0, 10.5),
            TypeError,
            r"linear\(steps=...\) must be an int",
        ),
        (lambda: schedules.linear("a", 0.0, 10), TypeError, r"linear\(init=...\) must be a real"),
        (lambda: schedules.linear(1.0, 0.0, 10, begin=-1), ValueError, r"begin=...\) must be in"),
        (
            lambda: schedules.cosine_decay(1.0, 2**31),
            ValueError,
            r"steps=...\) must be in \[1, 2\*\*31",
        ),
        (lambda: schedules.cosine_decay(float("nan"), 10), ValueError, "must be finite"),
        # optax's argument order, (init, steps, rate): refused, not 2e30 at step 10
        (lambda: schedules.exponential_decay(1e-3, 1000, 0.9), TypeError, "positional"),
        (
            lambda: schedules.exponential_decay(1e-3, rate=1000, steps=0.9),
            TypeError,
            "integer number of steps",
        ),
        (
            lambda: schedules.exponential_decay(1e-3, rate=-0.5, steps=10),
            ValueError,
            "rate=...\\) must be positive",
        ),
        # optax's order for warmup_cosine, (init, peak, warmup, decay): refused
        (lambda: schedules.warmup_cosine(0.0, 1e-3, 100, 1000), TypeError, "positional"),
        (lambda: schedules.piecewise_constant(1.0, {10: 0.5}), TypeError, "takes two lists"),
        (
            lambda: schedules.piecewise_constant([1.0, 0.5], [10.0]),
            TypeError,
            "boundaries=...\\) must be an integer",
        ),
        (
            lambda: schedules.join([schedules.constant(1.0)] * 2, [-3]),
            ValueError,
            "must be in \\[0",
        ),
    ],
)
def test_schedule_arguments_are_checked(make, error, match):
    with pytest.raises(error, match=match):
        make()
