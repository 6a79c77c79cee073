"""optax's own optimiser tests, run on optstate's rules through ``to_optax``.

The installed optax's ``AliasTest`` (``optax/_src/alias_test.py``) runs every optimiser of one
list through the same properties: it converges on a parabola and on Rosenbrock's function in
float32 and complex64 (after a no-op ``optax.tree.map_params`` over its state), does not recompile
on its second step, accepts extra keyword arguments, equals itself wrapped in
``optax.inject_hyperparams``, returns updates of the gradients' dtype, keeps its state's shapes
and dtypes under ``jax.lax.cond``, and works inside ``optax.MultiSteps``. Here each optax alias
that optstate has a rule for is replaced by a factory with the alias's own signature and defaults
that returns ``to_optax(<the optstate rule>)``; the other aliases' tests are not collected, so
optax's own code never runs in their place.

The factories translate optax's arguments into the rule's. An argument that has no counterpart
in the rule (``eps_root`` of ``optax.adam``), or that the rule takes as an option fixed when it is
made rather than as a hyper-parameter (``initial_accumulator_value`` of ``optax.adagrad``), has
its default wrapped in ``Fixed``: ``inject_hyperparams`` injects numbers only, so it leaves that
argument out of its state, as its ``static_args`` would. A value the rule cannot represent is
refused with our error. ``AliasTest.test_explicit_dtype`` is not selected: it reads optax's
names for the fields of optax's own states (``trace``, ``mu``).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import unittest
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import alias_test  # the module only: its classes would be collected as ours

import optstate as ost
from optstate.interop import optax as ost_optax


@pytest.fixture(autouse=True, scope="module")
def standard_promotion() -> Iterator[None]:
    # optax and its tests are written for JAX's default promotion (conftest.py makes it strict).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


class Fixed:
    """The default of an argument that the optstate rule takes as a fixed option or not at all:
    not a number, so ``inject_hyperparams`` passes it through instead of injecting it."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"Fixed({self.value!r})"


def fixed(alias: str, name: str, value: Any) -> Any:
    """The number behind a ``Fixed`` default, or a number given explicitly."""
    if isinstance(value, Fixed):
        return value.value
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"optax.{alias}'s {name} is an option of the optstate rule, fixed when the rule is "
            "made, so it cannot be a traced value: give it to inject_hyperparams in static_args"
        )
    return value


def only(alias: str, name: str, value: Any, supported: Any) -> None:
    """Refuse a value of an argument that the optstate rule has no counterpart for."""
    value = fixed(alias, name, value)
    if value is not supported and value != supported:
        raise ValueError(
            f"the optstate rule standing for optax.{alias} has no counterpart for "
            f"{name}={value!r} (only {supported!r})"
        )


FACTORIES: dict[str, Callable[..., Any]] = {}


def substitute(alias: str, fixed_args: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """Register ``build`` (optax's arguments -> an optstate rule) as the stand-in for
    ``optax.<alias>``: a factory with the alias's signature and defaults (those of
    ``fixed_args`` wrapped in ``Fixed``) returning ``to_optax(build(...))``."""
    original = inspect.signature(getattr(optax, alias))
    signature = original.replace(
        parameters=[
            p.replace(default=Fixed(p.default)) if p.name in fixed_args else p
            for p in original.parameters.values()
        ]
    )

    def decorate(build: Callable[..., ost.Rule]) -> Callable[..., ost.Rule]:
        def factory(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return ost_optax.to_optax(build(**bound.arguments))

        factory.__signature__ = signature  # type: ignore[attr-defined]
        factory.__name__ = alias
        FACTORIES[alias] = factory
        return build

    return decorate


def no_mask(alias: str, name: str, mask: Any, whole: Any = None) -> None:
    if mask is not whole:
        raise ValueError(
            f"optax.{alias}'s {name} chooses parameters by a tree; in optstate a choice of "
            "parameters is a choice of rules: give setup (or to_optax) a tree of rules or a "
            "function of the path"
        )


# -- the substitutions, alias by alias ---------------------------------------------------------


@substitute("adabelief")
def _adabelief(learning_rate, b1, b2, eps, eps_root, nesterov):
    return ost.AdaBelief(learning_rate, (b1, b2), eps, eps_root, nesterov=nesterov)


@substitute("adadelta")
def _adadelta(learning_rate, rho, eps, weight_decay, weight_decay_mask):
    no_mask("adadelta", "weight_decay_mask", weight_decay_mask)
    # optax's learning_rate=None skips its scaling, and with it the flip of sign that makes the
    # update a descent: optax.adadelta() ascends. The rule descends with Zeiler's step (lr 1).
    lr = 1.0 if learning_rate is None else learning_rate
    return ost.OptimiserChain(ost.WeightDecay(weight_decay), ost.AdaDelta(lr, rho, eps))


@substitute("adafactor", fixed_args=("min_dim_size_to_factor", "decay_offset"))
def _adafactor(
    learning_rate,
    min_dim_size_to_factor,
    decay_rate,
    decay_offset,
    multiply_by_parameter_scale,
    clipping_threshold,
    momentum,
    dtype_momentum,
    weight_decay_rate,
    eps,
    factored,
    weight_decay_mask,
):
    del dtype_momentum  # only used with a momentum, which is refused
    only("adafactor", "decay_offset", decay_offset, 0)
    only("adafactor", "multiply_by_parameter_scale", multiply_by_parameter_scale, True)
    only("adafactor", "momentum", momentum, None)
    no_mask("adafactor", "weight_decay_mask", weight_decay_mask)
    lr = 1.0 if learning_rate is None else learning_rate  # None: no scaling (optax's 1)
    return ost.Adafactor(
        lr,
        beta2_decay=-decay_rate,
        # optax adds eps to g**2; the rule bounds g**2 from below by eps1**2 instead.
        eps=(eps**0.5 if isinstance(eps, jax.Array) else math.sqrt(eps), 1e-3),
        d=math.inf if clipping_threshold is None else clipping_threshold,
        weight_decay=0.0 if weight_decay_rate is None else weight_decay_rate / lr,
        relative_step=False,
        factor_axes="largest",
        min_dim_size_to_factor=(
            fixed("adafactor", "min_dim_size_to_factor", min_dim_size_to_factor)
            if factored
            else sys.maxsize
        ),
    )


@substitute("adagrad", fixed_args=("initial_accumulator_value",))
def _adagrad(learning_rate, initial_accumulator_value, eps):
    initial = fixed("adagrad", "initial_accumulator_value", initial_accumulator_value)
    return ost.AdaGrad(learning_rate, 0.0, eps, initial_accumulator=initial, eps_in_sqrt=True)


def _adam_family(alias, learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov):
    only(alias, "eps_root", eps_root, 0.0)
    if nesterov:  # optax.nadam is optax.adam(nesterov=True)
        return ost.NAdam(learning_rate, (b1, b2), eps, momentum_schedule=False, mu_dtype=mu_dtype)
    return ost.Adam(learning_rate, (b1, b2), eps, mu_dtype=mu_dtype)


@substitute("adam", fixed_args=("eps_root",))
def _adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov):
    return _adam_family("adam", learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov)


@substitute("nadam", fixed_args=("eps_root",))
def _nadam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov):
    return _adam_family("nadam", learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov)


@substitute("adamax")
def _adamax(learning_rate, b1, b2, eps):
    return ost.AdaMax(learning_rate, (b1, b2), eps)


@substitute("adamw", fixed_args=("eps_root",))
def _adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov):
    only("adamw", "eps_root", eps_root, 0.0)
    only("adamw", "nesterov", nesterov, False)
    no_mask("adamw", "mask", mask)
    return ost.AdamW(learning_rate, (b1, b2), eps, weight_decay, mu_dtype=mu_dtype)


@substitute("amsgrad", fixed_args=("eps_root",))
def _amsgrad(
    learning_rate, b1, b2, eps, eps_root, mu_dtype, bias_correction_mu, bias_correction_nu
):
    only("amsgrad", "eps_root", eps_root, 0.0)
    only("amsgrad", "bias_correction_mu", bias_correction_mu, True)
    only("amsgrad", "bias_correction_nu", bias_correction_nu, True)
    return ost.AMSGrad(learning_rate, (b1, b2), eps, correct_before_max=True, mu_dtype=mu_dtype)


@substitute("lamb")
def _lamb(learning_rate, b1, b2, eps, eps_root, weight_decay, mask):
    no_mask("lamb", "mask", mask)
    return ost.Lamb(learning_rate, (b1, b2), eps, weight_decay, eps_root)


@substitute("lars")
def _lars(
    learning_rate,
    weight_decay,
    weight_decay_mask,
    trust_coefficient,
    eps,
    trust_ratio_mask,
    momentum,
    nesterov,
):
    no_mask("lars", "weight_decay_mask", weight_decay_mask, True)
    no_mask("lars", "trust_ratio_mask", trust_ratio_mask, True)
    return ost.Lars(
        learning_rate, momentum, weight_decay, trust_coefficient, eps, nesterov=nesterov
    )


@substitute("lion")
def _lion(learning_rate, b1, b2, mu_dtype, weight_decay, mask):
    no_mask("lion", "mask", mask)
    return ost.Lion(learning_rate, (b1, b2), weight_decay, mu_dtype=mu_dtype)


@substitute("optimistic_adam_v2", fixed_args=("eps_root",))
def _optimistic_adam_v2(learning_rate, alpha, beta, b1, b2, eps, eps_root, mu_dtype, nesterov):
    only("optimistic_adam_v2", "eps_root", eps_root, 0.0)
    return ost.OAdam(
        learning_rate, (b1, b2), eps, alpha, beta, nesterov=nesterov, mu_dtype=mu_dtype
    )


@substitute("radam", fixed_args=("eps_root", "threshold"))
def _radam(learning_rate, b1, b2, eps, eps_root, threshold, nesterov):
    only("radam", "eps_root", eps_root, 0.0)
    only("radam", "threshold", threshold, 5.0)
    only("radam", "nesterov", nesterov, False)
    return ost.RAdam(learning_rate, (b1, b2), eps, correct_before_eps=True)


@substitute("rmsprop", fixed_args=("initial_scale",))
def _rmsprop(
    learning_rate,
    decay,
    eps,
    initial_scale,
    eps_in_sqrt,
    centered,
    momentum,
    nesterov,
    bias_correction,
):
    only("rmsprop", "nesterov", nesterov, False)
    only("rmsprop", "bias_correction", bias_correction, False)
    return ost.RMSProp(
        learning_rate,
        decay,
        eps,
        0.0 if momentum is None else momentum,
        centred=centered,
        eps_in_sqrt=eps_in_sqrt,
        initial_accumulator=fixed("rmsprop", "initial_scale", initial_scale),
    )


@substitute("rprop")
def _rprop(learning_rate, eta_minus, eta_plus, min_step_size, max_step_size):
    return ost.Rprop(learning_rate, (eta_minus, eta_plus), (min_step_size, max_step_size))


@substitute("sgd")
def _sgd(learning_rate, momentum, nesterov, accumulator_dtype):
    only("sgd", "accumulator_dtype", accumulator_dtype, None)
    if momentum is None:
        return ost.Descent(learning_rate)
    if nesterov:
        return ost.Nesterov(learning_rate, momentum)
    return ost.Momentum(learning_rate, momentum)


@substitute("signum")
def _signum(learning_rate, beta, accumulator_dtype):
    return ost.Signum(learning_rate, beta, mu_dtype=accumulator_dtype)


@substitute("yogi")
def _yogi(learning_rate, b1, b2, eps):
    return ost.Yogi(learning_rate, (b1, b2), eps)


# -- which of AliasTest's tests run, and which are skipped with a reason ----------------------

SELECTED = (
    "test_optimization",
    "test_optimizers_accept_extra_args",
    "test_optimizers_can_be_wrapped_in_inject_hyperparams",
    "test_preserve_dtype",
    "test_state_shape_dtype_shard_stability",
    "test_gradient_accumulation",
)


def _dtype_name(dtype: Any) -> str:
    return str(np.dtype(dtype))  # without JAX, which warns of float64 while x64 is off


def _complex(params: dict[str, Any]) -> bool:
    return _dtype_name(params.get("dtype", "float32")).startswith("complex")


# (alias, test, condition on the test's parameters) -> the reason, one line each.
SKIPS: list[tuple[str, str, Callable[[dict[str, Any]], bool], str]] = [
    (
        "adafactor",
        "test_optimization",
        _complex,
        "optstate's Adafactor refuses complex parameters, as torch.optim.Adafactor does",
    ),
    (
        "adafactor",
        "test_state_shape_dtype_shard_stability",
        _complex,
        "optstate's Adafactor refuses complex parameters, as torch.optim.Adafactor does",
    ),
]


def _described(params: dict[str, Any]) -> str:
    parts = [params["opt_name"]]
    parts += [f"{k}={v}" for k, v in params.get("opt_kwargs", {}).items()]
    if "target" in params:
        parts.append(params["target"].__name__.removeprefix("_setup_"))
    if "dtype" in params:
        parts.append(_dtype_name(params["dtype"]))
    return "-".join(parts)


# What runs by default: each alias's first entry in AliasTest's list, with its extra arguments,
# inject_hyperparams and the float32 parabola (whose test also maps the state with map_params).
# The rest (Rosenbrock, complex64, the dtype-preservation, state-stability and accumulation
# tests, the second entries of adadelta, adafactor and rmsprop) is marked slow: the suite's time
# budget (all of it takes about 5 minutes on 2 cores; ``python -m pytest -m slow`` runs it).
FIRST = {
    alias: next(
        e["opt_kwargs"] for e in alias_test._OPTIMIZERS_UNDER_TEST if e["opt_name"] == alias
    )
    for alias in FACTORIES
}
DEFAULT = (
    "test_optimizers_accept_extra_args",
    "test_optimizers_can_be_wrapped_in_inject_hyperparams",
)


def _by_default(base: str, params: dict[str, Any]) -> bool:
    if params["opt_kwargs"] != FIRST[params["opt_name"]]:
        return False
    if base == "test_optimization":
        return params["target"] is alias_test._setup_parabola and not _complex(params)
    return base in DEFAULT


def _ours(test: Callable[..., Any], skip: str | None, slow: bool) -> Callable[..., Any]:
    """AliasTest's test under our marks (a new function: optax's own is left as it is)."""

    @functools.wraps(test)
    def run(self: Any) -> None:
        if skip is not None:
            raise unittest.SkipTest(skip)
        test(self)

    return pytest.mark.slow(run) if slow else run


def _get_opt(self: Any, opt_name: str) -> Callable[..., Any]:
    """AliasTest's way to find an alias by name, here answering with the substitutes."""
    del self
    return FACTORIES[opt_name]


class TestOptstateRulesInOptaxAliasTest(alias_test.AliasTest):
    """AliasTest with optstate's rules in place of optax's aliases (see the module docstring)."""

    def setUp(self) -> None:
        super().setUp()
        original = alias_test._get_opt
        alias_test._get_opt = _get_opt
        self.addCleanup(setattr, alias_test, "_get_opt", original)


def _select(cls: type) -> None:
    """Keep the selected tests of the aliases with a substitute, under readable names."""
    for name, test in list(vars(alias_test.AliasTest).items()):
        if not name.startswith("test_") or not callable(test):
            continue
        setattr(cls, name, None)  # not collected under AliasTest's numbered name
        base = test.__name__
        params = inspect.getclosurevars(test).nonlocals.get("testcase_params")
        if base not in SELECTED or params is None or params["opt_name"] not in FACTORIES:
            continue
        skip = next(
            (
                reason
                for alias, skipped_test, condition, reason in SKIPS
                if alias == params["opt_name"] and skipped_test == base and condition(params)
            ),
            None,
        )
        test = _ours(test, skip, slow=not _by_default(base, params))
        setattr(cls, f"{base}[{_described(params)}]", test)


_select(TestOptstateRulesInOptaxAliasTest)


def test_every_rule_optstate_shares_with_optax_is_substituted() -> None:
    """The 19 aliases named in the issue, each in AliasTest's list."""
    shared = {
        "adabelief", "adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "amsgrad",
        "lamb", "lars", "lion", "nadam", "radam", "rmsprop", "rprop", "sgd", "signum", "yogi",
        "optimistic_adam_v2",
    }  # fmt: skip
    assert set(FACTORIES) == shared
    listed = {entry["opt_name"] for entry in alias_test._OPTIMIZERS_UNDER_TEST}
    assert shared <= listed


TARGET = [[1.0, -1.0, 2.0], [0.5, 3.0, -2.0]]
START = [[0.3, 0.1, -0.2], [1.0, 0.0, 0.5]]
WEIGHTS = [[1.0, 4.0, 0.5], [2.0, 1.0, 3.0]]


def run_optax(tx: Any, steps: int = 3) -> jax.Array:
    params, target, weights = jnp.asarray(START), jnp.asarray(TARGET), jnp.asarray(WEIGHTS)
    opt_state = tx.init(params)
    for _ in range(steps):
        updates, opt_state = tx.update(2 * (params - target) * weights, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("alias", sorted(set(FACTORIES) - {"rprop"}))
def test_each_substitute_steps_as_its_optax_alias(alias: str) -> None:
    """The substitutes take the alias's own values, defaults included (``optax.adamw``'s weight
    decay is 1e-4, where ``ost.AdamW``'s is torch's 1e-2): a few steps of each, at the first
    entry of AliasTest's list, against optax's alias itself."""
    kwargs = FIRST[alias]
    ours, theirs = FACTORIES[alias](**kwargs), getattr(optax, alias)(**kwargs)
    # optstate rounds 1 - beta and such in float32, optax in float64: a step may differ by about
    # 6e-6 of the parameter (docs/rules.md), three steps by three times that.
    expected = run_optax(theirs)
    atol = 3 * 6e-6 * float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(run_optax(ours), expected, rtol=0, atol=atol)


def test_the_rprop_substitute_steps_as_torch_rprop() -> None:
    """optstate's Rprop is torch's by design (its docstring): optax.rprop 0.2.8 applies each
    step one update late. So the rprop substitute, given optax's arguments, is checked against
    ``torch.optim.Rprop`` with the same values, on the same problem."""
    import torch

    kwargs = FIRST["rprop"]
    param = torch.nn.Parameter(torch.tensor(START, dtype=torch.float32))
    opt = torch.optim.Rprop(
        [param],
        lr=kwargs["learning_rate"],
        etas=(kwargs.get("eta_minus", 0.5), kwargs.get("eta_plus", 1.2)),
        step_sizes=(kwargs.get("min_step_size", 1e-6), kwargs.get("max_step_size", 50.0)),
    )
    target, weights = torch.tensor(TARGET), torch.tensor(WEIGHTS)
    for _ in range(3):
        param.grad = 2 * (param.detach() - target) * weights
        opt.step()
    expected = param.detach().numpy()
    ours = run_optax(FACTORIES["rprop"](**kwargs))
    np.testing.assert_allclose(ours, expected, rtol=0, atol=3 * 6e-6 * np.abs(expected).max())
    # and optax's own rprop is not that: the difference the docstring names is real
    assert not np.allclose(run_optax(optax.rprop(**kwargs)), expected, rtol=0, atol=1e-4)
