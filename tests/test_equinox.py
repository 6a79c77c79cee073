"""Equinox models with tied weights: one layer in two fields (the case of Equinox's FAQ), one array
in two fields, ``eqx.nn.Shared``, and leaves that are not trained; eagerly and inside
``eqx.filter_jit``. The reference is optax on the de-duplicated model with the tied weight's
gradients summed by hand."""

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost

RNG = np.random.default_rng(3)
STEPS = 3
# optstate's compiled step and the reference's optax step are two programs that XLA may fuse
# differently, rounding a float32 result differently by one ulp; over STEPS steps that is at most
# STEPS ulps of the largest parameter.
ULPS = STEPS * float(np.finfo(np.float32).eps)
# Hyper-parameters exact in float32, so that optstate's Adam and optax's round the same constants
# (docs/rules.md: otherwise 1 - beta2 is rounded differently).
RULE = ost.Adam(2**-5, betas=(0.875, 1 - 2**-10))
OPTAX = optax.adam(2**-5, b1=0.875, b2=1 - 2**-10)


@pytest.fixture(autouse=True, scope="module")
def standard_promotion() -> Iterator[None]:
    # optax is user code written for JAX's default dtype promotion: optax.adam computes
    # ``b1 ** count`` (a Python float to an int32 power), which conftest.py's strict promotion
    # rejects. Rank promotion stays "raise".
    with jax.numpy_dtype_promotion("standard"):
        yield


def linear(n_in: int, n_out: int) -> eqx.nn.Linear:
    shell = eqx.filter_eval_shape(eqx.nn.Linear, n_in, n_out, key=jax.random.key(0))
    w = jnp.asarray(RNG.normal(size=(n_out, n_in)).astype(np.float32) * n_in**-0.5)
    b = jnp.asarray(RNG.normal(size=n_out).astype(np.float32) * 0.1)
    return eqx.tree_at(lambda layer: (layer.weight, layer.bias), shell, (w, b))


class Twice(eqx.Module):
    """One ``eqx.nn.Linear`` in the fields ``block`` and ``again``, a function and a flag as
    leaves that are not arrays."""

    inp: eqx.nn.Linear
    block: eqx.nn.Linear
    again: eqx.nn.Linear
    activation: Callable[[jax.Array], jax.Array]
    residual: bool

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.inp(x))
        h = h + self.activation(self.block(h)) if self.residual else self.block(h)
        return self.again(h)


def twice() -> Twice:
    block = linear(3, 3)
    return Twice(linear(2, 3), block, block, jax.nn.tanh, True)


def loss(model: Any, x: jax.Array) -> jax.Array:
    return jnp.mean((jax.vmap(model)(x) - 0.5) ** 2)


# Compiled once for the tests that step eagerly (eager differentiation would compile every
# operation on its own); ``ost.update`` is then called outside any jit.
value_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss))
grad = eqx.filter_jit(eqx.filter_grad(loss))


def deduplicated(model: Twice) -> dict[str, Any]:
    return {"inp": model.inp, "block": model.block}


def summed(grads: Twice) -> dict[str, Any]:
    """The de-duplicated model's gradient: the layer's two gradients summed by hand."""
    block = jax.tree_util.tree_map(lambda a, b: a + b, grads.block, grads.again)
    return {"inp": grads.inp, "block": block}


def reference_run(model: Twice, x: jax.Array, steps: int) -> dict[str, Any]:
    """optax on the de-duplicated parameters, fed the tied model's summed gradient."""

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        full = Twice(params["inp"], params["block"], params["block"], jax.nn.tanh, True)
        grads = eqx.filter_grad(loss)(full, x)
        updates, opt_state = OPTAX.update(summed(grads), opt_state, params)
        return eqx.apply_updates(params, updates), opt_state

    params = deduplicated(model)
    opt_state = OPTAX.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state)
    return params


def assert_matches(model: Twice, ref: dict[str, Any]) -> None:
    ours = jax.tree_util.tree_leaves(deduplicated(model))
    theirs = jax.tree_util.tree_leaves(ref)
    scale = max(float(jnp.max(jnp.abs(a))) for a in theirs)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=ULPS * scale)


@pytest.fixture(scope="module")
def data() -> jax.Array:
    return jnp.asarray(RNG.normal(size=(8, 2)).astype(np.float32))


@pytest.fixture(scope="module")
def reference(data: jax.Array) -> tuple[Twice, dict[str, Any]]:
    model = twice()
    return model, reference_run(model, data, STEPS)


def test_one_layer_in_two_fields_trains_as_one(
    data: jax.Array, reference: tuple[Twice, dict[str, Any]]
) -> None:
    model, ref = reference
    state = ost.setup(RULE, model)
    assert len(state.plan.params) == 4
    assert state.plan.n_ties == 2
    for _ in range(STEPS):
        _value, grads = value_and_grad(model, data)
        assert grads.activation is None
        assert grads.residual is None
        state, model = ost.update(state, model, grads)
    assert_matches(model, ref)
    assert model.again.weight is model.block.weight
    assert model.again.bias is model.block.bias
    assert model.activation is jax.nn.tanh
    assert model.residual is True


def test_inside_filter_jit_the_plan_carries_the_tie(
    data: jax.Array, reference: tuple[Twice, dict[str, Any]]
) -> None:
    model, ref = reference

    @eqx.filter_jit
    def step(state: ost.State, model: Twice, x: jax.Array) -> tuple[ost.State, Twice]:
        return ost.update(state, model, eqx.filter_grad(loss)(model, x))

    state = ost.setup(RULE, model)
    for _ in range(STEPS):
        state, model = step(state, model, data)
        # filter_jit returns one array per field: equal copies, not one object
        assert model.again.weight is not model.block.weight
        np.testing.assert_array_equal(model.again.weight, model.block.weight)
        np.testing.assert_array_equal(model.again.bias, model.block.bias)
    assert_matches(model, ref)
    model = ost.retie(state, model)
    assert model.again.weight is model.block.weight
    assert model.again.bias is model.block.bias


def test_optax_per_position_lets_the_copies_drift(data: jax.Array) -> None:
    """Equinox's FAQ case, with optax itself: Adam per leaf updates each copy on its own."""

    @eqx.filter_jit
    def step(model: Twice, opt_state: Any) -> tuple[Twice, Any]:  # the usual Equinox loop
        grads = eqx.filter_grad(loss)(model, data)
        updates, opt_state = OPTAX.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state

    model = twice()
    opt_state = OPTAX.init(eqx.filter(model, eqx.is_array))
    for _ in range(2):
        model, opt_state = step(model, opt_state)
    assert float(jnp.max(jnp.abs(model.again.weight - model.block.weight))) > 1e-3


class TiedEmbedding(eqx.Module):
    """One array in two fields: the embedding, and the output projection read transposed."""

    embed: jax.Array
    unembed: jax.Array
    mix: jax.Array

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.tanh(self.embed[ids] @ self.mix) @ self.unembed.T


def test_one_array_in_two_fields() -> None:
    e = jnp.asarray(RNG.normal(size=(5, 3)).astype(np.float32))
    m = jnp.asarray(RNG.normal(size=(3, 3)).astype(np.float32))
    ids = jnp.asarray([0, 3, 4, 3])

    def lm_loss(model: TiedEmbedding) -> jax.Array:
        return jnp.mean(jax.nn.logsumexp(model(ids), axis=-1) - model(ids)[:, 1])

    rule, tx = ost.Momentum(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9)
    model = TiedEmbedding(e, e, m)
    state = ost.setup(rule, model)
    step = eqx.filter_jit(lambda s, mod: ost.update(s, mod, eqx.filter_grad(lm_loss)(mod)))

    @jax.jit
    def ref_step(ref: Any, ref_state: Any) -> tuple[Any, Any]:
        g = eqx.filter_grad(lm_loss)(TiedEmbedding(ref["e"], ref["e"], ref["m"]))
        updates, ref_state = tx.update({"e": g.embed + g.unembed, "m": g.mix}, ref_state)
        return optax.apply_updates(ref, updates), ref_state

    ref = {"e": e, "m": m}
    ref_state = tx.init(ref)
    for _ in range(STEPS):
        state, model = step(state, model)
        ref, ref_state = ref_step(ref, ref_state)
    np.testing.assert_array_equal(model.embed, model.unembed)
    scale = float(jnp.max(jnp.abs(ref["e"])))
    np.testing.assert_allclose(model.embed, ref["e"], rtol=0, atol=ULPS * scale)
    np.testing.assert_allclose(model.mix, ref["m"], rtol=0, atol=ULPS * scale)
    model = ost.retie(state, model)
    assert model.unembed is model.embed


def test_shared_modules_work() -> None:
    """``eqx.nn.Shared`` holds the tied weight once: optstate and optax agree on it."""
    embedding = eqx.filter_eval_shape(eqx.nn.Embedding, 5, 3, key=jax.random.key(0))
    weight = jnp.asarray(RNG.normal(size=(5, 3)).astype(np.float32))
    embedding = eqx.tree_at(lambda emb: emb.weight, embedding, weight)
    head = eqx.filter_eval_shape(eqx.nn.Linear, 3, 5, use_bias=False, key=jax.random.key(0))
    head = eqx.tree_at(lambda h: h.weight, head, jnp.zeros((5, 3)))

    def where(pair: Any) -> Any:
        return pair[1].weight

    def get(pair: Any) -> Any:
        return pair[0].weight

    model = eqx.nn.Shared((embedding, head), where, get)
    ids = jnp.asarray([1, 2, 4])

    def lm_loss(shared: eqx.nn.Shared) -> jax.Array:
        emb, out = shared()
        logits = jax.vmap(out)(jnp.tanh(jax.vmap(emb)(ids)))
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])

    @eqx.filter_jit
    def optstate_step(state: ost.State, model: eqx.nn.Shared) -> Any:
        return ost.update(state, model, eqx.filter_grad(lm_loss)(model))

    @eqx.filter_jit
    def optax_step(opt_state: Any, model: eqx.nn.Shared) -> Any:
        grads = eqx.filter_grad(lm_loss)(model)
        updates, opt_state = OPTAX.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return opt_state, eqx.apply_updates(model, updates)

    state = ost.setup(RULE, model)
    assert len(state.plan.params) == 1  # the head's weight is not a leaf of a Shared model
    assert state.plan.n_ties == 0  # Shared de-duplicated it: optstate agrees with optax
    opt_state = OPTAX.init(eqx.filter(model, eqx.is_array))
    ours, theirs = model, model
    for _ in range(STEPS):
        state, ours = optstate_step(state, ours)
        opt_state, theirs = optax_step(opt_state, theirs)
    emb, out = ours()
    assert out.weight is emb.weight
    scale = float(jnp.max(jnp.abs(theirs()[0].weight)))
    np.testing.assert_allclose(emb.weight, theirs()[0].weight, rtol=0, atol=ULPS * scale)
    assert not np.allclose(emb.weight, weight)


class WithBuffer(eqx.Module):
    """A float array that is not to be trained (a fixed frequency table)."""

    layer: eqx.nn.Linear
    freqs: jax.Array

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.layer(jnp.sin(x * self.freqs))


def test_untrained_float_arrays_are_left_out() -> None:
    model = WithBuffer(linear(2, 2), jnp.asarray([1.0, 2.0]))
    x = jnp.asarray(RNG.normal(size=(4, 2)).astype(np.float32))
    grads = grad(model, x)
    assert grads.freqs is not None  # filter_grad differentiates every float array

    # 1. A rule of None, chosen by path.
    state = ost.setup(lambda path: None if path[-1] == "freqs" else ost.Descent(0.5), model)
    assert len(state.plan.params) == 3
    assert state.plan.param_rules[-1] == -1
    _, new = ost.update(state, model, grads)
    assert new.freqs is model.freqs
    np.testing.assert_allclose(new.layer.weight, model.layer.weight - 0.5 * grads.layer.weight)

    # 2. eqx.partition: optstate sees only the trained part.
    spec = eqx.tree_at(lambda m: m.freqs, jax.tree_util.tree_map(eqx.is_array, model), False)
    params, static = eqx.partition(model, spec)
    state = ost.setup(ost.Descent(0.5), params)
    assert len(state.plan.params) == 2
    trained_grads, _ = eqx.partition(grads, spec)  # the gradient of the trained part
    _, params = ost.update(state, params, trained_grads)
    new2 = eqx.combine(params, static)
    assert new2.freqs is model.freqs
    np.testing.assert_array_equal(new2.layer.weight, new.layer.weight)


# -- the example ---------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "equinox_tied.py"
EXAMPLE_STEPS = 10


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("equinox_tied", EXAMPLE)
    assert spec is not None, EXAMPLE
    assert spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    # Equinox modules are dataclasses, which look their module up in sys.modules.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_example_trains_keeps_the_tie_and_matches_its_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example()
    assert capsys.readouterr().out == ""  # importing it runs nothing
    f = example.main(["--steps", str(EXAMPLE_STEPS), "--quiet"])
    assert capsys.readouterr().out == ""  # --quiet
    assert f["optstate_train_loss"] < 0.5 * f["optstate_initial_loss"]
    assert f["optstate_tie_drift"] == 0.0
    assert f["optstate_one_object_after_jit"] is False
    assert f["optstate_one_object_after_retie"] is True
    assert f["optax_tie_drift"] > 1e-2  # the FAQ's drift
    # optstate's Adam rounds 1 - beta2 in float32, optax in float64 (docs/rules.md): a step
    # differs by about 6e-6 relative, so after EXAMPLE_STEPS steps the parameters may differ by
    # EXAMPLE_STEPS times that, relative to the largest parameter. Still four orders of
    # magnitude below the per-position drift.
    assert f["max_rel_diff_to_reference"] < EXAMPLE_STEPS * 6e-6
    assert f["max_diff_to_reference"] < 1e-3 * f["optax_tie_drift"]
    assert f["optstate_train_loss"] == pytest.approx(f["reference_train_loss"], rel=1e-4)
