"""Rule groups: rules that look across parameters see all of their group, whatever per-subtree
rules and ``adjust`` did; hyper-parameters can vary by path inside one group.

Oracles: optax's ``chain`` of ``clip_by_global_norm`` with ``multi_transform``, ``apply_if_finite``
and ``adamw`` with a mask, on the model written with each tied weight once and its gradients summed
by hand.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost
from optstate.interop.optax import from_optax


@pytest.fixture(autouse=True)
def float64():
    """optax computes the oracle in float64 too."""
    with jax.enable_x64(True):
        yield


def tied(w, b):
    """A model with ``w`` at a plain and a transposed position, and a bias."""
    return {"w": w, "wt": ost.Transpose(w), "b": b}


def tied_grads(gw, gwt, gb):
    return {"w": gw, "wt": ost.Transpose(gwt), "b": gb}


W = np.array([[0.3, -0.2], [0.1, 0.4]])
B = np.array([0.5, -0.5])
GW = [np.array([[0.6, 0.3], [-0.9, 0.2]]), np.array([[-0.1, 0.8], [0.4, 0.4]])]
GWT = [np.array([[0.2, -0.4], [0.5, 0.1]]), np.array([[0.3, 0.3], [-0.2, 0.6]])]
GB = [np.array([1.5, -2.0]), np.array([0.25, 0.75])]


def optax_run(tx, steps=2, nan_at=None):
    """optax on the de-duplicated model ``{"w", "b"}`` with the tied gradients summed."""
    params = {"w": jnp.asarray(W), "b": jnp.asarray(B)}
    with jax.numpy_dtype_promotion("standard"):
        return _optax_steps(tx, params, steps, nan_at)


def _optax_steps(tx, params, steps, nan_at):
    opt = tx.init(params)
    for i in range(steps):
        gw = GW[i] + GWT[i]
        if nan_at == i:
            gw = gw.copy()
            gw[0, 0] = np.nan
        grads = {"w": jnp.asarray(gw), "b": jnp.asarray(GB[i])}
        updates, opt = tx.update(grads, opt, params)
        params = optax.apply_updates(params, updates)
    return params


def ours(state, model, steps=2, nan_at=None):
    for i in range(steps):
        gw = GW[i].copy()
        if nan_at == i:
            gw[0, 0] = np.nan
        state, model = ost.update(state, model, tied_grads(gw, GWT[i], GB[i]))
    return state, model


def assert_matches(model, params, rtol=1e-12):
    np.testing.assert_allclose(model["w"], params["w"], rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(model["b"], params["b"], rtol=rtol, atol=1e-14)
    assert model["wt"].parent is model["w"]


LABELS = {"w": "w", "b": "b"}


def test_adjust_of_a_subset_keeps_a_global_clip_global():
    model = tied(W.copy(), B.copy())
    state = ost.setup(ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent(1.0)), model)
    state = ost.adjust(state, "b", lr=0.5)
    _, new = ours(state, model)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"w": optax.sgd(1.0), "b": optax.sgd(0.5)}, LABELS),
    )
    assert_matches(new, optax_run(tx))


def test_adjust_with_the_same_value_changes_nothing():
    """The issue's case: adjusting a subset to the lr it already has must not split the clip."""
    model = {"w": np.array([3.0]), "b": np.array([4.0])}
    state = ost.setup(ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent(1.0)), model)
    adjusted = ost.adjust(state, "b", lr=1.0)
    grads = {"w": np.array([3.0]), "b": np.array([4.0])}
    _, before = ost.update(state, model, grads)
    _, after = ost.update(adjusted, model, grads)
    np.testing.assert_allclose(after["w"], [3.0 - 0.6])
    np.testing.assert_allclose(after["b"], [4.0 - 0.8])
    np.testing.assert_array_equal(after["w"], before["w"])


def test_adjust_of_a_subset_keeps_skip_non_finite_joint():
    model = tied(W.copy(), B.copy())
    state = ost.setup(ost.SkipNonFinite(ost.Momentum(0.1, momentum=0.9)), model)
    state = ost.adjust(state, "b", lr=0.05)
    state, new = ours(state, model, steps=2, nan_at=0)
    inner = optax.multi_transform(
        {"w": optax.sgd(0.1, momentum=0.9), "b": optax.sgd(0.05, momentum=0.9)}, LABELS
    )
    tx = optax.apply_if_finite(inner, max_consecutive_errors=10)
    assert_matches(new, optax_run(tx, steps=2, nan_at=0))
    assert int(state.states[0].skipped) == 1
    assert int(state.states[1].skipped) == 1


def test_a_shared_hyper_parameter_cannot_be_adjusted_for_a_subset():
    model = tied(W.copy(), B.copy())
    state = ost.setup(ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent(1.0)), model)
    snapshot = jax.tree_util.tree_map(np.copy, (state.hyper, state.states))
    with pytest.raises(ValueError, match=r"max_norm of .*ClipGlobalNorm.* applies to all 2 "):
        ost.adjust(state, "b", max_norm=2.0)
    for a, b in zip(
        jax.tree_util.tree_leaves(snapshot),
        jax.tree_util.tree_leaves((state.hyper, state.states)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    whole = ost.adjust(state, max_norm=2.0)  # the whole group: fine
    assert ost.hyperparams(whole)["b"][0]["max_norm"] == 2.0


def test_from_optax_across_parameters_refuses_a_subset():
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    )
    model = tied(jnp.asarray(W), jnp.asarray(B))
    state = ost.setup(from_optax(tx), model)
    with pytest.raises(ValueError, match="learning_rate of OptaxRule applies to all 2"):
        ost.adjust(state, "b", learning_rate=0.5)
    state = ost.adjust(state, learning_rate=0.5)
    _, new = ours(state, model)
    expected = optax_run(optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5)), steps=2)
    np.testing.assert_allclose(new["w"], expected["w"], rtol=1e-6)
    np.testing.assert_allclose(new["b"], expected["b"], rtol=1e-6)


def test_per_subtree_values_share_one_global_clip():
    """Rules of one structure given by a function of the path: one group, one global norm."""
    model = tied(W.copy(), B.copy())
    rule = lambda path: ost.OptimiserChain(  # noqa: E731
        ost.ClipGlobalNorm(1.0), ost.Descent(0.5 if path[-1] == "b" else 1.0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = ost.setup(rule, model)
    _, new = ours(state, model)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform({"w": optax.sgd(1.0), "b": optax.sgd(0.5)}, LABELS),
    )
    assert_matches(new, optax_run(tx))
    assert ost.hyperparams(state) == {
        "b": ({"max_norm": 1.0}, {"lr": 0.5}),
        "w": ({"max_norm": 1.0}, {"lr": 1.0}),
    }


def test_the_transformer_recipe_equals_optax():
    """Warm-up + cosine, one global clip, weight decay off biases and norm scales, on a tied
    language model: optax's ``chain(clip_by_global_norm, adamw(sched, wd, mask))``."""
    rng = np.random.default_rng(0)
    vocab, width = 11, 6
    emb = rng.normal(size=(vocab, width)) * 0.3
    model = {
        "embed": emb,
        "block": {"kernel": rng.normal(size=(width, width)) * 0.3, "bias": np.zeros(width)},
        "norm": {"scale": np.ones(width)},
        "head": ost.Transpose(emb),
    }
    tokens = rng.integers(0, vocab, size=12)

    def loss(m):
        h = jnp.asarray(m["embed"])[tokens[:-1]]
        h = jnp.tanh(h @ m["block"]["kernel"] + m["block"]["bias"][None, :])
        h = h * m["norm"]["scale"][None, :]
        logits = h @ m["head"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(tokens) - 1), tokens[1:]])

    sched = ost.schedules.warmup_cosine(3e-2, warmup_steps=3, decay_steps=10, end=3e-3)
    no_decay = ("bias", "scale")
    norms = []

    def rule(path):
        decay = 0.0 if path[-1] in no_decay else 0.1
        return ost.OptimiserChain(ost.ClipGlobalNorm(CLIP), ost.AdamW(sched, weight_decay=decay))

    state = ost.setup(rule, model)
    params = {k: v for k, v in model.items() if k != "head"}
    mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in no_decay, params)
    tx = optax.chain(
        optax.clip_by_global_norm(CLIP),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 3e-2, 3, 10, 3e-3),
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            mask=mask,
        ),
    )
    opt = tx.init(params)

    def dedup_loss(p):
        return loss({**p, "head": ost.Transpose(p["embed"])})

    for _ in range(12):
        grads = jax.grad(loss)(model)
        state, model = ost.update(state, model, grads)
        g = jax.grad(dedup_loss)(params)
        norms.append(float(optax.tree.norm(g)))
        with jax.numpy_dtype_promotion("standard"):  # optax mixes its int count with floats
            updates, opt = tx.update(g, opt, params)
            params = optax.apply_updates(params, updates)
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        ours_x = model
        for key in path:
            ours_x = ours_x[key.key]
        # optax evaluates its schedule in float32, even under x64: hence not 1e-12
        np.testing.assert_allclose(ours_x, x, rtol=1e-6, atol=1e-8, err_msg=str(path))
    assert model["head"].parent is model["embed"]
    assert min(norms) > 2 * CLIP  # the clip acted at every step: the test can tell one from two


CLIP = 0.05


def test_separate_structures_with_global_rules_warn():
    model = {"enc": np.ones(2), "dec": np.ones(2)}
    spec = {
        "enc": ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Adam()),
        "dec": ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent(0.1)),
    }
    with pytest.warns(ost.GroupSplitWarning, match=r"2 such groups.*model\['dec'\]"):
        ost.setup(spec, model)
    with warnings.catch_warnings():  # one group with a clip beside rules without one: no split
        warnings.simplefilter("error")
        ost.setup({"enc": spec["enc"], "dec": ost.Descent(0.1)}, model)


def test_hyperparams_per_subtree_and_after_adjust():
    model = {"enc": {"w": np.ones(2)}, "dec": {"w": np.ones(2), "b": np.zeros(2)}}
    state = ost.setup({"enc": ost.Adam(1e-3), "dec": ost.Descent(0.1)}, model)
    state = ost.adjust(state, "dec/b", lr=0.01)
    assert ost.hyperparams(state) == {
        "dec/b": {"lr": 0.01},
        "dec/w": {"lr": 0.1},
        "enc/w": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
    }
    assert ost.hyperparams(state, "enc") == {
        "enc/w": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    }
    grads = jax.tree_util.tree_map(np.ones_like, model)
    _, new = ost.update(state, model, grads)
    np.testing.assert_allclose(new["dec"]["b"], -0.01)
    np.testing.assert_allclose(new["dec"]["w"], 0.9)


def test_adjusting_every_subset_back_drops_unused_variants():
    model = {"a": np.ones(2), "b": np.ones(2)}
    state = ost.setup(ost.Descent(1.0), model)
    split = ost.adjust(ost.adjust(state, "a", lr=0.5), "b", lr=0.25)
    assert len(split.hyper[0]) == 2  # the original values are used by nobody: dropped
    assert ost.hyperparams(split) == {"a": {"lr": 0.5}, "b": {"lr": 0.25}}
