"""``optstate.jit``: ties across the jit boundary; ``setup``'s CopyWarning; ``retie`` of NumPy
views after a jitted step; weakly typed steps compiling once.

References: the tied cases of ../shared/reference/tied-cases.md (numbers computed independently),
optax on the de-duplicated model with the tie's gradients summed by hand, and the eager step.
"""

import warnings
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tied_reference import G_M, G_T, G_V, MAT, T3_DESCENT, T3B_A

import optstate as ost

# -- helpers --------------------------------------------------------------------------------------


def close(actual, expected, rtol=1e-12):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=1e-12)


def leaves_equal(a, b, rtol=1e-12):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, np.ndarray | jax.Array):
            close(x, y, rtol)
        else:
            assert x == y


def silently(fn, *args):
    """``fn(*args)`` with the copies of a reference case (made on purpose) not reported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ost.CopyWarning)
        return fn(*args)


def tied_autoencoder(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 3)) * 0.5, dtype)
    model = {
        "enc": {"w": w, "b": jnp.zeros(3, dtype)},
        "dec": {"w": ost.Transpose(w), "b": jnp.zeros(6, dtype)},
        "again": [w],
    }
    data = jnp.asarray(rng.normal(size=(16, 6)), dtype)
    return model, data


def ae_loss(model, x):
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    error = h @ model["dec"]["w"] + model["dec"]["b"][None, :] - x
    return jnp.mean(error**2) + 1e-3 * jnp.sum(model["again"][0] ** 2)


def train_step(state, model, x):
    loss, grads = jax.value_and_grad(ae_loss)(model, x)
    state, model = ost.update(state, model, grads)
    return state, model, loss


def optax_reference(model, data, steps, lr=1e-2):
    """optax's Adam on the weight written once, its three positions' gradients summed by hand."""
    params = {"w": model["enc"]["w"], "be": model["enc"]["b"], "bd": model["dec"]["b"]}
    tx = optax.adam(lr)
    opt_state = tx.init(params)
    for _ in range(steps):
        tied = {
            "enc": {"w": params["w"], "b": params["be"]},
            "dec": {"w": ost.Transpose(params["w"]), "b": params["bd"]},
            "again": [params["w"]],
        }
        g = jax.grad(ae_loss)(tied, data)
        summed = g["enc"]["w"] + g["dec"]["w"].parent + g["again"][0]
        grads = {"w": summed, "be": g["enc"]["b"], "bd": g["dec"]["b"]}
        with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes
            updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return params


# -- one array in, one array out ------------------------------------------------------------------


def test_the_tie_is_one_object_after_jitted_donated_steps():
    with jax.enable_x64(True):
        model, data = tied_autoencoder(jnp.float64)
        ref = optax_reference(model, data, steps=4)
        traces = []

        def step(state, model, x):
            traces.append(1)
            return train_step(state, model, x)

        jitted = ost.jit(step, donate_argnums=(0, 1))
        state = ost.setup(ost.Adam(1e-2), model)
        for _ in range(4):
            state, model, _loss = jitted(state, model, data)
            w = model["enc"]["w"]
            assert model["dec"]["w"].parent is w
            assert model["again"][0] is w
        assert len(traces) == 1
        close(model["enc"]["w"], ref["w"])
        close(model["enc"]["b"], ref["be"])
        close(model["dec"]["b"], ref["bd"])
        # the eager update accepts the returned model as it is: no retie needed
        grads = jax.grad(ae_loss)(model, data)
        ost.update(state, model, grads)


def test_donating_state_and_model_deletes_every_old_buffer():
    model, data = tied_autoencoder()
    state = ost.setup(ost.Adam(1e-2), model)
    old = jax.tree_util.tree_leaves((state, model))
    assert len({id(x) for x in old}) < len(old)  # the tied weight is one buffer, at 3 positions
    state, model, _ = ost.jit(train_step, donate_argnums=(0, 1))(state, model, data)
    assert all(x.is_deleted() for x in old)
    assert not data.is_deleted()
    new = jax.tree_util.tree_leaves((state, model))
    assert not any(x.is_deleted() for x in new)
    # one buffer per unique array, as before the step
    assert len({id(x) for x in new}) == len({id(x) for x in old})


def test_plain_jax_jit_cannot_donate_a_tied_model():
    """What ost.jit is for: jax.jit refuses one buffer donated at two positions."""
    model, data = tied_autoencoder()
    state = ost.setup(ost.Adam(1e-2), model)
    with pytest.raises(Exception, match="donate"):
        jax.jit(train_step, donate_argnums=(0, 1))(state, model, data)


def test_one_array_across_arguments_and_within_one():
    a = jnp.arange(3.0)
    seen = {}

    def f(x, tree, y):
        seen["same"] = x is tree["a"] is tree["b"].parent is y
        return {"p": x + 1, "q": ost.Transpose(x + 1)}, x * 2

    jitted = ost.jit(f, donate_argnums=(0,))
    out, doubled = jitted(a, {"a": a, "b": ost.Transpose(a)}, a)
    assert seen["same"]
    assert a.is_deleted()  # donated once, although it is also in arguments kept
    assert out["q"].parent is not out["p"]  # two traced values: two arrays
    close(doubled, [0.0, 2.0, 4.0])


def test_a_value_returned_at_several_positions_comes_back_as_one_array():
    def f(x):
        y = x * 2
        return {"a": y, "b": [y, ost.Transpose(y)], "c": x * 2}

    out = ost.jit(f)(jnp.ones((2, 3)))
    assert out["a"] is out["b"][0] is out["b"][1].parent
    assert out["c"] is not out["a"]  # equal values, another traced value


def test_one_trace_per_structure_and_a_new_structure_on_a_new_trace():
    traces = []

    def f(x):
        traces.append(x.shape)
        if x.ndim == 1:
            return {"one": x + 1}
        return [x.sum(), ost.Transpose(x)]

    jitted = ost.jit(f)
    for _ in range(3):
        out = jitted(jnp.ones(3))
        assert set(out) == {"one"}
    assert traces == [(3,)]
    out = jitted(jnp.ones((2, 3)))  # another structure of the result: its own output plan
    assert isinstance(out, list)
    assert isinstance(out[1], ost.Transpose)
    assert out[1].shape == (3, 2)
    out = jitted(jnp.ones(3))  # the first trace's plan again
    assert set(out) == {"one"}
    assert traces == [(3,), (2, 3)]


def test_static_arguments_and_leaves_that_are_not_arrays():
    traces = []

    def f(x, scale, tree):
        traces.append(1)
        return tree["fn"](x) * scale, tree["flag"], tree["n"]

    jitted = ost.jit(f, static_argnums=1)
    tree = {"fn": jnp.tanh, "flag": True, "n": 3}
    _y, flag, n = jitted(jnp.zeros(2), 2.0, tree)
    assert flag is True
    assert n == 3
    jitted(jnp.ones(2), 2.0, tree)
    assert len(traces) == 1
    jitted(jnp.ones(2), 3.0, tree)  # another static value: another trace
    jitted(jnp.ones(2), 3.0, {**tree, "n": True})  # True == 1 but is not 1: another trace
    assert len(traces) == 3


def test_keyword_arguments_donated_and_static_by_name():
    def f(state, *, model, scale):
        return state * scale, model * scale

    jitted = ost.jit(f, donate_argnames=("model",), static_argnames=("scale",))
    m, s = jnp.ones(2), jnp.ones(2)
    a, _b = jitted(s, model=m, scale=2.0)
    assert m.is_deleted()
    assert not s.is_deleted()
    close(a, [2.0, 2.0])


# -- the tied cases of the reference, under ost.jit -----------------------------------------------


@jax.tree_util.register_dataclass
@dataclass
class Pair:
    x: object
    y: object


def f64(x):
    return np.array(x, dtype=np.float64)


def case_t1(jaxify):
    twice = jaxify(f64([1.0, 2.0]))
    model = (twice, (jaxify(f64([1.0, 2.0])), twice))
    rule = ost.Momentum(0.1, momentum=0.9)
    g = (f64([3, 3]), (f64([10, 10]), f64([7, 7])))
    expect = {(0,): [0, 1], (1, 0): [0, 1], (1, 1): [0, 1]}
    return model, rule, g, expect, [((0,), (1, 1))]


def case_t1_none(jaxify):
    model, rule, _, _, ties = case_t1(jaxify)
    return model, rule, (f64([3, 3]), None), {(0,): [0.7, 1.7], (1, 0): [1, 2]}, ties


def case_t1_first_none(jaxify):
    model, rule, _, _, ties = case_t1(jaxify)
    g = (None, (f64([5, 5]), f64([7, 7])))
    return model, rule, g, {(0,): [0.3, 1.3], (1, 0): [0.5, 1.5]}, ties


def case_t2(jaxify, b_branch=True):
    thrice = jaxify(np.array([3.0]))
    model = {
        "a": {"x": thrice, "y": jaxify(f64([4, 5, 6])), "z": True},
        "b": ({"m": (0, 1, thrice)},),
        "c": {"x": jaxify(f64([7, 8])), "y": thrice},
    }
    g = {
        "a": {"x": f64([24]), "y": f64([32, 40, 48]), "z": None},
        "b": ({"m": (None, None, f64([96]))},) if b_branch else None,
        "c": {"x": f64([56, 64]), "y": f64([24])},
    }
    expect = {
        ("a", "x"): [-11.4 if b_branch else -1.8],
        ("a", "y"): [0.8, 1.0, 1.2],
        ("c", "x"): [1.4, 1.6],
    }
    ties = [(("a", "x"), ("b", 0, "m", 2)), (("a", "x"), ("c", "y"))]
    return model, ost.Momentum(0.1, momentum=0.9), g, expect, ties


def case_t3(jaxify, view=False, clip=False):
    mat = jaxify(MAT.copy())
    t = mat.T if view else ost.Transpose(mat)
    model = {"m": mat, "f": np.log, "t": t, "v": jaxify(f64([7.0, 8.0, 9.0]))}
    rule = (
        ost.OptimiserChain(ost.ClipGrad(10), ost.Descent(0.1), ost.ClipGrad(10))
        if clip
        else ost.Descent(0.1)
    )
    g = {"m": G_M, "f": None, "t": G_T, "v": G_V}
    expect = {("m",): [[0, 1, 2], [3, 4, 5]] if clip else T3_DESCENT}
    return model, rule, g, expect, [] if view else [(("m",), ("t", "parent"))]


def case_t3b(jaxify):
    mat = jaxify(MAT.copy())
    tri = {"a": ost.Transpose(mat), "b": mat, "c": ost.Transpose(mat), "d": 4.0}
    g = {
        "a": f64([[63887.76, 162949.68], [84137.04, 214596.72], [104386.32, 266243.76]]),
        "b": f64([[82717.2, 93950.4, 105183.6], [197578.44, 224410.08, 251241.72]]),
        "c": f64([[10778.16, 107781.6], [14238.6, 142386.0], [17699.04, 176990.4]]),
        "d": None,
    }
    expect = {("b",): np.asarray(T3B_A).T}
    ties = [(("b",), ("a", "parent")), (("b",), ("c", "parent"))]
    return tri, ost.Descent(0.1), g, expect, ties


def case_t4(jaxify):
    model = {k: jaxify(f64([1.0, 2.0])) for k in "abcd"}
    g = {k: f64([v, v]) for k, v in zip("abcd", [3.0, 7.0, 3.0, 10.0], strict=True)}
    return model, ost.Momentum(0.1, momentum=0.9), g, {("c",): [0.7, 1.7]}, []


def case_t5(jaxify):
    pair = Pair(x=jaxify(f64([1.0])), y=jaxify(f64([2.0])))
    model = {"a": pair, "b": pair, "c": Pair(pair.x, pair.y)}
    g = {
        "a": Pair(f64([1.0]), f64([10.0])),
        "b": Pair(f64([100.0]), f64([1000.0])),
        "c": Pair(f64([1 / 3]), f64([1 / 30])),
    }
    expect = {("a", "x"): [-0.0133333333333], ("a", "y"): [-8.1003333333333]}
    ties = [(("a", "x"), ("b", "x")), (("a", "x"), ("c", "x")), (("a", "y"), ("c", "y"))]
    return model, ost.Momentum(0.01, momentum=0.9), g, expect, ties


CASES = {
    "T1": case_t1,
    "T1-second-branch-none": case_t1_none,
    "T1-first-position-none": case_t1_first_none,
    "T2": case_t2,
    "T2-b-branch-none": lambda j: case_t2(j, b_branch=False),
    "T3-Transpose": case_t3,
    "T3-view": lambda j: case_t3(j, view=True),
    "T3-clipped": lambda j: case_t3(j, clip=True),
    "T3b": case_t3b,
    "T4": case_t4,
    "T5": case_t5,
}
BACKENDS = {"numpy": lambda x: x, "jax": jnp.asarray}


def at(tree, path):
    for key in path:
        tree = (
            getattr(tree, key) if isinstance(key, str) and not isinstance(tree, dict) else tree[key]
        )
    return tree


PAIRS = [  # every case on every backend, but views on JAX, which has none
    (case, backend)
    for case in CASES
    for backend in BACKENDS
    if (case, backend) != ("T3-view", "jax")
]


@pytest.mark.parametrize(("case", "backend"), PAIRS)
def test_tied_cases_under_ost_jit_equal_the_reference_and_eager(case, backend):
    with jax.enable_x64(True):
        model, rule, g, expect, ties = CASES[case](BACKENDS[backend])
        state = silently(ost.setup, rule, model)
        _, eager = ost.update(state, model, g)
        _, jitted = ost.jit(ost.update)(state, model, g)
        _, inside = ost.jit(lambda m, g: ost.update(silently(ost.setup, rule, m), m, g))(model, g)
    for new in (eager, jitted, inside):
        for path, value in expect.items():
            close(at(new, path), value, rtol=1e-9)  # the reference's digits
    leaves_equal(jitted, eager)
    leaves_equal(inside, eager)
    for new in (jitted, inside):
        for a, b in ties:
            assert at(new, a) is at(new, b)


def test_t3_train_step_with_jax_grad_inside_ost_jit():
    """The whole step inside ost.jit: jax.grad gives the reference's per-position gradients."""
    with jax.enable_x64(True):
        mat = jnp.asarray(MAT)
        model = {"m": mat, "f": jnp.log, "t": ost.Transpose(mat), "v": jnp.array([7.0, 8.0, 9.0])}

        def loss(model, x):
            return jnp.sum((model["m"] @ model["f"](model["t"] @ x + model["v"])) ** 2)

        def step(model, x):
            g = eqx.filter_grad(loss)(model, x)  # the function at "f" gets None
            state = ost.setup(ost.Descent(0.1), model)
            return g, ost.update(state, model, g)[1]

        g, new = ost.jit(step)(model, jnp.array([1.0, 0.1]))
    close(g["m"], G_M, rtol=1e-9)
    close(g["t"].parent, G_T.T, rtol=1e-9)
    close(new["m"], T3_DESCENT, rtol=1e-9)
    assert new["t"].parent is new["m"]
    assert new["f"] is jnp.log


# -- setup inside ost.jit -------------------------------------------------------------------------


def models_for_setup():
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    v = np.random.default_rng(2).normal(size=(2, 3))
    pair = Pair(x=jnp.ones(2) * jnp.arange(2.0), y=jnp.arange(3.0))
    return {
        "transpose": {"enc": w, "dec": ost.Transpose(w), "b": jnp.zeros(3), "again": [w]},
        "numpy-view": {"first": v.T, "v": v, "also": v.T, "n": 3},
        "containers": {"a": pair, "b": pair, "c": Pair(pair.x, pair.y)},
        "transposed-first": {"t": ost.Transpose(w), "w": w},
    }


@pytest.mark.parametrize("name", list(models_for_setup()))
@pytest.mark.parametrize(
    "rule",
    [ost.Adam(1e-2), lambda path: ost.Descent(0.1) if path[-1] == "b" else ost.Momentum(0.1)],
    ids=["Adam", "by-path"],
)
def test_setup_inside_ost_jit_equals_eager_setup(name, rule):
    with jax.enable_x64(True):  # NumPy's float64 stays float64 inside
        model = models_for_setup()[name]
        eager = ost.setup(rule, model)
        assert eager.plan.n_ties >= 1
        jitted = ost.jit(lambda m: ost.setup(rule, m))(model)
    assert jitted.plan == eager.plan
    leaves_equal(jitted, eager)


def test_setup_inside_plain_jax_jit_sees_no_tie_and_warns():
    w = jnp.ones((4, 3)) * jnp.arange(3.0)[None, :]
    model = {"enc": w, "dec": ost.Transpose(w)}
    with pytest.warns(ost.CopyWarning, match=r"model\['dec'\] is a Transpose.*optstate.jit"):
        state = jax.jit(lambda m: ost.setup(ost.Adam(), m))(model)
    assert state.plan.n_ties == 0  # what jax.jit leaves of the tie
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = ost.jit(lambda m: ost.setup(ost.Adam(), m))(model)
    assert state.plan.n_ties == 1


def test_setup_inside_plain_jax_jit_does_not_warn_on_untied_models():
    rng = np.random.default_rng(3)
    models = [
        {"w": jnp.asarray(rng.normal(size=(4, 3))), "v": jnp.asarray(rng.normal(size=(4, 3)))},
        {"w": jnp.ones((4, 3)), "t": ost.Transpose(jnp.ones((5, 2)))},  # no parent-shaped leaf
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for model in models:
            jax.jit(lambda m: ost.setup(ost.Adam(), m))(model)


# -- Equinox, scan, sharding ----------------------------------------------------------------------


class Twice(eqx.Module):
    """One ``eqx.nn.Linear`` in the fields ``block`` and ``again``; a function and a flag."""

    inp: eqx.nn.Linear
    block: eqx.nn.Linear
    again: eqx.nn.Linear
    activation: object
    residual: bool

    def __call__(self, x):
        h = self.activation(self.inp(x))
        h = h + self.activation(self.block(h)) if self.residual else self.block(h)
        return self.again(h)


def eqx_loss(model, x):
    return jnp.mean((jax.vmap(model)(x) - 0.5) ** 2)


def test_equinox_module_with_a_layer_used_twice():
    keys = jax.random.split(jax.random.key(0), 2)
    block = eqx.nn.Linear(3, 3, key=keys[1])
    model = Twice(eqx.nn.Linear(2, 3, key=keys[0]), block, block, jax.nn.tanh, True)
    x = jax.random.normal(jax.random.key(2), (8, 2))
    rule, tx = ost.Adam(2**-5, betas=(0.875, 1 - 2**-10)), optax.adam(2**-5, 0.875, 1 - 2**-10)

    # the reference: optax on the layer written once, its two gradients summed by hand
    params = {"inp": model.inp, "block": model.block}
    opt_state = tx.init(params)
    for _ in range(steps := 3):
        full = Twice(params["inp"], params["block"], params["block"], jax.nn.tanh, True)
        g = eqx.filter_grad(eqx_loss)(full, x)
        summed = {"inp": g.inp, "block": jax.tree_util.tree_map(jnp.add, g.block, g.again)}
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(summed, opt_state, params)
        params = eqx.apply_updates(params, updates)

    @ost.jit
    def step(state, model, x):
        grads = eqx.filter_grad(eqx_loss)(model, x)
        return ost.update(state, model, grads)

    state = ost.jit(lambda m: ost.setup(rule, m))(model)
    assert state.plan.n_ties == 2
    for _ in range(steps):
        state, model = step(state, model, x)
        assert model.again.weight is model.block.weight
        assert model.again.bias is model.block.bias
    assert model.activation is jax.nn.tanh
    assert model.residual is True
    ulps = steps * float(np.finfo(np.float32).eps)
    for ours, theirs in zip(
        jax.tree_util.tree_leaves({"inp": model.inp, "block": model.block}),
        jax.tree_util.tree_leaves(params),
        strict=True,
    ):
        np.testing.assert_allclose(
            ours, theirs, rtol=0, atol=ulps * float(jnp.max(jnp.abs(theirs)))
        )


def test_a_scan_over_steps_inside_ost_jit():
    with jax.enable_x64(True):
        model, data = tied_autoencoder(jnp.float64)
        ref = optax_reference(model, data, steps=5)

        @ost.jit
        def five_steps(state, model):
            def body(carry, _):
                state, model, _ = train_step(*carry, data)
                return (state, model), None

            (state, model), _ = jax.lax.scan(body, (state, model), None, length=5)
            return state, ost.retie(state, model)  # the scan carried one value per position

        state, model = five_steps(ost.setup(ost.Adam(1e-2), model), model)
    assert model["dec"]["w"].parent is model["enc"]["w"] is model["again"][0]
    close(model["enc"]["w"], ref["w"])
    close(model["dec"]["b"], ref["bd"])
    assert int(state.step) == 5


def test_two_device_mesh_keeps_shardings_and_the_tie():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rows, replicated = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
    rng = np.random.default_rng(4)
    w = jax.device_put(jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), rows)
    model = {"enc": w, "dec": ost.Transpose(w), "b": jax.device_put(jnp.zeros(4), replicated)}
    x = jax.device_put(jnp.asarray(rng.normal(size=(4, 8)), jnp.float32), replicated)

    def loss(m, x):
        return jnp.mean((jnp.tanh(x @ m["enc"] + m["b"][None, :]) @ m["dec"] - x) ** 2)

    def step(state, model, x):
        return ost.update(state, model, jax.grad(loss)(model, x))

    state = ost.setup(ost.Adam(1e-2), model)
    eager_state, eager = state, model
    for _ in range(2):
        eager_state, eager = ost.update(eager_state, eager, jax.grad(loss)(eager, x))

    jitted = ost.jit(step, donate_argnums=(0, 1))
    for _ in range(2):
        state, model = jitted(state, model, x)
    assert model["dec"].parent is model["enc"]
    assert model["enc"].sharding.is_equivalent_to(rows, 2)
    assert state.states[1].mu.sharding.is_equivalent_to(rows, 2)
    assert model["b"].sharding.is_equivalent_to(replicated, 1)
    close(model["enc"], eager["enc"], rtol=1e-6)

    # in_shardings and out_shardings pass through: the model is put where they say
    columns = NamedSharding(mesh, P(None, "x"))
    with_shardings = ost.jit(
        step,
        in_shardings=(None, {"enc": rows, "dec": rows, "b": replicated}, replicated),
        out_shardings=(None, {"enc": columns, "dec": columns, "b": replicated}),
    )
    state, model = with_shardings(state, model, x)
    assert model["dec"].parent is model["enc"]
    assert model["enc"].sharding.is_equivalent_to(columns, 2)


def test_shardings_that_split_one_array_are_refused():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    w = jnp.ones((4, 4))
    f = ost.jit(
        lambda m: m["a"] + m["b"],
        in_shardings=({"a": NamedSharding(mesh, P("x")), "b": NamedSharding(mesh, P())},),
    )
    with pytest.raises(ValueError, match=r"m\['a'\] and m\['b'\] hold one array"):
        f({"a": w, "b": w})


# -- bad input ------------------------------------------------------------------------------------


def test_a_static_argument_that_cannot_be_hashed():
    f = ost.jit(lambda x, sizes: x, static_argnums=1)
    with pytest.raises(ValueError, match=r"static argument 1 is \[1, 2\] of type list"):
        f(jnp.ones(2), [1, 2])
    g = ost.jit(lambda tree: tree["x"])
    with pytest.raises(ValueError, match=r"tree\['opts'\] \(a leaf that is not an array"):
        g({"x": jnp.ones(2), "opts": bytearray(b"ab")})


def test_a_donated_argument_used_after_the_call():
    model, data = tied_autoencoder()
    state = ost.setup(ost.Adam(1e-2), model)
    jitted = ost.jit(train_step, donate_argnums=(0, 1))
    jitted(state, model, data)
    with pytest.raises(ValueError, match=r"model\['again'\]\[0\] is an array that was deleted"):
        jitted(ost.setup(ost.Adam(1e-2), tied_autoencoder()[0]), model, data)


def test_leaves_jax_cannot_trace_get_a_clear_error():
    import torch

    f = ost.jit(lambda m: m)
    with pytest.raises(TypeError, match=r"m\['w'\] is a torch tensor"):
        f({"w": torch.ones(2)})
    with pytest.raises(TypeError, match=r"m\['s'\] is a NumPy array of dtype <U1"):
        f({"s": np.array(["a"])})


def test_a_function_that_leaks_a_tracer_into_a_later_call():
    leaked = []

    def f(x):
        if leaked:  # a second trace returns a value of the first: another trace's structure
            return {"y": leaked[0]}
        leaked.append(x * 2)
        return x

    jitted = ost.jit(f)
    jitted(jnp.ones(2))
    with pytest.raises(jax.errors.UnexpectedTracerError, match="escape"):
        jitted(jnp.ones(3))


def test_in_shardings_with_keyword_arguments_is_refused_as_jax_jit_does():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    f = ost.jit(lambda x, y: x + y, in_shardings=NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match="in_shardings with keyword arguments"):
        f(jnp.ones(2), y=jnp.ones(2))


def test_ost_jit_composes_with_grad_and_vmap():
    w = jnp.arange(6.0).reshape(2, 3)
    model = {"a": w, "t": ost.Transpose(w)}

    def loss(m, x):
        return jnp.sum((x @ m["a"] @ m["t"]) ** 2)

    x = jnp.asarray([[1.0, -2.0]])
    g = jax.grad(ost.jit(loss))(model, x)
    expected = jax.grad(loss)(model, x)
    close(g["a"], expected["a"], rtol=1e-6)
    close(g["t"].parent, expected["t"].parent, rtol=1e-6)
    batched = jax.vmap(lambda x: ost.jit(loss)(model, x))(jnp.stack([x, 2 * x]))
    close(batched, [loss(model, x), loss(model, 2 * x)], rtol=1e-6)


def test_the_callers_own_jax_jit_keeps_working():
    model, data = tied_autoencoder()
    state = ost.setup(ost.Adam(1e-2), model)
    jitted = jax.jit(train_step, donate_argnums=0)
    state, model, _ = jitted(state, model, data)
    assert model["dec"]["w"].parent is not model["enc"]["w"]  # jax.jit returns copies
    model = ost.retie(state, model)
    ost.update(state, model, jax.grad(ae_loss)(model, data))


# -- NumPy views through ost.jit and retie --------------------------------------------------------


def test_a_numpy_view_enters_once_and_setup_inside_sees_it():
    v = np.arange(6.0).reshape(2, 3)
    seen = {}

    def f(model):
        state = ost.setup(ost.Descent(0.5), model)
        seen["ties"] = state.plan.n_ties
        return ost.update(state, model, {"v": jnp.ones((2, 3)), "vt": jnp.ones((3, 2))})[1]

    new = ost.jit(f)({"v": v, "vt": v.T})
    assert seen["ties"] == 1
    close(new["v"], v - 1.0)
    close(new["vt"], (v - 1.0).T)


@pytest.mark.parametrize("step", ["jax.jit", "ost.jit"])
def test_retie_after_a_jitted_step_rebuilds_numpy_views(step):
    with jax.enable_x64(True):
        mat = MAT.copy()
        model = {"m": mat, "t": mat.T, "v": np.array([7.0, 8.0, 9.0])}
        state = ost.setup(ost.Descent(0.1), model)
        g = {"m": G_M, "t": G_T, "v": G_V}
        jitted = (jax.jit if step == "jax.jit" else ost.jit)(ost.update)
        state, out = jitted(state, model, g)
        model = ost.retie(state, out)
        assert isinstance(model["m"], np.ndarray)
        assert model["t"].base is model["m"]  # a view again, on one NumPy base
        close(model["m"], T3_DESCENT, rtol=1e-9)
        state, model = ost.update(state, model, g)  # the eager update accepts it
    close(model["m"], np.asarray(T3_DESCENT) - 0.1 * (G_M + G_T.T), rtol=1e-9)
    assert model["t"].base is model["m"]


# -- weak types -----------------------------------------------------------------------------------


def test_weakly_typed_parameters_and_gradients_compile_once():
    model = {"t": jnp.asarray(2.0), "w": jnp.full((7,), 0.5)}  # a step no other test compiles
    assert model["t"].weak_type
    assert model["w"].weak_type

    def loss(m):
        return m["t"] ** 2 + jnp.sum(m["w"] ** 2)

    tx = optax.adam(1e-2)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in model.items()}
    opt_state = tx.init(params)
    state = ost.setup(ost.Adam(1e-2), model)
    grads = jax.grad(loss)(model)
    assert grads["t"].weak_type  # the first gradients are weakly typed
    with counting_compiles() as compiles:
        state, model = ost.update(state, model, grads)
    first = len(compiles)
    for _ in range(3):
        grads = jax.grad(loss)(model)
        with counting_compiles() as compiles:
            state, model = ost.update(state, model, grads)
        assert not compiles, "a step after the first compiled again"
    assert first >= 1
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(4):
            updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
            params = optax.apply_updates(params, updates)
    close(model["t"], params["t"], rtol=1e-6)
    close(model["w"], params["w"], rtol=1e-6)


# -- the CopyWarning ------------------------------------------------------------------------------


def copies_of(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ost.setup(ost.Adam(), model)
    return [w for w in caught if issubclass(w.category, ost.CopyWarning)]


def test_jax_w_t_warns_naming_both_paths():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    with pytest.warns(ost.CopyWarning) as caught:
        ost.setup(ost.Adam(), {"enc": {"w": w}, "dec": {"w": w.T}, "b": jnp.zeros(3)})
    assert len(caught) == 1
    message = str(caught[0].message)
    # named in the order of the model's positions: 'dec' comes before 'enc'
    assert "model['enc']['w'] holds the values of model['dec']['w'] transposed" in message
    assert "put optstate.Transpose(model['dec']['w']) at model['enc']['w']" in message
    assert caught[0].filename == __file__  # it points at the caller's line


@pytest.mark.parametrize("backend", ["numpy", "jax", "torch"])
def test_a_copied_embedding_warns(backend):
    e = np.random.default_rng(5).normal(size=(6, 4)).astype(np.float32)
    if backend == "torch":
        import torch

        model = {"embed": torch.tensor(e), "unembed": torch.tensor(e.copy())}
    else:
        xp = np if backend == "numpy" else jnp
        model = {"embed": xp.asarray(e), "unembed": xp.asarray(e.copy())}
    (warning,) = copies_of(model)
    assert "model['unembed'] holds the same values as model['embed']" in str(warning.message)


def test_a_permuted_3d_copy_warns_once_for_many_pairs():
    x = np.random.default_rng(6).normal(size=(2, 3, 4))
    model = {"a": x, "b": x.transpose(1, 2, 0).copy(), "c": x.copy(), "d": x[::-1].copy()}
    (warning,) = copies_of(model)
    message = str(warning.message)
    assert "model['b'] holds the values of model['a'] with axes (1, 2, 0)" in message
    assert "model['c'] holds the same values as model['a']" in message
    assert "model['d']" not in message  # reversed along one axis: not a permutation of axes


def test_no_warning_where_there_is_no_copy():
    rng = np.random.default_rng(7)
    v = rng.normal(size=(2, 3))
    models = {
        "equal values, not a permutation of axes": {"a": v, "b": v.reshape(3, 2).copy()},
        "equal values, another shape": {"a": v, "b": v.reshape(6).copy()},
        "constants": {
            "b1": np.zeros(5),
            "b2": np.zeros(5),
            "s": jnp.ones((2, 3)),
            "t": jnp.ones((3, 2)),
        },
        "distinct values": {k: rng.normal(size=(4, 4)) for k in "abc"},
        "ties, not copies": {"w": v, "t": ost.Transpose(v), "view": v.T},
        "another dtype": {"a": v, "b": v.astype(np.float32)},
        "single elements": {"a": np.ones(1) * 3, "b": np.ones(1) * 3},
        "vectors, which are not compared": {"a": v[0], "b": v[0].copy()},
    }
    for name, model in models.items():
        assert not copies_of(model), name


def test_a_copy_under_a_transpose_is_named_through_it():
    w = np.random.default_rng(9).normal(size=(3, 2))
    (warning,) = copies_of({"a": w, "t": ost.Transpose(w.copy())})
    assert "model['t'].parent holds the same values as model['a']" in str(warning.message)


def test_a_copy_on_purpose_is_silenced_by_a_filter():
    w = np.random.default_rng(8).normal(size=(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", ost.CopyWarning)
        state = ost.setup(ost.Adam(), {"enc": w, "dec": w.T.copy()})
    assert state.plan.n_ties == 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.complex64], ids=str)
def test_the_fingerprint_where_arrays_live_equals_the_hosts(dtype, monkeypatch):
    """Large arrays on an accelerator are summarised where they live; the fingerprint must be the
    one the host computes, or a copy read on the host and one summarised there would not meet."""
    from optstate import _copies

    x = jax.random.normal(jax.random.key(9), (128, 64)).astype(dtype)  # not read stacked
    assert _copies._device_summary(x) == _copies._host_summary(np.asarray(x))
    assert _copies._device_summary(jnp.ones((5, 5), dtype))[0]
    monkeypatch.setattr(_copies, "_on_host", lambda x, size: not isinstance(x, jax.Array))
    model = {"a": x, "b": x.T}
    if dtype != jnp.bfloat16:  # NumPy cannot train bfloat16
        model["c"] = np.asarray(x)  # read on the host
    (warning,) = copies_of(model)
    assert "model['b'] holds the values of model['a'] transposed" in str(warning.message)
    if "c" in model:
        assert "model['c'] holds the same values as model['a']" in str(warning.message)
