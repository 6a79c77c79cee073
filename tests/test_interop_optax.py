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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
        ref_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)  # optax's own way
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


# -- to_optax as an optax citizen: extra arguments, combinators, inject_hyperparams, map_params --


def tied_params() -> dict[str, Any]:
    """``tied_model`` without its integer leaf (optax's accumulators add gradients, and an
    integer leaf's gradient is float0)."""
    model = tied_model()
    del model["count"]
    return model


structural_grads = jax.jit(jax.grad(loss))  # of tied_params(): one gradient per position


@jax.jit
def _structural_grads_at(w: jax.Array, b: jax.Array, x: jax.Array) -> dict[str, Any]:
    return structural_grads(retied({"w": w, "b": b}), x)


def dedup_grads(ref: dict[str, jax.Array], x: jax.Array) -> dict[str, jax.Array]:
    """The de-duplicated model's gradient at ``ref``: the tied model's, summed by hand."""
    return summed(_structural_grads_at(ref["w"], ref["b"], x))


ADAM = (ost.Adam(2**-7, betas=(0.875, 1 - 2**-10)), TRANSFORMATIONS["adam"])


def run_bridge(
    tx: Any, ref_tx: Any, steps: int = STEPS, kwargs: Any = None, grads: Any = None
) -> tuple[Any, Any, Any, Any]:
    """``tx`` in an optax loop on the tied parameters and ``ref_tx`` on the de-duplicated ones,
    both compiled once, step by step; ``kwargs(n)`` gives the extra arguments of step ``n`` (a
    traced int32) and ``grads(n, g)`` may change its structural gradient. Returns both final
    parameters and states, after checking the tie and the values at every step."""
    params = tied_params()
    x = draw(6, 4)
    kwargs = kwargs or (lambda step: {})
    grads = grads or (lambda step, g: g)

    @jax.jit
    def step(n: jax.Array, params: Any, opt_state: Any) -> tuple[Any, Any]:
        g = grads(n, structural_grads(params, x))
        updates, opt_state = tx.update(g, opt_state, params, **kwargs(n))
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def ref_step(n: jax.Array, ref: Any, ref_state: Any) -> tuple[Any, Any]:
        g = summed(grads(n, _structural_grads_at(ref["w"], ref["b"], x)))
        updates, ref_state = ref_tx.update(g, ref_state, ref, **kwargs(n))
        return optax.apply_updates(ref, updates), ref_state

    opt_state = tx.init(params)
    ref = deduplicated(params)
    ref_state = ref_tx.init(ref)
    for n in map(jnp.int32, range(steps)):
        params, opt_state = step(n, params, opt_state)
        ref, ref_state = ref_step(n, ref, ref_state)
        assert_tied(params)
        assert_matches(params, ref)
    return params, opt_state, ref, ref_state


def test_to_optax_takes_and_ignores_extra_arguments() -> None:
    params = tied_params()
    tx = ost_optax.to_optax(ost.Adam(0.1), params)
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    opt_state = tx.init(params)
    g = structural_grads(params, draw(6, 4))
    plain, _ = tx.update(g, opt_state, params)
    extra, _ = tx.update(g, opt_state, params, value=jnp.asarray(1.0), anything_else=3)
    for a, b in zip(
        jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(extra), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_to_optax_before_a_transformation_that_needs_the_loss() -> None:
    """``optax.chain(bridge, reduce_on_plateau)`` with ``value=``, against optax's chain on the
    de-duplicated model. The value given never improves, so the plateau halves the step."""
    rule, adam = ADAM
    plateau = optax.contrib.reduce_on_plateau(factor=0.5, patience=1, cooldown=0)
    tx = optax.chain(ost_optax.to_optax(rule, tied_params()), plateau)
    ref_tx = optax.chain(adam, plateau)
    *_, opt_state, _, ref_state = run_bridge(
        tx, ref_tx, steps=5, kwargs=lambda n: {"value": jnp.asarray(1.0)}
    )
    assert float(opt_state[1].scale) == float(ref_state[1].scale) < 1.0


def test_to_optax_after_a_linear_transformation() -> None:
    """A transformation before the bridge sees one gradient per position; a linear one (here a
    schedule) gives what it gives on the de-duplicated model, whose gradient is their sum."""
    schedule = optax.scale_by_schedule(lambda n: 1.0 / (1.0 + n))
    tx = optax.chain(schedule, ost_optax.to_optax(ost.Momentum(0.1, 0.9), tied_params()))
    run_bridge(tx, optax.chain(schedule, optax.sgd(0.1, momentum=0.9)), steps=STEPS)


def test_clipping_before_the_bridge_sees_each_position_and_inside_it_the_tie_once() -> None:
    """As documented: ``clip_by_global_norm`` chained before the bridge measures the structural
    gradient (the tied weight once per position), which is optax's clip on the tied tree, not
    on the de-duplicated model; ``ClipGlobalNorm`` inside the rule measures each tied weight
    once and equals optax's chain on the de-duplicated model."""
    rule, adam = ADAM
    clip = optax.clip_by_global_norm(0.05)
    inside = ost_optax.to_optax(ost.OptimiserChain(ost.ClipGlobalNorm(0.05), rule), tied_params())
    run_bridge(inside, optax.chain(clip, adam))

    before = optax.chain(clip, ost_optax.to_optax(rule, tied_params()))
    params, x = tied_params(), draw(6, 4)
    g = structural_grads(params, x)
    updates, _ = before.update(g, before.init(params), params)
    clipped, _ = clip.update(g, clip.init(g))  # optax's clip of the structural gradient
    ref = deduplicated(params)
    ref_updates, _ = adam.update(summed(clipped), adam.init(ref), ref)
    np.testing.assert_allclose(updates["enc"]["w"], ref_updates["w"], rtol=0, atol=ULPS)
    assert optax.tree.norm(g) != optax.tree.norm(summed(g))  # the two norms differ


def test_multisteps_around_the_bridge() -> None:
    rule, adam = ADAM
    tx = optax.MultiSteps(ost_optax.to_optax(rule, tied_params()), every_k_schedule=3)
    *_, opt_state, _, ref_state = run_bridge(
        tx, optax.MultiSteps(adam, every_k_schedule=3), steps=7
    )
    assert int(opt_state.gradient_step) == int(ref_state.gradient_step) == 2
    assert int(opt_state.inner_opt_state.step) == 2  # the rule stepped twice in 7 calls


def test_apply_if_finite_around_the_bridge() -> None:
    """An infinite partial gradient at one position of the tied weight at step 1: the summed
    gradient is infinite, so no position moves and the rule's state stays, as optax's
    apply_if_finite does on the de-duplicated model."""
    rule, adam = ADAM

    def poisoned(n: jax.Array, g: Any) -> Any:
        again = g["again"][0]
        return {**g, "again": [again.at[0, 0].set(jnp.where(n == 1, jnp.inf, again[0, 0]))]}

    tx = optax.apply_if_finite(ost_optax.to_optax(rule, tied_params()), max_consecutive_errors=3)
    ref_tx = optax.apply_if_finite(adam, max_consecutive_errors=3)
    *_, opt_state, _, ref_state = run_bridge(tx, ref_tx, steps=STEPS, grads=poisoned)
    assert int(opt_state.total_notfinite) == int(ref_state.total_notfinite) == 1
    assert int(opt_state.inner_state.step) == STEPS - 1


def injected_adam(model: Any) -> Any:
    def factory(learning_rate: Any) -> Any:
        return ost_optax.to_optax(ost.Adam(learning_rate, betas=(0.875, 1 - 2**-10)), model)

    return factory


def test_inject_hyperparams_over_the_bridge_follows_the_injected_learning_rate() -> None:
    """``optax.inject_hyperparams`` rebuilds the transformation at each step from the value in
    its state: a learning rate changed there changes the step, without recompiling, as it does
    for optax's adam on the de-duplicated model."""
    params = tied_params()
    x = draw(6, 4)
    tx = optax.inject_hyperparams(injected_adam(params))(learning_rate=2**-7)
    ref_tx = optax.inject_hyperparams(optax.adam)(learning_rate=2**-7, b1=0.875, b2=1 - 2**-10)
    traces = []

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        traces.append(1)
        updates, opt_state = tx.update(structural_grads(params, x), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def ref_step(ref: Any, ref_state: Any) -> tuple[Any, Any]:
        updates, ref_state = ref_tx.update(dedup_grads(ref, x), ref_state, ref)
        return optax.apply_updates(ref, updates), ref_state

    opt_state, ref = tx.init(params), deduplicated(params)
    ref_state = ref_tx.init(ref)
    # At its first value it is the plain transformation.
    plain = ost_optax.to_optax(ADAM[0], params)
    first, _ = step(params, opt_state)
    updates, _ = plain.update(structural_grads(params, x), plain.init(params), params)
    np.testing.assert_array_equal(
        first["enc"]["w"], optax.apply_updates(params, updates)["enc"]["w"]
    )
    for lr in (2**-7, 2**-5, 2**-9):
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        ref_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        params, opt_state = step(params, opt_state)
        ref, ref_state = ref_step(ref, ref_state)
        assert_tied(params)
        assert_matches(params, ref)
    assert len(traces) == 1
    # retie finds the bridge's state inside inject_hyperparams' state: one array again.
    assert params["again"][0] is not params["enc"]["w"]
    retied_params = ost.retie(opt_state, params)
    assert retied_params["again"][0] is retied_params["enc"]["w"]
    assert retied_params["dec"]["w"].parent is retied_params["enc"]["w"]
    assert_matches(retied_params, ref)


def test_inject_hyperparams_with_an_optax_schedule_over_the_bridge() -> None:
    schedule = optax.linear_schedule(2**-5, 2**-9, transition_steps=3)
    tx = optax.inject_hyperparams(injected_adam(tied_params()))(learning_rate=schedule)
    ref_tx = optax.inject_hyperparams(optax.adam)(learning_rate=schedule, b1=0.875, b2=1 - 2**-10)
    run_bridge(tx, ref_tx, steps=STEPS)


def test_inject_hyperparams_over_rules_chosen_by_path() -> None:
    """A function of the path as the rule, its learning rate injected (and scheduled by optax):
    each parameter's rule follows it, as optax's multi_transform does on the de-duplicated
    model."""
    schedule = optax.linear_schedule(2**-5, 2**-9, transition_steps=3)

    def factory(learning_rate: Any) -> Any:
        def rule(path: Any) -> ost.Rule:
            if path[-1] == "b":
                return ost.Momentum(learning_rate, 0.9)
            return ost.Adam(learning_rate, betas=(0.875, 1 - 2**-10))

        return ost_optax.to_optax(rule, tied_params())

    def ref_factory(learning_rate: Any) -> Any:
        adam = optax.adam(learning_rate, b1=0.875, b2=1 - 2**-10)
        sgd = optax.sgd(learning_rate, momentum=0.9)
        return optax.multi_transform({"adam": adam, "sgd": sgd}, {"w": "adam", "b": "sgd"})

    tx = optax.inject_hyperparams(factory)(learning_rate=schedule)
    run_bridge(tx, optax.inject_hyperparams(ref_factory)(learning_rate=schedule), steps=STEPS)


def test_a_rule_of_another_structure_at_update_is_refused() -> None:
    """A transformation built anew at a step (as inject_hyperparams builds it) must build the
    rule its state was set up with."""
    params = tied_params()
    made = ost_optax.to_optax(ost.Adam(jnp.asarray(0.1)), params)
    opt_state = made.init(params)
    before = jax.tree_util.tree_leaves(opt_state)
    other = ost_optax.to_optax(ost.AMSGrad(jnp.asarray(0.1)), params)
    g = structural_grads(params, draw(6, 4))
    with pytest.raises(TypeError, match=r"AMSGrad.*set up for Adam of another structure"):
        other.update(g, opt_state, params)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(opt_state), before, strict=True))


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "init"])
def test_map_params_places_the_moments_on_a_mesh(with_model: bool) -> None:
    """``optax.tree.map_params`` maps the moments (one per unique parameter) and nothing else;
    the state it returns steps on the mesh, equal to optax on the de-duplicated model, and its
    moments stay where they were placed."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))

    def placement(x: Any) -> NamedSharding:
        return NamedSharding(mesh, P("x") if x.shape[0] % 2 == 0 else P())

    rule, adam = ADAM
    params = tied_params()
    tx = ost_optax.to_optax(rule, params if with_model else None)
    opt_state = tx.init(params)
    seen: list[tuple[int, ...]] = []

    def place(x: jax.Array) -> jax.Array:
        seen.append(tuple(x.shape))
        return jax.device_put(x, placement(x))

    placed = optax.tree.map_params(tx, place, opt_state)
    assert sorted(seen) == [(3,), (3,), (4, 3), (4, 3)]  # mu and nu of the weight and the bias
    for k in range(2):
        for name in ("mu", "nu"):
            moment = getattr(placed.states[k], name)
            assert moment.sharding == placement(moment)
        assert placed.states[k].count is opt_state.states[k].count
    assert placed.step is opt_state.step
    assert placed.plan == opt_state.plan
    for a, b in zip(
        jax.tree_util.tree_leaves((placed.hyper, placed.clocks)),
        jax.tree_util.tree_leaves((opt_state.hyper, opt_state.clocks)),
        strict=True,
    ):
        assert a is b

    x = draw(6, 4)
    params = jax.tree_util.tree_map(lambda p: jax.device_put(p, placement(p)), params)

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        updates, opt_state = tx.update(structural_grads(params, x), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    ref = deduplicated(params)
    ref_state = adam.init(ref)
    for _ in range(STEPS):
        params, placed = step(params, placed)
        updates, ref_state = adam.update(dedup_grads(ref, x), ref_state, ref)
        ref = optax.apply_updates(ref, updates)
        assert_matches(params, ref)
    assert placed.states[0].mu.sharding == placement(placed.states[0].mu)


def test_numbers_are_the_states_and_adjust_changes_them() -> None:
    """By hand: a learning rate given as a number is copied into the state, where adjust changes
    it; the transformation does not write it back (only JAX arrays are the transformation's)."""
    w = jnp.asarray([1.0, 2.0])
    params = {"a": w, "b": w}
    tx = ost_optax.to_optax(ost.Descent(0.5))
    opt_state = ost.adjust(tx.init(params), lr=0.25)
    grads = {"a": jnp.asarray([1.0, 1.0]), "b": jnp.asarray([3.0, -1.0])}
    updates, _ = tx.update(grads, opt_state, params)
    np.testing.assert_array_equal(updates["a"], [-1.0, 0.0])  # -0.25 * (g_a + g_b)
    np.testing.assert_array_equal(updates["b"], [-1.0, 0.0])


def test_an_array_hyperparameter_made_a_schedule_in_the_state_is_refused() -> None:
    """A learning rate given to the rule as a JAX array is the transformation's; a schedule put
    in its place in the state by adjust cannot be overwritten by it, and is refused."""
    params = tied_params()
    tx = ost_optax.to_optax(ost.Adam(jnp.asarray(0.1, jnp.float32)), params)
    opt_state = ost.adjust(tx.init(params), lr=ost.schedules.linear(0.1, 0.0, 4))
    before = jax.tree_util.tree_leaves(opt_state)
    g = structural_grads(params, draw(6, 4))
    with pytest.raises(TypeError, match=r"gives as a JAX array is a schedule in its state"):
        tx.update(g, opt_state, params)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(opt_state), before, strict=True))


WRAPPED = {
    "inject_hyperparams": lambda model: optax.inject_hyperparams(injected_adam(model))(
        learning_rate=2**-7
    ),
    "MultiSteps": lambda model: optax.MultiSteps(ost_optax.to_optax(ADAM[0], model), 2),
    "apply_if_finite": lambda model: optax.apply_if_finite(ost_optax.to_optax(ADAM[0], model), 2),
    "chain": lambda model: optax.chain(optax.scale(1.0), ost_optax.to_optax(ADAM[0], model)),
}


@pytest.mark.parametrize("name", list(WRAPPED))
def test_map_params_through_optax_wrappers_of_the_bridge(name: str) -> None:
    """optax's wrappers ask the bridge for its skeleton in their own: the bridge's moments are
    mapped (beside the wrapper's own trees of the parameters), and the state still steps."""
    params = tied_params()
    tx = WRAPPED[name](params)
    opt_state = tx.init(params)
    seen: list[tuple[int, ...]] = []
    mapped = optax.tree.map_params(tx, lambda v: seen.append(tuple(v.shape)) or v + 0, opt_state)
    moments = [(3,), (3,), (4, 3), (4, 3)]  # the bridge's: mu and nu of the weight and the bias
    # MultiSteps also keeps its accumulated gradient, one per position (a Transpose: its parent)
    extra = [(3,), (4, 3), (4, 3), (4, 3)] if name == "MultiSteps" else []
    assert sorted(seen) == sorted(moments + extra)
    g = structural_grads(params, draw(6, 4))
    ours, _ = tx.update(g, mapped, params)
    theirs, _ = tx.update(g, opt_state, params)
    for a, b in zip(
        jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_map_params_before_any_init_needs_the_model() -> None:
    tx = ost_optax.to_optax(ost.Adam(0.1))
    with pytest.raises(TypeError, match=r"map_params needs the structure.*to_optax\(rule, model\)"):
        optax.tree.map_params(tx, lambda v: v, ost.setup(ost.Adam(0.1), tied_params()))


def test_a_bridged_transformation_can_only_end_a_chain():
    """optax's update is added to the parameter; the rule after it in a chain would take it as a
    gradient and subtract it: a clip bridged before Descent would climb the gradient."""
    clip = ost_optax.from_optax(optax.clip_by_global_norm(1.0))
    with pytest.raises(TypeError, match=r"argument 0\): OptaxRule gives a whole update"):
        ost.OptimiserChain(clip, ost.Descent(1.0))
    with pytest.raises(TypeError, match=r"argument 0\): SkipNonFinite\(OptaxRule\)"):
        ost.OptimiserChain(ost.SkipNonFinite(clip), ost.Descent(1.0))
    # at the end of a chain it is the update, as in optax
    model = {"w": jnp.zeros(2)}
    state = ost.setup(
        ost.OptimiserChain(ost.ClipGrad(10.0), ost_optax.from_optax(optax.sgd(1.0))), model
    )
    _, new = ost.update(state, model, {"w": jnp.asarray([3.0, 4.0])})
    np.testing.assert_allclose(new["w"], [-3.0, -4.0])
