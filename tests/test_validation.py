"""Hyper-parameters are checked when a rule is made and when ``adjust`` changes them.

The oracle for the ranges is torch.optim, which refuses the same values; every public rule's
declared ranges are also exercised through ``adjust``, which must leave the state unchanged.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import optstate as ost
from optstate.rules._validate import Hyper, declaration

# -- the cases of the issue ----------------------------------------------------------------------

REFUSED = [
    (lambda: ost.Adam(-1.0), ValueError, r"Adam\(lr=\.\.\.\) must be in \[0, inf\), got -1"),
    (
        lambda: ost.Adam(betas=(0.9, 1.5)),
        ValueError,
        r"Adam\(betas=\.\.\.\)\[1\] must be in \[0, 1\)",
    ),
    (lambda: ost.Adam(betas=0.9), TypeError, r"Adam\(betas=\.\.\.\) must be a tuple of 2"),
    (lambda: ost.Adam(None), TypeError, r"Adam\(lr=\.\.\.\) must be a real number or a schedule"),
    (lambda: ost.Adam(eps=-1e-8), ValueError, r"Adam\(eps=\.\.\.\) must be in \[0, inf\)"),
    (lambda: ost.AdamW(weight_decay=-0.1), ValueError, r"AdamW\(weight_decay=\.\.\.\)"),
    (lambda: ost.Momentum(momentum=-0.5), ValueError, r"Momentum\(momentum=\.\.\.\)"),
    (lambda: ost.RMSProp(alpha=1.5), ValueError, r"RMSProp\(alpha=\.\.\.\) must be in \[0, 1\]"),
    (lambda: ost.ClipGlobalNorm(-1.0), ValueError, r"ClipGlobalNorm\(max_norm=\.\.\.\)"),
    (lambda: ost.Lion(mu_dtype=np.complex64), TypeError, r"Lion\(mu_dtype=\.\.\.\) must be a real"),
    (lambda: ost.Adam(0.1, mu_dtype="int32"), TypeError, r"Adam\(mu_dtype=\.\.\.\) must be a real"),
    (
        lambda: ost.Adam(lr=float("nan")),
        ValueError,
        r"Adam\(lr=\.\.\.\) must be in \[0, inf\), got nan",
    ),
    (lambda: ost.Adam(lr=True), TypeError, r"Adam\(lr=\.\.\.\) must be a real number"),
    (lambda: ost.Adam(lr=np.ones(2)), TypeError, r"0-d real array is accepted"),
    (
        lambda: ost.Adam(lr=ost.schedules.linear(1e-3, -1e-3, 10)),
        ValueError,
        r"a value of its schedule",
    ),
    (
        lambda: ost.Rprop(etas=(1.2, 0.5)),
        ValueError,
        r"Rprop\(etas=\.\.\.\)\[0\] must be in \(0, 1\)",
    ),
    (lambda: ost.AccumGrad(0), ValueError, r"AccumGrad\(n=\.\.\.\) must be a positive integer"),
    (lambda: ost.AccumGrad(2.0), TypeError, r"AccumGrad\(n=\.\.\.\) must be a positive integer"),
    (lambda: ost.Adafactor(factor_axes="first"), ValueError, r"Adafactor\(factor_axes=\.\.\.\)"),
    (lambda: ost.Nesterov(lr=-0.1), ValueError, r"Nesterov\(lr=\.\.\.\)"),
]


@pytest.mark.parametrize(("make", "error", "match"), REFUSED)
def test_bad_hyper_parameters_are_refused_when_a_rule_is_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_good_values_are_accepted():
    ost.Adam(0.0, betas=(0.0, 0.0), eps=0.0)
    ost.Adam(jnp.asarray(1e-3))  # a 0-d array
    ost.Adam(np.float32(1e-3), mu_dtype=jnp.bfloat16)
    ost.Adam(mu_dtype=torch.bfloat16)
    ost.Lion(betas=(1.0, 1.0))
    ost.Adafactor(eps=(None, 1e-3))


def test_a_traced_hyper_parameter_is_accepted_and_checked_when_known():
    @jax.jit
    def make(lr):
        return ost.Adam(lr).hyper()["lr"] * 2

    assert float(make(jnp.asarray(0.5))) == 1.0


# -- torch.optim as the oracle --------------------------------------------------------------------

# (our rule, our arguments, torch's optimiser, torch's arguments): each is refused by torch.
TORCH_REFUSES = [
    (ost.Descent, {"lr": -0.1}, torch.optim.SGD, {"lr": -0.1}),
    (ost.Momentum, {"momentum": -0.5}, torch.optim.SGD, {"lr": 0.1, "momentum": -0.5}),
    (ost.Adam, {"lr": -1e-3}, torch.optim.Adam, {"lr": -1e-3}),
    (ost.Adam, {"eps": -1e-8}, torch.optim.Adam, {"eps": -1e-8}),
    (ost.Adam, {"betas": (1.0, 0.999)}, torch.optim.Adam, {"betas": (1.0, 0.999)}),
    (ost.Adam, {"betas": (0.9, -0.1)}, torch.optim.Adam, {"betas": (0.9, -0.1)}),
    (ost.AdamW, {"weight_decay": -0.1}, torch.optim.AdamW, {"weight_decay": -0.1}),
    (ost.RMSProp, {"alpha": -0.1}, torch.optim.RMSprop, {"alpha": -0.1}),
    (ost.RMSProp, {"momentum": -0.1}, torch.optim.RMSprop, {"momentum": -0.1}),
    (ost.RMSProp, {"eps": -1.0}, torch.optim.RMSprop, {"eps": -1.0}),
    (ost.AdaGrad, {"lr_decay": -1.0}, torch.optim.Adagrad, {"lr_decay": -1.0}),
    (
        ost.AdaGrad,
        {"initial_accumulator": -1.0},
        torch.optim.Adagrad,
        {"initial_accumulator_value": -1.0},
    ),
    (ost.AdaDelta, {"rho": 1.5}, torch.optim.Adadelta, {"rho": 1.5}),
    (ost.AdaDelta, {"lr": -1.0}, torch.optim.Adadelta, {"lr": -1.0}),
    (ost.NAdam, {"momentum_decay": -1.0}, torch.optim.NAdam, {"momentum_decay": -1.0}),
    (ost.RAdam, {"betas": (0.9, 1.0)}, torch.optim.RAdam, {"betas": (0.9, 1.0)}),
    (ost.AdaMax, {"eps": -1.0}, torch.optim.Adamax, {"eps": -1.0}),
    (ost.AMSGrad, {"lr": -1.0}, torch.optim.Adam, {"lr": -1.0, "amsgrad": True}),
    (ost.Rprop, {"etas": (0.5, 0.9)}, torch.optim.Rprop, {"etas": (0.5, 0.9)}),
    (ost.Adafactor, {"lr": -1.0}, torch.optim.Adafactor, {"lr": -1.0}),
    (ost.Adafactor, {"beta2_decay": 0.5}, torch.optim.Adafactor, {"beta2_decay": 0.5}),
    (ost.Adafactor, {"d": 0.5}, torch.optim.Adafactor, {"d": 0.5}),
]


@pytest.mark.parametrize(
    ("rule", "ours", "optimiser", "theirs"),
    TORCH_REFUSES,
    ids=[f"{r.__name__}-{next(iter(a))}" for r, a, _, _ in TORCH_REFUSES],
)
def test_what_torch_refuses_is_refused(rule, ours, optimiser, theirs):
    with pytest.raises(ValueError):  # noqa: PT011  (torch's own messages vary)
        optimiser([torch.nn.Parameter(torch.ones(2))], **theirs)
    name = next(iter(ours))
    with pytest.raises(ValueError, match=rf"{rule.__name__}\({name}=\.\.\.\)"):
        rule(**ours)


# -- every public rule, through construction and adjust -------------------------------------------


def public_rules():
    return sorted(
        (v for v in vars(ost).values() if isinstance(v, type) and issubclass(v, ost.Rule)),
        key=lambda c: c.__name__,
    )


def default(cls):
    """A rule of class ``cls`` with its defaults (wrappers around a Descent)."""
    if cls is ost.Rule:
        return None
    if cls is ost.ClipGlobalNorm:
        return cls(1.0)
    if cls is ost.OptimiserChain:
        return cls(ost.Descent(0.1))
    if cls in (ost.SkipNonFinite, ost.MixedPrecision):
        return cls(ost.Descent(0.1))
    return cls()


def model_for(cls):
    """The model the range checks set up: ``Muon`` trains matrices only."""
    if cls is ost.Muon:
        return {"w": np.ones((2, 3)), "v": np.ones((3, 3))}
    return {"w": np.ones((2, 3)), "b": np.zeros(3)}


def outside(declared: Hyper):
    """A value the declaration refuses, or None if it has no bound."""
    if declared.min is not None:
        return declared.min - 0.5
    if declared.above is not None:
        return declared.above - 0.5
    if declared.max is not None:
        return declared.max + 0.5
    if declared.below is not None:
        return declared.below + 0.5
    return None


def bounded_fields():
    cases = []
    for cls in public_rules():
        if default(cls) is None:
            continue
        for field in dataclasses.fields(cls):
            declared = declaration(field)
            if not isinstance(declared, Hyper):
                continue
            each = declared.elements or (declared,)
            bad = next((outside(d) for d in each if outside(d) is not None), None)
            if bad is None:
                continue
            if isinstance(field.default, tuple):
                value = tuple(bad if i == 0 else v for i, v in enumerate(field.default))
                if declared.elements:
                    value = (bad, *field.default[1:])
            else:
                value = bad
            cases.append((cls, field.name, value))
    return cases


CASES = bounded_fields()


def test_every_public_rule_declares_its_ranges():
    """A new public rule with a learning rate joins the checks: its lr has a declared range."""
    covered = {cls for cls, _, _ in CASES}
    for cls in public_rules():
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else ()
        if "lr" in names:
            assert cls in covered, f"{cls.__name__}.lr has no declared range"


@pytest.mark.parametrize(
    ("cls", "name", "value"), CASES, ids=[f"{c.__name__}.{n}" for c, n, _ in CASES]
)
def test_out_of_range_values_are_refused_at_construction_and_by_adjust(cls, name, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({name}=\.\.\.\)"):
        cls(**{name: value}) if cls is not ost.ClipGlobalNorm else cls(value)
    state = ost.setup(default(cls), model_for(cls))
    before = jax.tree_util.tree_map(np.copy, (state.hyper, state.states, state.clocks))
    with pytest.raises(ValueError, match=rf"{cls.__name__}\({name}=\.\.\.\)"):
        ost.adjust(state, **{name: value})
    with pytest.raises(TypeError, match=rf"{cls.__name__}\({name}=\.\.\.\)"):
        ost.adjust(state, **{name: "fast" if not isinstance(value, tuple) else 0.5})
    after = (state.hyper, state.states, state.clocks)
    for a, b in zip(
        jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_adjust_refuses_a_malformed_tuple():
    state = ost.setup(ost.Adam(), {"w": np.ones(2)})
    with pytest.raises(TypeError, match=r"Adam\(betas=\.\.\.\) must be a tuple of 2"):
        ost.adjust(state, betas=0.9)
    with pytest.raises(ValueError, match=r"Adam\(betas=\.\.\.\)\[0\] must be in \[0, 1\)"):
        ost.adjust(state, betas=(math.inf, 0.9))


def test_adjust_checks_members_of_a_chain():
    state = ost.setup(ost.OptimiserChain(ost.ClipGrad(1.0), ost.AdamW(1e-3)), {"w": np.ones(2)})
    with pytest.raises(ValueError, match=r"AdamW\(lr=\.\.\.\)"):
        ost.adjust(state, lr=-1.0)
    with pytest.raises(ValueError, match=r"ClipGrad\(delta=\.\.\.\)"):
        ost.adjust(state, delta=-1.0)


@pytest.mark.parametrize("dtype", ["int32", np.complex64, np.bool_, "no such dtype", torch.int64])
def test_mu_dtype_must_be_a_real_float(dtype):
    for cls in public_rules():
        if default(cls) is None or not any(f.name == "mu_dtype" for f in dataclasses.fields(cls)):
            continue
        with pytest.raises(TypeError, match=rf"{cls.__name__}\(mu_dtype=\.\.\.\)"):
            cls(mu_dtype=dtype)
