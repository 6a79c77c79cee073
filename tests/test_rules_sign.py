"""Lion, Signum, SignDecay, Rprop, Lamb, Lars and Adafactor against their references, step for step.

References: torch.optim where torch has the rule (Rprop, Adafactor), else optax (Lion, Signum,
Lamb, Lars), else a NumPy transcription of the formula written here (SignDecay). float32 runs use
JAX arrays and hyper-parameters exact in float32 (dyadic), so both sides round the same constants;
float64 runs use NumPy arrays against torch float64 or optax under ``jax.enable_x64``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import optstate as ost
from optstate.rules.adafactor import Adafactor
from optstate.rules.layerwise import Lamb, Lars
from optstate.rules.sign import Lion, Rprop, SignDecay, Signum

SHAPES = [(), (5,), (3, 4), (2, 3, 2)]
# Adafactor: rank 0 and 1 unfactored; (4, 3, 2) factors other axes under factor_axes="largest".
ADA_SHAPES = [*SHAPES, (4, 3, 2), (2, 5)]
# Fewer leaves for options, complex and defaults of optax's rules: XLA compiles ~0.3 s per leaf.
FEW_SHAPES = [(), (2, 3, 2)]
STEPS = 6
LR, WD = 2**-5, 2**-4
B1, B2 = 0.875, 1 - 2**-7
# Reached from lr = 2**-7 by two halvings (clipped up to the lower bound) or four 1.25 growths.
RPROP_BOUNDS = (3 * 2**-10, 2**-6)
F32 = {"rtol": 2e-6, "atol": 2e-7}
F64 = {"rtol": 1e-12, "atol": 1e-14}

# Every rule of this file, with hyper-parameters that converge (for the property tests over all
# rules). Checked by hand against the property suite's bar, in float32 under jit: a quadratic's
# loss down 1000-fold within 3000 steps, Rosenbrock's from (-1.2, 1) below 0.05 within 12000.
# SignDecay only adds to the gradient, so it is chained with a rule that steps.
CASES = [
    ("Lion", Lion(3e-3, weight_decay=0.0)),
    ("Signum", Signum(3e-3)),
    ("SignDecay", ost.OptimiserChain(SignDecay(1e-4), ost.Momentum(1e-3))),
    ("Rprop", Rprop(0.01)),
    ("Lamb", Lamb(3e-3)),
    ("Lars", Lars(1.0, trust_coefficient=0.005)),
    ("Adafactor", Adafactor(0.1)),
]


# -- drivers ---------------------------------------------------------------------------------


def draws(dtype, seed=0, steps=STEPS, shapes=SHAPES):
    """Parameters and gradients. Gradients share a per-element drift, so some signs persist (Rprop
    grows its step sizes up to the bound) and others flip; one element per step-2 gradient is 0."""
    rng = np.random.default_rng(seed)
    is_complex = np.issubdtype(dtype, np.complexfloating)

    def normal(shape):
        x = rng.normal(size=shape)
        return x + 1j * rng.normal(size=shape) if is_complex else x

    params = [normal(s).astype(dtype) for s in shapes]
    drift = [normal(s) for s in shapes]
    grads = [
        [(d + 1.5 * normal(s)).astype(dtype) for d, s in zip(drift, shapes, strict=True)]
        for _ in range(steps)
    ]
    for g in grads[2] if steps > 2 else []:
        if g.ndim:
            g.flat[0] = 0
    return params, grads


def run_optstate(rule, params, grads, xp=np):
    """JAX runs are jitted: one compilation instead of one per operation, shape and dtype. The
    eager path is the same code; the property tests over ``CASES`` check that the two agree."""
    model = [xp.asarray(p) for p in params]
    state = ost.setup(rule, model)
    update = jax.jit(ost.update) if xp is jnp else ost.update
    for g in grads:
        state, model = update(state, model, [xp.asarray(x) for x in g])
    return [np.asarray(m) for m in model]


def run_optax(tx, params, grads):
    """optax over the list of parameters (each of its rules here acts leaf by leaf), jitted."""
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
        model = [jnp.asarray(p) for p in params]
        opt_state = tx.init(model)

        @jax.jit
        def step(model, opt_state, g):
            updates, opt_state = tx.update(g, opt_state, model)
            return optax.apply_updates(model, updates), opt_state

        for g in grads:
            model, opt_state = step(model, opt_state, [jnp.asarray(x) for x in g])
    return [np.asarray(m) for m in model]


def run_optax64(tx_factory, params, grads):
    with jax.enable_x64(True):
        return run_optax(tx_factory(), params, grads)


def run_torch(make, params, grads):
    """One torch optimiser over all parameters as leaf tensors, ``.grad`` set each step."""
    tensors = [torch.tensor(np.asarray(p), requires_grad=True) for p in params]
    opt = make(tensors)
    for g in grads:
        for t, x in zip(tensors, g, strict=True):
            t.grad = torch.tensor(np.asarray(x))
        opt.step()
    return [t.detach().numpy() for t in tensors]


def check(ours, ref, params, dtype, tol):
    moved = 0.0
    for a, b, p in zip(ours, ref, params, strict=True):
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, **tol)
        moved = max(moved, float(np.max(np.abs(b - p))))
    assert moved > 1e-2, "the steps are too small for the comparison to mean anything"


# -- the cases against a reference ----------------------------------------------------------

# name -> (optstate rule, reference kind, reference factory); optax factories are called inside
# the precision they run in.
REFERENCES = {
    "Lion": (
        Lion(LR, betas=(B1, B2), weight_decay=WD),
        "optax",
        lambda: optax.lion(LR, b1=B1, b2=B2, weight_decay=WD),
    ),
    "Signum": (Signum(LR, beta=B1), "optax", lambda: optax.signum(LR, beta=B1)),
    "Signum-beta0": (Signum(LR, beta=0.0), "optax", lambda: optax.sign_sgd(LR)),
    "Lamb": (
        Lamb(LR, betas=(B1, B2), eps=2**-20, weight_decay=WD),
        "optax",
        lambda: optax.lamb(LR, b1=B1, b2=B2, eps=2**-20, weight_decay=WD),
    ),
    "Lamb-eps-root": (
        Lamb(LR, betas=(B1, B2), eps=0.0, eps_root=2**-10),
        "optax",
        lambda: optax.lamb(LR, b1=B1, b2=B2, eps=0.0, eps_root=2**-10),
    ),
    "Lars": (
        Lars(0.5, momentum=B1, weight_decay=WD, trust_coefficient=0.25, eps=2**-10),
        "optax",
        lambda: optax.lars(0.5, weight_decay=WD, trust_coefficient=0.25, eps=2**-10, momentum=B1),
    ),
    "Lars-nesterov": (
        Lars(0.5, momentum=B1, trust_coefficient=0.25, nesterov=True),
        "optax",
        lambda: optax.lars(0.5, trust_coefficient=0.25, momentum=B1, nesterov=True),
    ),
    "Rprop": (
        Rprop(2**-7, etas=(0.5, 1.25), step_sizes=RPROP_BOUNDS),
        "torch",
        lambda ps: torch.optim.Rprop(ps, lr=2**-7, etas=(0.5, 1.25), step_sizes=RPROP_BOUNDS),
    ),
    "Rprop-lr-out-of-bounds": (  # torch clips the initial step size too; optax does not
        Rprop(0.5, etas=(0.5, 1.5), step_sizes=(2**-8, 2**-4)),
        "torch",
        lambda ps: torch.optim.Rprop(ps, lr=0.5, etas=(0.5, 1.5), step_sizes=(2**-8, 2**-4)),
    ),
    "Adafactor": (
        Adafactor(2**-3, beta2_decay=-0.75, eps=(2**-30, 2**-5), d=1.5, weight_decay=WD),
        "torch",
        lambda ps: torch.optim.Adafactor(
            ps, lr=2**-3, beta2_decay=-0.75, eps=(2**-30, 2**-5), d=1.5, weight_decay=WD
        ),
    ),
    "Adafactor-eps1-machine": (  # eps1=None; d=1 so the update clipping is active
        Adafactor(2**-3, eps=(None, 2**-5)),
        "torch",
        lambda ps: torch.optim.Adafactor(ps, lr=2**-3, eps=(None, 2**-5)),
    ),
}
NAMES = list(REFERENCES)
# The options (entries named rule-option) run in float64 only: each float32 JAX run costs two
# compilations of about a second.
BASE = [name for name in NAMES if "-" not in name]
COMPLEX = ["Lion", "Signum", "Lamb", "Lars", "Rprop"]


def reference(name, params, grads, x64):
    _, kind, make = REFERENCES[name]
    if kind == "torch":
        return run_torch(make, params, grads)
    return run_optax64(make, params, grads) if x64 else run_optax(make(), params, grads)


def shapes_of(name):
    if name.startswith("Adafactor"):
        return ADA_SHAPES
    if "-" in name and REFERENCES[name][1] == "optax":  # an option of an optax rule
        return FEW_SHAPES
    return SHAPES


@pytest.mark.parametrize("name", BASE)
def test_float32_jax(name):
    rule = REFERENCES[name][0]
    params, grads = draws(np.float32, shapes=shapes_of(name))
    ours = run_optstate(rule, params, grads, xp=jnp)
    # Adafactor: torch computes its scalar schedule (t**tau, RMS(p), the clipping) in Python
    # doubles, this library in the hyper-parameters' float32 under JAX. The parameters end up to
    # 6e-7 apart (measured; two float32 ulps of parameters of size 2 to 4), within the tolerance.
    # Rprop, Lion and Signum agree bit for bit; Lamb and Lars to one ulp (norms summed in another
    # order).
    check(ours, reference(name, params, grads, x64=False), params, np.float32, F32)


@pytest.mark.parametrize("name", NAMES)
def test_float64_numpy(name):
    rule = REFERENCES[name][0]
    params, grads = draws(np.float64, seed=1, shapes=shapes_of(name))
    ours = run_optstate(rule, params, grads)
    check(ours, reference(name, params, grads, x64=True), params, np.float64, F64)


@pytest.mark.parametrize("name", COMPLEX)
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex(name, dtype):
    rule = REFERENCES[name][0]
    params, grads = draws(dtype, seed=2, shapes=FEW_SHAPES)
    x64 = dtype == np.complex128
    ours = run_optstate(rule, params, grads, xp=np if x64 else jnp)
    check(ours, reference(name, params, grads, x64=x64), params, dtype, F64 if x64 else F32)


# -- defaults ------------------------------------------------------------------------------------

# Not dyadic, so compared in float64, where both sides hold the same doubles.
DEFAULTS = {
    "Lion": (Lion(), lambda: optax.lion(1e-3)),
    "Signum": (Signum(), lambda: optax.signum(0.01)),
    "Lamb": (Lamb(), lambda: optax.lamb(1e-3)),
    "Lars": (Lars(), lambda: optax.lars(1.0)),
    "Rprop": (Rprop(), torch.optim.Rprop),
    "Adafactor": (Adafactor(), torch.optim.Adafactor),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_defaults_float64(name):
    rule, make = DEFAULTS[name]
    shapes = shapes_of(name) if name in ("Rprop", "Adafactor") else FEW_SHAPES  # torch is cheap
    params, grads = draws(np.float64, seed=3, shapes=shapes)
    ours = run_optstate(rule, params, grads)
    if name in ("Rprop", "Adafactor"):
        ref = run_torch(make, params, grads)
    else:
        ref = run_optax64(make, params, grads)
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, b, **F64)


@pytest.mark.parametrize("name", ["Rprop", "Adafactor"])
def test_defaults_float32_against_torch(name):
    """torch rounds the same constants to float32 as this library does for Rprop (bit for bit);
    Adafactor differs only by its Python-double scalar schedule, as in ``test_float32_jax``."""
    rule, make = DEFAULTS[name]
    params, grads = draws(np.float32, seed=4, shapes=shapes_of(name))
    ours = run_optstate(rule, params, grads, xp=jnp)
    for a, b in zip(ours, run_torch(make, params, grads), strict=True):
        if name == "Rprop":
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, **F32)


def test_defaults_and_learning_rate_first():
    assert Lion() == Lion(1e-3, (0.9, 0.99), 1e-3)
    assert Signum() == Signum(0.01, 0.9)
    assert SignDecay() == SignDecay(1e-3)
    assert Rprop() == Rprop(1e-2, (0.5, 1.2), (1e-6, 50.0))
    assert Lamb() == Lamb(1e-3, (0.9, 0.999), 1e-6, 0.0, 0.0)
    assert Lars() == Lars(1.0, 0.9, 0.0, 1e-3, 0.0, nesterov=False)
    assert Adafactor() == Adafactor(1e-2, -0.8, (None, 1e-3), 1.0, 0.0)
    torch_rprop = torch.optim.Rprop([torch.zeros(1)]).defaults
    assert (torch_rprop["lr"], torch_rprop["etas"], torch_rprop["step_sizes"]) == (
        Rprop().lr,
        Rprop().etas,
        Rprop().step_sizes,
    )
    torch_ada = torch.optim.Adafactor([torch.zeros(1)]).defaults
    ada = Adafactor()
    assert (ada.lr, ada.beta2_decay, ada.eps, ada.d, ada.weight_decay) == tuple(
        torch_ada[k] for k in ("lr", "beta2_decay", "eps", "d", "weight_decay")
    )


# -- SignDecay: a NumPy transcription of g + lambda sign(p) ----------------------------------


def sign_decay_descent(params, grads, lam, lr):
    """p <- p - lr (g + lam sign(p)), sign(z) = z/|z| for complex z and sign(0) = 0."""
    out = []
    for i, p in enumerate(params):
        p = p.astype(np.complex128 if np.iscomplexobj(p) else np.float64)
        for g in grads:
            mag = np.abs(p)
            sign = np.divide(p, mag, out=np.zeros_like(p), where=mag != 0)
            p = p - lr * (g[i] + lam * sign)
        out.append(p)
    return out


@pytest.mark.parametrize(
    ("dtype", "xp", "tol"),
    [
        (np.float32, jnp, F32),
        (np.float64, np, F64),
        (np.complex64, jnp, F32),
        (np.complex128, np, F64),
    ],
    ids=["float32", "float64", "complex64", "complex128"],
)
def test_sign_decay_matches_transcription(dtype, xp, tol):
    params, grads = draws(dtype, seed=5)
    params[1][2] = 0  # sign(0) = 0: no decay on a zero entry
    lam, lr = 0.25, 2**-4
    rule = ost.OptimiserChain(SignDecay(lam), ost.Descent(lr))
    ours = run_optstate(rule, params, grads, xp=xp)
    check(ours, sign_decay_descent(params, grads, lam, lr), params, dtype, tol)


def test_sign_decay_alone_is_the_decayed_gradient():
    p, g = np.array([-2.0, 0.0, 3.0]), np.array([0.5, 0.5, 0.5])
    (new,) = run_optstate(SignDecay(0.125), [p], [[g]])
    np.testing.assert_array_equal(new, p - (g + 0.125 * np.array([-1.0, 0.0, 1.0])))


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rule_cls", [Lion, Signum])
def test_mu_dtype_bfloat16(rule_cls):
    params, grads = draws(np.float32, seed=6, shapes=FEW_SHAPES)
    if rule_cls is Lion:
        rule = Lion(LR, betas=(B1, B2), weight_decay=WD, mu_dtype=jnp.bfloat16)
        tx = optax.lion(LR, b1=B1, b2=B2, weight_decay=WD, mu_dtype=jnp.bfloat16)
    else:
        rule = Signum(LR, beta=B1, mu_dtype="bfloat16")
        tx = optax.signum(LR, beta=B1, accumulator_dtype=jnp.bfloat16)
    model = [jnp.asarray(p) for p in params]
    state = ost.setup(rule, model)
    assert all(s.mu.dtype == jnp.bfloat16 for s in state.states)
    ours = run_optstate(rule, params, grads, xp=jnp)
    check(ours, run_optax(tx, params, grads), params, np.float32, F32)


def test_lion_mu_dtype_wider_than_the_parameter():
    """A float32 momentum for bfloat16 parameters. optax adds its float32 update to the bfloat16
    parameter in float32 and rounds the sum; here the step is rounded to the parameter's dtype and
    then subtracted (the core keeps each parameter's dtype). The reference below is optax's update
    applied that way, so the comparison stays exact."""
    params, grads = draws(np.float32, seed=7, shapes=FEW_SHAPES)
    params = [jnp.asarray(p, jnp.bfloat16) for p in params]
    grads = [[jnp.asarray(x, jnp.bfloat16) for x in g] for g in grads]
    rule = Lion(LR, betas=(B1, B2), weight_decay=WD, mu_dtype=np.float32)
    ours = run_optstate(rule, params, grads, xp=jnp)
    tx = optax.lion(LR, b1=B1, b2=B2, weight_decay=WD, mu_dtype=jnp.float32)
    with jax.numpy_dtype_promotion("standard"):
        model, opt_state = params, tx.init(params)
        for g in grads:
            updates, opt_state = tx.update(g, opt_state, model)
            assert all(u.dtype == jnp.float32 for u in updates)
            model = [p + u.astype(jnp.bfloat16) for p, u in zip(model, updates, strict=True)]
    for a, b in zip(ours, model, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(a, np.asarray(b))


def test_rprop_reaches_both_step_size_bounds():
    rule, _, _ = REFERENCES["Rprop"]
    params, grads = draws(np.float64)
    state = ost.setup(rule, params)
    model = params
    for g in grads:
        state, model = ost.update(state, model, g)
    sizes = np.concatenate([np.ravel(s.step_size) for s in state.states])
    assert (sizes.min(), sizes.max()) == RPROP_BOUNDS


def adafactor_optax_convention(lr, wd, size):
    """optax.adafactor with what this library's options can express."""
    return lambda: optax.adafactor(
        lr,
        min_dim_size_to_factor=size,
        decay_rate=0.8,
        clipping_threshold=1.0,
        weight_decay_rate=lr * wd,
        eps=1e-30,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adafactor_eps1_bounds_small_gradients(dtype):
    """Gradients of size 1e-3 with eps1 = 1e-3: both of torch's floors act (the row factors' mean
    and the variance estimate), which ordinary gradients never reach."""
    params, grads = draws(dtype, seed=12, shapes=ADA_SHAPES)
    grads = [[(x * 1e-3).astype(dtype) for x in g] for g in grads]
    rule = Adafactor(2**-3, eps=(1e-3, 2**-5))
    ours = run_optstate(rule, params, grads)
    ref = run_torch(
        lambda ps: torch.optim.Adafactor(ps, lr=2**-3, eps=(1e-3, 2**-5)), params, grads
    )
    check(ours, ref, params, dtype, F64 if dtype == np.float64 else F32)


def test_adafactor_optax_convention_float32():
    """relative_step=False, factor_axes="largest" and min_dim_size_to_factor take optax's
    conventions. Left over: optax adds eps=1e-30 to g**2 where torch's convention bounds the
    denominators by eps1 (neither acts at these gradient sizes), and optax's products are ordered
    differently: a few float32 ulps."""
    rule = Adafactor(
        2**-3, weight_decay=WD, relative_step=False, factor_axes="largest", min_dim_size_to_factor=3
    )
    params, grads = draws(np.float32, seed=9, shapes=ADA_SHAPES)
    ours = run_optstate(rule, params, grads, xp=jnp)
    ref = run_optax(adafactor_optax_convention(2**-3, WD, 3)(), params, grads)
    check(ours, ref, params, np.float32, F32)


def test_adafactor_optax_convention_float64():
    """As above in float64, where optax's decay rate 1 - t**-0.8 is still computed from a float32
    step count (optax's ``_decay_rate_pow``): its 1 - beta2_t carries a float32 rounding (~6e-8
    relative) into the second moments, and the parameters (of order 1) end up to 1.2e-8 apart
    (measured over several seeds), hence rtol 1e-7 and atol 2e-8 instead of 1e-12."""
    rule = Adafactor(
        2**-3, weight_decay=WD, relative_step=False, factor_axes="largest", min_dim_size_to_factor=3
    )
    params, grads = draws(np.float64, seed=9, shapes=ADA_SHAPES)
    ours = run_optstate(rule, params, grads)
    ref = run_optax64(adafactor_optax_convention(2**-3, WD, 3), params, grads)
    check(ours, ref, params, np.float64, {"rtol": 1e-7, "atol": 2e-8})


def test_adafactor_factored_state_shapes():
    shapes = [(), (5,), (3, 4), (4, 3, 2), (2, 5)]
    model = [np.ones(s) for s in shapes]

    def layout(rule):
        state = ost.setup(rule, model)
        return [None if s.v is not None else (s.row.shape, s.col.shape) for s in state.states]

    assert layout(Adafactor()) == [
        None,
        None,
        ((3, 1), (1, 4)),
        ((4, 3, 1), (4, 1, 2)),
        ((2, 1), (1, 5)),
    ]
    # optax's choice: the largest axis is averaged away for the row factor; size 3 threshold.
    assert layout(Adafactor(factor_axes="largest", min_dim_size_to_factor=3)) == [
        None,
        None,
        ((3, 1), (1, 4)),
        ((1, 3, 2), (4, 1, 2)),
        None,
    ]


def test_adafactor_relative_step():
    """The relative step min(lr, 1/sqrt(t)) is what torch does; turning it off with lr > 1 shows
    the difference from the first step (1/sqrt(1) = 1 < lr)."""
    params, grads = draws(np.float64, seed=10, shapes=ADA_SHAPES, steps=1)
    fixed = run_optstate(Adafactor(4.0, relative_step=False), params, grads)
    relative = run_optstate(Adafactor(4.0), params, grads)
    torch_ref = run_torch(lambda ps: torch.optim.Adafactor(ps, lr=4.0), params, grads)
    for f, r, t, p in zip(fixed, relative, torch_ref, params, strict=True):
        np.testing.assert_allclose(r, t, **F64)
        np.testing.assert_allclose(f - p, 4.0 * (r - p), **F64)


# -- errors ------------------------------------------------------------------------------------


def test_errors():
    with pytest.raises(TypeError, match=r"Adafactor does not support complex parameters"):
        ost.setup(Adafactor(), [np.zeros((2, 2), np.complex64)])
    with pytest.raises(
        TypeError,
        match=r"Lion\(mu_dtype=.float32.\) stores the first moment in a real dtype, but the "
        r"parameter is complex64",
    ):
        ost.setup(Lion(mu_dtype="float32"), [np.zeros(2, np.complex64)])
    with pytest.raises(TypeError, match=r"Signum\(mu_dtype=\.\.\.\) must be a real floating"):
        Signum(mu_dtype="int32")
    with pytest.raises(TypeError, match=r"Lion\(betas=\.\.\.\) must be a tuple of 2"):
        Lion(betas=(0.9,))
    with pytest.raises(TypeError, match=r"Lamb\(betas=\.\.\.\) must be a tuple of 2"):
        Lamb(betas=0.9)
    with pytest.raises(TypeError, match=r"Lars\(lr=\.\.\.\) must be a real number"):
        Lars("1")
    with pytest.raises(TypeError, match=r"Lars\(nesterov=\.\.\.\)"):
        Lars(nesterov=1)
    with pytest.raises(ValueError, match=r"Rprop\(etas=\.\.\.\)\[0\] must be in \(0, 1\), got 1.5"):
        Rprop(etas=(1.5, 2.0))
    with pytest.raises(ValueError, match=r"Rprop\(lr=\.\.\.\) must be in \[0, inf\), got -1"):
        Rprop(-1.0)
    with pytest.raises(
        TypeError, match=r"Adafactor\(eps=\.\.\.\) must be a tuple of 2 .*element 1 is None"
    ):
        Adafactor(eps=(None, None))
    with pytest.raises(ValueError, match=r"Adafactor\(d=\.\.\.\) must be in \[1, inf\)"):
        Adafactor(d=0.5)
    with pytest.raises(ValueError, match=r"Adafactor\(beta2_decay=\.\.\.\)"):
        Adafactor(beta2_decay=0.8)
    with pytest.raises(ValueError, match=r"factor_axes"):
        Adafactor(factor_axes="first")
    with pytest.raises(ValueError, match=r"min_dim_size_to_factor"):
        Adafactor(min_dim_size_to_factor=0)
