"""optstate.interop.optax: optax transformations as rules (``from_optax``) and rules as tie-aware
optax transformations (``to_optax``), against optax run on the model written with each weight once
and its gradients summed by hand."""

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost
from optstate.interop import optax as ost_optax

RNG = np.random.default_rng(7)
STEPS = 4
# Two compiled programs (optstate's step and the reference's) may round a float32 result
# differently by one ulp where XLA fuses their operations differently; over STEPS steps that is
# at most STEPS ulps of the largest parameter.
ULPS = STEPS * float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True, scope="module")
def standard_promotion() -> Iterator[None]:
    # optax is user code written for JAX's default dtype promotion: optax.adam computes
    # ``b1 ** count`` (a Python float to an int32 power), which conftest.py's strict promotion
    # rejects. Rank promotion stays "raise".
    with jax.numpy_dtype_promotion("standard"):
        yield


def draw(*shape: int) -> jax.Array:
    return jnp.asarray(RNG.normal(size=shape).astype(np.float32))


def tied_model() -> dict[str, Any]:
    """One weight at three positions (twice itself, once transposed), an untied bias and an
    integer leaf that is not a parameter."""
    w = draw(4, 3)
    return {
        "enc": {"w": w, "b": draw(3)},
        "dec": {"w": ost.Transpose(w)},
        "again": [w],
        "count": jnp.arange(2),
    }


def loss(model: dict[str, Any], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    h = jnp.tanh(h @ model["dec"]["w"])
    return jnp.mean((h @ model["again"][0] - 0.5) ** 2)


# Compiled once for all tests (eager differentiation would compile every operation on its own).
grads_of = jax.jit(jax.grad(loss, allow_int=True))


def deduplicated(model: dict[str, Any]) -> dict[str, jax.Array]:
    return {"w": model["enc"]["w"], "b": model["enc"]["b"]}


def retied(params: dict[str, jax.Array]) -> dict[str, Any]:
    w = params["w"]
    return {"enc": {"w": w, "b": params["b"]}, "dec": {"w": ost.Transpose(w)}, "again": [w]}


def summed(grads: Any) -> dict[str, jax.Array]:
    """The de-duplicated model's gradient, summed by hand over the weight's three positions."""
    g_w = grads["enc"]["w"] + grads["dec"]["w"].parent + grads["again"][0]
    return {"w": g_w, "b": grads["enc"]["b"]}


@functools.cache
def reference_step(tx: Any) -> Any:
    """One optax step on the de-duplicated parameters, given the tied model's structural
    gradient, compiled (as optstate's step is); one per transformation, shared by the tests."""

    @jax.jit
    def step(params: Any, opt_state: Any, x: jax.Array) -> tuple[Any, Any]:
        full = {**retied(params), "count": jnp.arange(2)}
        updates, opt_state = tx.update(summed(grads_of(full, x)), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def assert_matches(model: dict[str, Any], ref: dict[str, jax.Array]) -> None:
    scale = max(float(jnp.max(jnp.abs(v))) for v in ref.values())
    for key in ("w", "b"):
        np.testing.assert_allclose(deduplicated(model)[key], ref[key], rtol=0, atol=ULPS * scale)


def assert_tied(model: dict[str, Any]) -> None:
    w = model["enc"]["w"]
    assert np.array_equal(model["dec"]["w"].parent, w)
    assert np.array_equal(model["again"][0], w)


TRANSFORMATIONS = {
    "adam": optax.adam(2**-7, b1=0.875, b2=1 - 2**-10),
    "sgd-momentum": optax.sgd(0.1, momentum=0.9),
    # A bound below the gradients' global norm, so that clipping acts at every step.
    "clip-adam": optax.chain(optax.clip_by_global_norm(0.05), optax.adam(2**-7)),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(TRANSFORMATIONS))
def test_from_optax_equals_optax_on_the_deduplicated_model(name: str, jit: bool) -> None:
    tx = TRANSFORMATIONS[name]
    model = tied_model()
    x = draw(6, 4)
    state = ost.setup(ost_optax.from_optax(tx), model)
    assert len(state.plan.params) == 2  # the weight once, the bias; the integer leaf is no param
    ref = deduplicated(model)
    ref_state = tx.init(ref)
    ref_step = reference_step(tx)
    step = jax.jit(ost.update) if jit else ost.update
    for _ in range(STEPS):
        grads = grads_of(model, x)
        if name == "clip-adam":  # the tie counts once in the norm: the summed gradient's
            assert optax.tree.norm(summed(grads)) > 0.05
        state, model = step(state, model, grads)
        ref, ref_state = ref_step(ref, ref_state, x)
        assert_matches(model, ref)
        assert_tied(model)
    if not jit:  # eager: one array object at every position
        assert model["dec"]["w"].parent is model["enc"]["w"] is model["again"][0]
    assert np.array_equal(model["count"], np.arange(2))


def test_global_norm_counts_a_tie_once() -> None:
    """By hand: clip to norm 1 then a unit SGD step moves the weight by the summed gradient over
    its norm, ``g / |g|`` with ``g = g1 + g2``, not by ``g / sqrt(|g1|² + |g2|²)``."""
    w = jnp.zeros((2,))
    model = {"a": w, "b": w}
    g1, g2 = jnp.asarray([3.0, 0.0]), jnp.asarray([0.0, 4.0])
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    state = ost.setup(ost_optax.from_optax(tx), model)
    _, new = ost.update(state, model, {"a": g1, "b": g2})
    np.testing.assert_allclose(new["a"], [-0.6, -0.8], rtol=1e-6)
    assert new["a"] is new["b"]


def test_injected_hyperparameters_are_adjusted_without_recompiling() -> None:
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5, momentum=0.9)
    rule = ost_optax.from_optax(tx)
    assert rule.hyper() == {"learning_rate": 0.5, "momentum": 0.9}
    model = {"w": jnp.ones(3)}
    traces = []

    @jax.jit
    def step(state: ost.State, model: Any, grads: Any) -> Any:
        traces.append(1)
        return ost.update(state, model, grads)

    state = ost.setup(rule, model)
    ref = {"w": jnp.ones(3)}
    ref_state = tx.init(ref)
    for lr in (0.5, 0.25, 0.125):
        state = ost.adjust(state, learning_rate=lr)
        ref_state.hyperparams["learning_rate"] = jnp.asarray(lr)  # optax's own way
        g = {"w": jnp.asarray([1.0, -2.0, 3.0])}
        state, model = step(state, model, g)
        updates, ref_state = tx.update(g, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        np.testing.assert_array_equal(model["w"], ref["w"])
    assert len(traces) == 1


def test_an_optstate_schedule_drives_an_injected_hyperparameter() -> None:
    """By hand: SGD with a learning rate falling linearly from 1 to 0 over 4 steps (1, 0.75,
    0.5 at steps 0, 1, 2) and a unit gradient."""
    rule = ost_optax.from_optax(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    model = {"w": jnp.zeros(2)}
    state = ost.adjust(ost.setup(rule, model), learning_rate=ost.schedules.linear(1.0, 0.0, 4))
    for expected in (-1.0, -1.75, -2.25):
        state, model = ost.update(state, model, {"w": jnp.ones(2)})
        np.testing.assert_array_equal(model["w"], [expected, expected])


def test_adjusting_an_unknown_hyperparameter_is_refused() -> None:
    state = ost.setup(ost_optax.from_optax(optax.adam(1e-3)), {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"unknown hyper-parameter.*learning_rate"):
        ost.adjust(state, learning_rate=1e-4)


def test_a_parameter_without_gradient_keeps_its_optax_state() -> None:
    tx = optax.adam(0.1)
    model = {"a": jnp.ones(2), "b": jnp.ones(2)}
    state = ost.setup(ost_optax.from_optax(tx), model)
    state, new = ost.update(state, model, {"a": jnp.ones(2), "b": None})
    assert new["b"] is model["b"]
    assert int(state.states[1][0].count) == 0
    assert int(state.states[0][0].count) == 1
    np.testing.assert_array_equal(state.states[1][0].mu, np.zeros(2))
    # optax on parameter a alone
    ref_state = tx.init(jnp.ones(2))
    updates, _ = tx.update(jnp.ones(2), ref_state)
    # One step of two differently compiled programs: one ulp (see ULPS).
    np.testing.assert_allclose(
        new["a"], optax.apply_updates(jnp.ones(2), updates), rtol=ULPS / STEPS
    )


def test_from_optax_inside_a_chain_and_per_subtree() -> None:
    """As one member of an OptimiserChain, and for one subtree with None for another."""
    model = tied_model()
    tx = optax.sgd(0.1, momentum=0.9)
    rule = ost.OptimiserChain(ost.ClipGrad(0.01), ost_optax.from_optax(tx))
    spec = {"enc": rule, "dec": rule, "again": rule, "count": None}
    state = ost.setup(spec, model)
    x = draw(6, 4)
    ref = deduplicated(model)
    ref_tx = optax.chain(optax.clip(0.01), tx)
    ref_state = ref_tx.init(ref)
    ref_step = reference_step(ref_tx)
    for _ in range(STEPS):
        state, model = ost.update(state, model, grads_of(model, x))
        ref, ref_state = ref_step(ref, ref_state, x)
    assert_matches(model, ref)


def test_a_checkpoint_loads_with_a_rule_built_again(tmp_path: Any) -> None:
    """As in a new process: another transformation object of the same kind. Training resumes
    exactly; a transformation keeping another state is refused."""
    model = tied_model()
    x = draw(6, 4)
    state = ost.setup(ost_optax.from_optax(optax.adam(0.01)), model)
    state, model = ost.update(state, model, grads_of(model, x))
    ost.save(tmp_path / "c.npz", state, model)
    like = (ost.setup(ost_optax.from_optax(optax.adam(0.01)), model), model)
    loaded, loaded_model = ost.load(tmp_path / "c.npz", like=like)
    ours = ost.update(state, model, grads_of(model, x))
    theirs = ost.update(loaded, loaded_model, grads_of(loaded_model, x))
    for a, b in zip(
        jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    other = (ost.setup(ost_optax.from_optax(optax.sgd(0.01, momentum=0.9)), model), model)
    with pytest.raises(ost.checkpoint.CheckpointMismatchError, match="TraceState"):
        ost.load(tmp_path / "c.npz", like=other)


# -- to_optax ------------------------------------------------------------------------------


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_to_optax_in_an_optax_loop_keeps_ties_and_equals_the_reference(jit: bool) -> None:
    model = tied_model()
    x = draw(6, 4)
    tx = ost_optax.to_optax(ost.Adam(2**-7, betas=(0.875, 1 - 2**-10)), model)
    ref_tx = TRANSFORMATIONS["adam"]

    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:  # the user's optax loop, as is
        updates, opt_state = tx.update(grads_of(params, x), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    step = jax.jit(step) if jit else step
    params, opt_state = model, tx.init(model)
    assert isinstance(opt_state, ost.State)
    assert len(opt_state.plan.params) == 2
    ref = deduplicated(model)
    ref_state = ref_tx.init(ref)
    ref_step = reference_step(ref_tx)
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state)
        ref, ref_state = ref_step(ref, ref_state, x)
        assert_tied(params)  # equal at every position after optax.apply_updates
        # The update is new - old, so p + u rounds once more than the reference's p + u': at
        # most one ulp of the parameter per step, within ULPS.
        assert_matches(params, ref)
    assert np.array_equal(params["count"], np.arange(2))


def test_to_optax_init_inside_jit_takes_the_ties_from_the_model() -> None:
    model = tied_model()
    tx = ost_optax.to_optax(ost.Momentum(0.1), model)
    # A jitted step has made copies: the positions hold equal but separate arrays.
    copies = jax.jit(lambda m: m)(model)
    assert copies["again"][0] is not copies["enc"]["w"]
    for opt_state in (tx.init(copies), jax.jit(tx.init)(copies)):
        assert len(opt_state.plan.params) == 2
        assert opt_state.plan.n_ties == 1
    # Without the model, the copies are three parameters: the tie is lost, and setup says so.
    with pytest.warns(ost.CopyWarning, match=r"\.parent holds the same values as model\['again'\]"):
        assert len(ost_optax.to_optax(ost.Momentum(0.1)).init(copies).plan.params) == 4


def test_to_optax_update_by_hand() -> None:
    """Momentum on one weight at two positions, one step written out: both positions move by
    -lr * (g1 + g2)."""
    w = jnp.asarray([1.0, 2.0])
    params = {"a": w, "b": w}
    tx = ost_optax.to_optax(ost.Momentum(0.5))
    opt_state = tx.init(params)
    grads = {"a": jnp.asarray([1.0, 1.0]), "b": jnp.asarray([3.0, -1.0])}
    updates, opt_state = tx.update(grads, opt_state, params)
    np.testing.assert_array_equal(updates["a"], [-2.0, 0.0])
    np.testing.assert_array_equal(updates["b"], [-2.0, 0.0])


# -- errors --------------------------------------------------------------------------------


class Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def init(self, params: Any) -> Any:
        return ()

    def update(self, updates: Any, state: Any, params: Any = None) -> Any:
        return updates, state


def flattening() -> optax.GradientTransformation:
    """A transformation whose state is one vector over all parameters: not per parameter."""

    def init(params: Any) -> jax.Array:
        return jnp.zeros(sum(x.size for x in jax.tree_util.tree_leaves(params)))

    def update(updates: Any, state: Any, params: Any = None) -> Any:
        return updates, state

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize(
    ("transformation", "message"),
    [
        (optax.adam, r"optax.GradientTransformation.*function adam.*call it, e.g. adam\(1e-3\)"),
        (ost.Adam(), "already an optstate rule"),
        (42, "expects an optax.GradientTransformation.*got 42 of type int"),
        (Unhashable(), "cannot be hashed"),
    ],
    ids=["factory", "optstate-rule", "number", "unhashable"],
)
def test_from_optax_refuses_what_is_not_a_transformation(transformation: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        ost_optax.from_optax(transformation)


def test_a_state_that_is_not_per_parameter_is_refused_and_nothing_changes() -> None:
    model = {"a": jnp.ones(2), "b": jnp.ones(3)}
    state = ost.setup(ost_optax.from_optax(flattening()), model)
    before = jax.tree_util.tree_leaves(state)
    with pytest.raises(TypeError, match="not made parameter by parameter"):
        ost.update(state, model, {"a": jnp.ones(2), "b": jnp.ones(3)})
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(state), before, strict=True))


EXTRA_ARGUMENTS = {
    "reduce_on_plateau": (lambda: optax.contrib.reduce_on_plateau(), "value"),
    "adam-reduce_on_plateau": (
        lambda: optax.chain(optax.adam(1e-3), optax.contrib.reduce_on_plateau()),
        "value",
    ),
    "polyak_sgd": (lambda: optax.polyak_sgd(), "value"),
    "lbfgs": (lambda: optax.lbfgs(), "value, grad, value_fn"),
}


@pytest.mark.parametrize("name", list(EXTRA_ARGUMENTS))
def test_a_transformation_needing_extra_arguments_is_refused_when_the_rule_is_made(
    name: str,
) -> None:
    make, names = EXTRA_ARGUMENTS[name]
    tx = make()
    # optax itself, on a parameter alone, needs them: its update fails without them
    w = jnp.ones(2)
    with pytest.raises(TypeError, match="required keyword-only argument"):
        tx.update(w, tx.init(w), w)
    with pytest.raises(TypeError, match=rf"needs the keyword arguments {names} besides"):
        ost_optax.from_optax(tx)


def needs_value_for_matrices() -> optax.GradientTransformationExtraArgs:
    """A transformation for matrices only (so from_optax's probe of shape (1,) cannot run it)
    whose update needs the loss's value."""

    def init(params: Any) -> optax.EmptyState:
        if any(p.ndim != 2 for p in jax.tree_util.tree_leaves(params)):
            raise ValueError("matrices only")
        return optax.EmptyState()

    def update(updates: Any, state: Any, params: Any = None, *, value: Any) -> Any:
        del params, value
        return updates, state

    return optax.GradientTransformationExtraArgs(init, update)


def test_a_transformation_needing_extra_arguments_is_refused_at_setup() -> None:
    rule = ost_optax.from_optax(needs_value_for_matrices())  # cannot be probed here
    model = {"w": jnp.ones((2, 3))}
    with pytest.raises(TypeError, match=r"needs the keyword arguments value besides"):
        ost.setup(rule, model)


def test_lookahead_is_refused_when_the_rule_is_made() -> None:
    tx = optax.lookahead(optax.sgd(0.1), sync_period=2, slow_step_size=0.5)
    with pytest.raises(TypeError, match=r"cannot run optax\.lookahead.*from_optax\(fast_optimizer"):
        ost_optax.from_optax(tx)


def test_lookahead_by_hand_as_the_refusal_says_equals_optax() -> None:
    """The remedy the refusal gives: from_optax(fast) and slow weights kept beside the model,
    against optax.lookahead on the de-duplicated model."""
    fast, period, alpha = optax.sgd(0.1, momentum=0.9), 2, 0.5
    model = tied_model()
    x = draw(6, 4)
    ref_tx = optax.lookahead(fast, sync_period=period, slow_step_size=alpha)
    ref = optax.LookaheadParams.init_synced(deduplicated(model))
    ref_state = ref_tx.init(ref)
    state = ost.setup(ost_optax.from_optax(fast), model)
    slow = model
    for step in range(2 * period + 1):
        full = {**retied(ref.fast), "count": jnp.arange(2)}
        updates, ref_state = ref_tx.update(summed(grads_of(full, x)), ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        state, model = ost.update(state, model, grads_of(model, x))
        if (step + 1) % period == 0:
            slow = jax.tree_util.tree_map(
                lambda s, f: s + alpha * (f - s) if jnp.issubdtype(s.dtype, jnp.floating) else s,
                slow,
                model,
            )
            model = slow = ost.retie(state, slow)
        assert_matches(model, ref.fast)
        assert_tied(model)


def test_to_optax_errors() -> None:
    model = tied_model()
    tx = ost_optax.to_optax(ost.Adam(), model)
    opt_state = tx.init(model)
    grads = grads_of(model, draw(6, 4))
    with pytest.raises(TypeError, match=r"needs the parameters: call tx.update\(grads, opt_state"):
        tx.update(grads, opt_state)
    with pytest.raises(TypeError, match=r"state is an optstate State.*got ScaleByAdamState"):
        tx.update(grads, optax.scale_by_adam().init(model), model)
    with pytest.raises(ost.StructureError, match="positions missing from the model"):
        tx.init({"enc": model["enc"]})


def test_torch_tensors_are_refused() -> None:
    import torch  # a CI extra; imported here only, as it takes a second

    rule = ost_optax.from_optax(optax.sgd(0.1))
    with pytest.raises(TypeError, match="computes with JAX and cannot train a torch tensor"):
        ost.setup(rule, {"w": torch.ones(2)})
