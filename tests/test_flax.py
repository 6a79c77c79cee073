"""Flax: NNX models with a shared Variable and a layer used twice (through ``nnx.split`` /
``nnx.state`` and ``nnx.merge`` / ``nnx.update``), and linen parameter dicts (``Embed.attend``,
and a dict tied by hand). The reference is optax on the de-duplicated parameters with the tied
weight's gradients summed (by NNX, by autodiff, or by hand for the hand-tied dict)."""

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optstate as ost

RNG = np.random.default_rng(5)
STEPS = 3
# optstate's compiled step and the reference's optax step are two programs that XLA may fuse
# differently, rounding a float32 result differently by one ulp; over STEPS steps that is at most
# STEPS ulps of the largest parameter.
ULPS = STEPS * float(np.finfo(np.float32).eps)
# Hyper-parameters exact in float32, so that optstate's Adam and optax's round the same constants
# (docs/rules.md: otherwise 1 - beta2 is rounded differently).
RULE = ost.Adam(2**-5, betas=(0.875, 1 - 2**-10))
OPTAX = optax.adam(2**-5, b1=0.875, b2=1 - 2**-10)
IDS = jnp.asarray([0, 3, 1, 5, 3])


@pytest.fixture(autouse=True, scope="module")
def standard_promotion() -> Iterator[None]:
    # optax is user code written for JAX's default dtype promotion: optax.adam computes
    # ``b1 ** count`` (a Python float to an int32 power), which conftest.py's strict promotion
    # rejects. Rank promotion stays "raise".
    with jax.numpy_dtype_promotion("standard"):
        yield


def assert_close(ours: Any, theirs: Any) -> None:
    a, b = jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)
    scale = max(float(jnp.max(jnp.abs(x))) for x in b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=ULPS * scale)


# -- NNX -----------------------------------------------------------------------------------


def drawn(key: Any, shape: Any, dtype: Any = jnp.float32) -> jax.Array:
    """An initialiser drawing with NumPy (JAX's random generator would compile for each shape)."""
    del key
    return jnp.asarray(RNG.normal(size=shape) * 0.5, dtype=dtype)


class SharedLM(nnx.Module):
    """A tiny language model: one layer object in two attributes, and the output projection
    being the embedding's own Variable."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(6, 3, embedding_init=drawn, rngs=rngs)
        self.block = nnx.Linear(3, 3, kernel_init=drawn, rngs=rngs)
        self.again = self.block  # one layer, used twice
        self.readout = self.embed.embedding  # one Variable, in two modules

    def __call__(self, ids: jax.Array) -> jax.Array:
        h = self.embed(ids)
        h = h + jnp.tanh(self.block(h))
        h = h + jnp.tanh(self.again(h))
        return h @ self.readout[...].T


def lm_loss(model: Any) -> jax.Array:
    logits = model(IDS)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 2])


def reference_run(params: Any, loss_of_params: Any) -> Any:
    """optax on the de-duplicated parameters NNX gives, with the gradient autodiff sums."""

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        updates, opt_state = OPTAX.update(jax.grad(loss_of_params)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = OPTAX.init(params)
    for _ in range(STEPS):
        params, opt_state = step(params, opt_state)
    return params


class NNXCase:
    """A ``SharedLM``, its split, its loss as a function of its parameters, and the reference
    run from its initial parameters (made once for the NNX tests)."""

    def __init__(self) -> None:
        self.graphdef, self.params, self.rest = nnx.split(SharedLM(nnx.Rngs(0)), nnx.Param, ...)
        self.grad = jax.jit(jax.grad(self.loss))
        self.reference = reference_run(self.params, self.loss)

    def loss(self, params: Any) -> jax.Array:
        return lm_loss(nnx.merge(self.graphdef, params, self.rest))

    def model(self) -> SharedLM:
        """A fresh model with the initial parameters (in new Variables: ``nnx.merge`` puts the
        Variables of the state it is given into the model, and ``nnx.update`` writes them)."""
        fresh = jax.tree_util.tree_map(lambda x: x, (self.params, self.rest))
        return nnx.merge(self.graphdef, *fresh)


@pytest.fixture(scope="module")
def nnx_case() -> NNXCase:
    return NNXCase()


def test_nnx_split_and_merge_in_a_jitted_step(nnx_case: NNXCase) -> None:
    model = nnx_case.model()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree_util.tree_leaves(params)) == 3  # NNX holds the shared ones once

    def loss_of_params(params: Any) -> jax.Array:
        return lm_loss(nnx.merge(graphdef, params, rest))

    @jax.jit
    def step(state: ost.State, params: Any) -> tuple[ost.State, Any]:
        return ost.update(state, params, jax.grad(loss_of_params)(params))

    state = ost.setup(RULE, params)
    assert str(state).endswith("3 parameters, 0 tied)")  # NNX de-duplicated: nothing to correct
    for _ in range(STEPS):
        state, params = step(state, params)
    assert_close(params, nnx_case.reference)
    nnx.update(model, params)
    assert model.again is model.block
    assert model.readout is model.embed.embedding
    np.testing.assert_array_equal(model.readout[...], params["embed"]["embedding"][...])


def test_nnx_state_and_update_eagerly(nnx_case: NNXCase) -> None:
    model = nnx_case.model()
    state = ost.setup(RULE, nnx.state(model, nnx.Param))
    for _ in range(STEPS):
        params = nnx.state(model, nnx.Param)
        state, params = ost.update(state, params, nnx_case.grad(params))  # eager update
        nnx.update(model, params)
    assert_close(nnx.state(model, nnx.Param), nnx_case.reference)
    assert model.again is model.block
    assert model.readout is model.embed.embedding


class TwoVariablesOneArray(nnx.Module):
    """Two Variables holding the same array: NNX sees two parameters, optstate one."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(6, 3, embedding_init=drawn, rngs=rngs)
        self.unembed = nnx.Param(self.embed.embedding[...])

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.tanh(self.embed(ids)) @ self.unembed[...].T


def test_nnx_two_variables_holding_one_array_are_one_parameter() -> None:
    model = TwoVariablesOneArray(nnx.Rngs(2))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = ost.setup(RULE, params)
    assert len(state.plan.params) == 1
    # Differentiated through split and merge, which leave the model's arrays alone: nnx.jit
    # would write the copies its compiled call returns back into the two Variables.
    grad = jax.jit(jax.grad(lambda p: lm_loss(nnx.merge(graphdef, p, rest))))
    ref = {"e": model.embed.embedding[...]}
    opt_state = OPTAX.init(ref)
    for _ in range(STEPS):
        g = grad(nnx.state(model, nnx.Param))
        state, params = ost.update(state, nnx.state(model, nnx.Param), g)
        nnx.update(model, params)
        summed = {"e": g["embed"]["embedding"][...] + g["unembed"][...]}
        updates, opt_state = OPTAX.update(summed, opt_state, ref)
        ref = optax.apply_updates(ref, updates)
    assert model.unembed[...] is model.embed.embedding[...]
    assert_close(model.unembed[...], ref["e"])


class OneVariable(nnx.Module):
    """``TwoVariablesOneArray`` written with the array once: the de-duplicated model."""

    def __init__(self, embedding: jax.Array, rngs: nnx.Rngs) -> None:
        self.embed = nnx.Embed(6, 3, embedding_init=lambda *_: embedding, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.tanh(self.embed(ids)) @ self.embed.embedding[...].T


@pytest.mark.parametrize("jit", [True, False], ids=["nnx.jit", "eager"])
def test_nnx_optimizer_with_to_optax_keeps_a_tie_nnx_does_not_see(jit: bool) -> None:
    """NNX's own optimiser API, ``nnx.Optimizer(model, to_optax(rule), wrt=nnx.Param)``, on two
    Params over one array (two parameters to NNX), against ``nnx.Optimizer`` with optax on the
    model that holds the array once."""
    from optstate.interop import optax as ost_optax

    model = TwoVariablesOneArray(nnx.Rngs(2))
    reference = OneVariable(model.embed.embedding[...], nnx.Rngs(2))
    optimizer = nnx.Optimizer(model, ost_optax.to_optax(RULE), wrt=nnx.Param)
    ref_optimizer = nnx.Optimizer(reference, OPTAX, wrt=nnx.Param)
    assert optimizer.opt_state.plan.n_ties == 1

    def train_step(model: Any, optimizer: nnx.Optimizer) -> None:
        optimizer.update(model, nnx.grad(lm_loss)(model))

    step = nnx.jit(train_step) if jit else train_step
    for _ in range(STEPS):
        step(model, optimizer)
        step(reference, ref_optimizer)
        np.testing.assert_array_equal(model.unembed[...], model.embed.embedding[...])
        assert_close(model.unembed[...], reference.embed.embedding[...])
    assert int(optimizer.step[...]) == STEPS


# -- linen ---------------------------------------------------------------------------------


def drawn_params(module: nn.Module, x: jax.Array) -> Any:
    """A linen parameter dict of ``module`` drawn with NumPy (see ``drawn``)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)
    return jax.tree_util.tree_map(lambda s: drawn(None, s.shape, s.dtype), shapes)


class AttendLM(nn.Module):
    """linen's own tie: the embedding, read back by ``Embed.attend``."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(6, 3)
        return embed.attend(jnp.tanh(nn.Dense(3, name="block")(embed(ids))))


def test_linen_embed_attend() -> None:
    lm = AttendLM()
    params = drawn_params(lm, IDS)

    def loss_of_params(p: Any) -> jax.Array:
        return lm_loss(lambda ids: lm.apply(p, ids))

    ref = reference_run(params, loss_of_params)
    state = ost.setup(RULE, params)
    assert state.plan.n_ties == 0  # attend reads the embedding's one array: nothing to correct
    step = jax.jit(lambda s, p: ost.update(s, p, jax.grad(loss_of_params)(p)))
    for _ in range(STEPS):
        state, params = step(state, params)
    assert_close(params, ref)


class TwoDense(nn.Module):
    """Two Dense layers of one shape; the test ties their kernels by hand in the dict."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(3, name="first")(x))
        return nn.Dense(3, name="second")(h)


@pytest.fixture(scope="module")
def hand_tied() -> dict[str, Any]:
    params = drawn_params(TwoDense(), jnp.ones((1, 3)))
    params["params"]["second"]["kernel"] = params["params"]["first"]["kernel"]  # the tie
    return params


X = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))


def dense_loss(params: Any) -> jax.Array:
    return jnp.mean((TwoDense().apply(params, X) - 0.5) ** 2)


def test_linen_dict_tied_by_hand(hand_tied: dict[str, Any]) -> None:
    params = hand_tied
    state = ost.setup(RULE, params)
    assert len(state.plan.params) == 3  # one kernel, two biases

    @jax.jit
    def ref_step(ref: Any, opt_state: Any) -> tuple[Any, Any]:
        full = {"params": {"first": {"kernel": ref["k"], "bias": ref["b1"]}}}
        full["params"]["second"] = {"kernel": ref["k"], "bias": ref["b2"]}
        g = jax.grad(dense_loss)(full)["params"]
        summed = {
            "k": g["first"]["kernel"] + g["second"]["kernel"],
            "b1": g["first"]["bias"],
            "b2": g["second"]["bias"],
        }
        updates, opt_state = OPTAX.update(summed, opt_state, ref)
        return optax.apply_updates(ref, updates), opt_state

    p = params["params"]
    ref = {"k": p["first"]["kernel"], "b1": p["first"]["bias"], "b2": p["second"]["bias"]}
    opt_state = OPTAX.init(ref)
    step = jax.jit(lambda s, p: ost.update(s, p, jax.grad(dense_loss)(p)))
    for _ in range(STEPS):
        state, params = step(state, params)
        ref, opt_state = ref_step(ref, opt_state)
    p = params["params"]
    np.testing.assert_array_equal(p["first"]["kernel"], p["second"]["kernel"])
    assert_close(
        {"k": p["first"]["kernel"], "b1": p["first"]["bias"], "b2": p["second"]["bias"]}, ref
    )
    params = ost.retie(state, params)
    assert params["params"]["second"]["kernel"] is params["params"]["first"]["kernel"]


def test_linen_dict_with_optax_per_position_drifts(hand_tied: dict[str, Any]) -> None:
    """What the hand-tied dict becomes with optax: two kernels."""

    @jax.jit
    def step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        updates, opt_state = OPTAX.update(jax.grad(dense_loss)(params), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = hand_tied, OPTAX.init(hand_tied)
    for _ in range(2):
        params, opt_state = step(params, opt_state)
    p = params["params"]
    assert float(jnp.max(jnp.abs(p["first"]["kernel"] - p["second"]["kernel"]))) > 1e-3


# -- the example ---------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flax_shared.py"
EXAMPLE_STEPS = 10


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flax_shared", EXAMPLE)
    assert spec is not None, EXAMPLE
    assert spec.loader is not None, EXAMPLE
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (linen modules) look their module up here
    spec.loader.exec_module(module)
    return module


def test_the_example_trains_keeps_the_tie_and_matches_its_reference(
    capsys: pytest.CaptureFixture[str],
) -> None:
    example = load_example()
    assert capsys.readouterr().out == ""  # importing it runs nothing
    f = example.main(["--steps", str(EXAMPLE_STEPS), "--quiet"])
    assert capsys.readouterr().out == ""  # --quiet
    assert f["nnx_train_loss"] < 0.7 * f["nnx_initial_loss"]
    assert f["nnx_shared_after_update"] is True
    assert f["linen_train_loss"] < 0.7 * f["linen_initial_loss"]
    assert f["linen_tie_drift"] == 0.0
    assert f["linen_one_array_after_retie"] is True
    assert f["linen_optax_tie_drift"] > 1e-3
    # optstate's Adam rounds 1 - beta2 in float32, optax in float64 (docs/rules.md): a step
    # differs by about 6e-6 relative, so after EXAMPLE_STEPS steps the parameters may differ by
    # EXAMPLE_STEPS times that, relative to the largest parameter.
    assert f["nnx_max_rel_diff_to_reference"] < EXAMPLE_STEPS * 6e-6
