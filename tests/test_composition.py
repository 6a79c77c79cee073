"""Rules per subtree or by path, freeze / thaw, and adjust."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optstate as ost


def model_():
    w = jnp.arange(6.0).reshape(2, 3) / 10
    return {
        "encoder": {"w": w, "b": jnp.zeros(3)},
        "decoder": {"w": ost.Transpose(w), "b": jnp.zeros(2)},
    }


def ones(model):
    return jax.tree_util.tree_map(jnp.ones_like, model)


def test_a_tree_of_rules_matching_the_model():
    model = {"encoder": {"w": jnp.ones(2), "b": jnp.ones(2)}, "decoder": {"w": jnp.ones(3)}}
    rules = {"encoder": ost.Descent(0.5), "decoder": ost.Momentum(0.25)}
    state = ost.setup(rules, model)
    assert len(state.plan.rules) == 2
    _, new = ost.update(state, model, ones(model))
    np.testing.assert_allclose(new["encoder"]["w"], 0.5)
    np.testing.assert_allclose(new["decoder"]["w"], 0.75)


def test_a_function_of_the_path():
    """No weight decay on biases: the usual optax ``masked`` recipe, as a function of the path."""
    model = {
        "enc": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
        "dec": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)},
    }
    paths = []

    def rule_for(path):
        paths.append(path)
        return ost.AdamW(1e-2, weight_decay=0.5 if path[-1] == "w" else 0.0)

    state = ost.setup(rule_for, model)
    assert sorted(paths) == [("dec", "b"), ("dec", "w"), ("enc", "b"), ("enc", "w")]
    tx = optax.adamw(
        1e-2, weight_decay=0.5, mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim == 2, p)
    )
    with jax.numpy_dtype_promotion("standard"):
        updates, _ = tx.update(ones(model), tx.init(model), model)
    _, new = ost.update(state, model, ones(model))
    expected = optax.apply_updates(model, updates)
    for a, b in zip(
        jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_none_leaves_parameters_untrained():
    model = {"frozen": jnp.ones(2), "trained": jnp.ones(2)}
    state = ost.setup({"frozen": None, "trained": ost.Descent(1.0)}, model)
    _, new = ost.update(state, model, ones(model))
    assert new["frozen"] is model["frozen"]
    np.testing.assert_allclose(new["trained"], 0.0)


def test_a_tie_given_two_rules_is_an_error():
    with pytest.raises(
        ost.TieError,
        match=r"model\['decoder'\]\['w'\] and model\['encoder'\]\['w'\] hold one parameter but "
        r"were given different rules: Adam\(.*\) and Descent",
    ):
        ost.setup({"encoder": ost.Descent(0.1), "decoder": ost.Adam()}, model_())


def test_equal_rules_on_a_tie_are_fine():
    state = ost.setup({"encoder": ost.Adam(1e-3), "decoder": ost.Adam(1e-3)}, model_())
    assert len(state.plan.rules) == 1


def test_rule_tree_errors():
    with pytest.raises(ost.StructureError, match="not a prefix of the model"):
        ost.setup({"encoder": ost.Adam(), "other": ost.Adam()}, model_())
    with pytest.raises(TypeError, match=r"rules\['decoder'\] is 0.1"):
        ost.setup({"encoder": ost.Adam(), "decoder": 0.1}, model_())
    with pytest.raises(TypeError, match=r"returned 'adam' for the path \('decoder', 'b'\)"):
        ost.setup(lambda path: "adam", model_())


# -- freeze / thaw ---------------------------------------------------------------------------


def test_freeze_one_position_of_a_tie_freezes_the_parameter():
    model = model_()
    state = ost.setup(ost.Adam(1e-2), model)
    frozen = ost.freeze(state, "decoder/w")
    assert "1 frozen" in repr(frozen)
    s, new = ost.update(frozen, model, ones(model))
    assert new["encoder"]["w"] is model["encoder"]["w"]  # frozen through the tie
    assert new["decoder"]["w"].parent is model["encoder"]["w"]
    assert not np.allclose(new["decoder"]["b"], model["decoder"]["b"])  # the rest trains
    w_index = state.plan.slots[1].param  # positions: decoder.b, decoder.w, encoder.b, encoder.w
    assert int(s.states[w_index].count) == 0  # and its state does not advance
    thawed = ost.thaw(s)
    _, new = ost.update(thawed, new, ones(model))
    assert not np.allclose(new["encoder"]["w"], model["encoder"]["w"])


def test_freeze_by_predicate_and_by_tuple():
    model = model_()
    state = ost.setup(ost.Descent(1.0), model)
    by_pred = ost.freeze(state, lambda path: path[-1] == "b")
    by_tuple = ost.freeze(state, ("encoder", "b"))
    _, a = ost.update(by_pred, model, ones(model))
    _, b = ost.update(by_tuple, model, ones(model))
    assert a["encoder"]["b"] is model["encoder"]["b"]
    assert a["decoder"]["b"] is model["decoder"]["b"]
    assert b["encoder"]["b"] is model["encoder"]["b"]
    np.testing.assert_allclose(b["decoder"]["b"], -1.0)
    with pytest.raises(ValueError, match="selects no parameter"):
        ost.freeze(state, "nothing/here")


# -- adjust ----------------------------------------------------------------------------------


def test_adjust_changes_hyper_parameters_and_keeps_moments():
    model = {"w": jnp.ones(3)}
    g = {"w": jnp.asarray([1.0, -2.0, 0.5])}
    state = ost.setup(ost.Adam(1e-1), model)
    state, model = ost.update(state, model, g)
    adjusted = ost.adjust(state, lr=1e-2, betas=(0.5, 0.75))
    assert adjusted.states is state.states
    # optax: inject the same hyper-parameters after one step with the old ones.
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-1)
    params = {"w": jnp.ones(3)}
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(params)
        updates, opt_state = tx.update(g, opt_state)
        params = optax.apply_updates(params, updates)
        opt_state.hyperparams.update(learning_rate=1e-2, b1=0.5, b2=0.75)
        updates, opt_state = tx.update(g, opt_state)
        params = optax.apply_updates(params, updates)
    _, model = ost.update(adjusted, model, g)
    np.testing.assert_allclose(model["w"], params["w"], rtol=1e-6)


def test_adjust_does_not_recompile():
    model = {"w": jnp.ones(3)}
    state = ost.setup(ost.OptimiserChain(ost.WeightDecay(1e-3), ost.Momentum(0.1)), model)
    traces = []

    @jax.jit
    def step(state, model):
        traces.append(1)
        return ost.update(state, model, {"w": jnp.ones(3)})

    for lr in (0.1, 0.01, 0.001):
        state = ost.adjust(state, lr=lr, weight_decay=lr)
        state, model = step(state, model)
    assert len(traces) == 1
    assert ost.hyperparams(state)["w"][1]["lr"] == pytest.approx(0.001)


def test_adjust_where_splits_a_rule():
    model = {"a": jnp.ones(2), "b": jnp.ones(2)}
    state = ost.setup(ost.Descent(1.0), model)
    state = ost.adjust(state, "b", lr=0.25)
    _, new = ost.update(state, model, ones(model))
    np.testing.assert_allclose(new["a"], 0.0)
    np.testing.assert_allclose(new["b"], 0.75)
    again = ost.adjust(state, "b", lr=0.5)  # now "b" has its own rule: changed in place
    assert again.plan == state.plan


def test_adjust_errors():
    state = ost.setup(ost.OptimiserChain(ost.ClipGrad(1.0), ost.Adam()), {"w": jnp.ones(2)})
    with pytest.raises(
        ValueError, match=r"unknown hyper-parameter\(s\) lrate .* valid: betas, delta, eps, lr"
    ):
        ost.adjust(state, lrate=0.1)
    with pytest.raises(TypeError, match="at least one hyper-parameter"):
        ost.adjust(state)
    bare = ost.setup(ost.SkipNonFinite(ost.Descent(0.1)), {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"lrr for SkipNonFinite\(Descent\); valid: lr"):
        ost.adjust(bare, lrr=0.1)
    ruleless = ost.setup({"w": None, "b": ost.Descent(0.1)}, {"w": jnp.ones(2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"selected parameters have no rule \(set up with None\)"):
        ost.adjust(ruleless, "w", lr=0.1)

    @dataclasses.dataclass(frozen=True)
    class Sign(ost.Rule):  # a rule without hyper-parameters
        def apply(self, hyper, state, param, grad):
            return state, jnp.sign(grad)

    with pytest.raises(ValueError, match="lr for Sign; Sign has no hyper-parameters"):
        ost.adjust(ost.setup(Sign(), {"w": jnp.ones(2)}), lr=0.1)
    with pytest.raises(TypeError, match="must be a real number or a schedule"):
        ost.adjust(state, lr="fast")
