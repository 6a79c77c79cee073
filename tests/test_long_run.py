"""Long runs: 10,000 steps of a small tied autoencoder, eagerly and under the user's jax.jit.

Checked: no compilation after the first step; no growth of live JAX arrays (exactly) or of the
process's resident memory (loosely); the state's leaves, shapes and bytes constant; the tie intact
(one object eagerly; exactly equal copies under jit, one object after ``retie``); and the trained
weights equal optax's Adam on the model written with the weight once and its gradients summed by
hand. Everything runs in float64 so that comparison can be tight.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compiles import counting_compiles

import optstate as ost

STEPS = 10_000
BLOCK = 1000  # memory is sampled every BLOCK steps; the first block is the warm-up
LR, BETAS = 1e-2, (0.9, 0.999)
BATCHES = 8


def loss(model, x):
    """A tied autoencoder: the decoder uses the encoder's weight transposed, and a penalty reads
    the weight a third time."""
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    error = h @ model["dec"]["w"] + model["dec"]["b"][None, :] - x
    return jnp.mean(error**2) + 1e-3 * jnp.sum(model["again"][0] ** 2)


def start():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 3)) * 0.5)
    model = {
        "enc": {"w": w, "b": jnp.zeros(3)},
        "dec": {"w": ost.Transpose(w), "b": jnp.zeros(6)},
        "again": [w],
    }
    data = jnp.asarray(rng.normal(size=(BATCHES, 16, 6)))
    return model, [data[i] for i in range(BATCHES)], data


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def state_size(state):
    leaves = jax.tree_util.tree_leaves(state)
    return len(leaves), [(x.shape, x.dtype) for x in leaves], sum(x.nbytes for x in leaves)


def train(jitted):
    """10,000 steps; what the checks need, measured along the way."""
    model, batches, _ = start()
    state = ost.setup(ost.Adam(LR, betas=BETAS), model)
    size = state_size(state)
    traces = []
    if jitted:

        @jax.jit
        def step(state, model, x):
            traces.append(1)
            return ost.update(state, model, jax.grad(loss)(model, x))
    else:
        gradient = jax.jit(jax.grad(loss))  # the user's compiled gradient; update runs eagerly

        def step(state, model, x):
            return ost.update(state, model, gradient(model, x))

    facts = {}
    with counting_compiles() as compiles:
        for i in range(STEPS):
            state, model = step(state, model, batches[i % BATCHES])
            if i == 0:
                facts["compiles_first"] = len(compiles)
            if i % BLOCK == BLOCK - 1:
                if jitted:  # tied positions are equal copies under jit: one array again
                    w = model["enc"]["w"]
                    assert np.array_equal(w, model["dec"]["w"].parent)
                    assert np.array_equal(w, model["again"][0])
                    model = ost.retie(state, model)
                jax.block_until_ready(model)
                facts.setdefault("live", []).append(len(jax.live_arrays()))
                facts.setdefault("rss", []).append(resident_bytes())
        facts["compiles_after_first"] = len(compiles) - facts["compiles_first"]
    facts["size"] = (size, state_size(state))
    facts["traces"] = len(traces)
    return state, model, facts


def reference():
    """optax's Adam on one weight, fed the three positions' gradients summed by hand."""
    model, _, data = start()
    params = {"w": model["enc"]["w"], "be": model["enc"]["b"], "bd": model["dec"]["b"]}
    tx = optax.adam(LR, b1=BETAS[0], b2=BETAS[1])

    def body(i, carry):
        params, opt_state = carry
        tied = {
            "enc": {"w": params["w"], "b": params["be"]},
            "dec": {"w": ost.Transpose(params["w"]), "b": params["bd"]},
            "again": [params["w"]],
        }
        g = jax.grad(loss)(tied, data[i % BATCHES])
        summed = g["enc"]["w"] + g["dec"]["w"].parent + g["again"][0]
        grads = {"w": summed, "be": g["enc"]["b"], "bd": g["dec"]["b"]}
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    run = jax.jit(lambda p: jax.lax.fori_loop(0, STEPS, body, (p, tx.init(p)))[0])
    return run(params)


@pytest.fixture(scope="module")
def ref():
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes
        return reference()


@pytest.fixture(scope="module", params=["eager", "jit"])
def run(request, ref):
    with jax.enable_x64(True):
        state, model, facts = train(jitted=request.param == "jit")
    return request.param, state, model, facts, ref


def test_no_compilation_after_the_first_step(run):
    mode, _, _, facts, _ = run
    assert facts["compiles_first"] >= 1
    assert facts["compiles_after_first"] == 0
    if mode == "jit":
        assert facts["traces"] == 1


def test_no_growth_of_memory(run):
    _, _, _, facts, _ = run
    # Exact, every 1000 steps: each step frees the arrays of the step before.
    assert facts["live"] == [facts["live"][0]] * (STEPS // BLOCK)
    # Loose, from the end of the warm-up to the end: the model and state are under 2 KB, and
    # allocators take and return memory in chunks of a few MB, while a leak of one small array
    # (about 1 KB with its Python object) per step would add some 9 MB. 8 MB separates the two.
    assert facts["rss"][-1] - facts["rss"][0] < 8 * 2**20


def test_the_state_keeps_its_size(run):
    _, _, _, facts, _ = run
    before, after = facts["size"]
    assert after == before


def test_the_tie_does_not_drift(run):
    mode, state, model, _, _ = run
    w = model["enc"]["w"]
    if mode == "jit":
        assert np.array_equal(w, model["dec"]["w"].parent)
        assert np.array_equal(w, model["again"][0])
        model = ost.retie(state, model)
        w = model["enc"]["w"]
    assert model["dec"]["w"].parent is w
    assert model["again"][0] is w


def test_the_trained_weights_equal_optax_on_the_single_weight(run):
    _, state, model, _, ref = run
    assert int(state.step) == STEPS
    assert int(state.states[0].count) == STEPS
    # float64: each step rounds at about 1e-16 relative; over 10,000 steps of a training run that
    # contracts towards a minimum, the two computations stay within a few thousand roundings.
    for ours, theirs in [
        (model["enc"]["w"], ref["w"]),
        (model["enc"]["b"], ref["be"]),
        (model["dec"]["b"], ref["bd"]),
    ]:
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("placement", ["committed", "sharded", "uncommitted, many leaves"])
def test_committed_and_sharded_parameters_compile_once(placement):
    """A compiled step returns arrays committed to the parameters' devices; the state made by
    ``setup`` must be so from the start, or the second step compiles again. With many leaves of
    one shape ``setup`` makes the state in one compiled call, whose committed outputs sit beside
    parameters that are not committed: the step commits them all on the first call."""
    if placement.startswith("uncommitted"):
        model = {f"w{i:03d}": jnp.full((3,), float(i)) for i in range(100)}
        grads = {name: jnp.ones(3) for name in model}
    else:
        if placement == "sharded":
            mesh = jax.make_mesh((2,), ("x",))
            where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        else:
            where = jax.devices()[1]
        w = jax.device_put(jnp.ones((4, 3)), where)
        model = {"w": w, "t": ost.Transpose(w)}
        grads = {"w": jnp.ones((4, 3)), "t": ost.Transpose(jnp.ones((4, 3)))}
    state = ost.setup(ost.Adam(1e-2), model)
    with counting_compiles() as compiles:
        for i in range(3):
            state, model = ost.update(state, model, grads)
            if i == 0:
                first = len(compiles)
    assert first >= 1
    assert len(compiles) == first
    if placement.startswith("uncommitted"):
        return
    assert model["w"].sharding.is_equivalent_to(w.sharding, w.ndim)
