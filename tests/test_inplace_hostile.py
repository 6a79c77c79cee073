"""``update_`` where inputs are hostile: gradients that are parameters or states, kernels that
fail, sparse gradients, meta tensors, ``np.matrix`` (issue 12 items 3, 4, 6, 7; issue 15 item 7).

References: the pure ``update`` on an identical copy (its arithmetic checked against optax and
``torch.optim`` elsewhere), hand arithmetic, and ``torch.optim.Adam`` on the dense gradient.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import optstate as ost
from optstate.interop import torch as ost_torch
from optstate.rules import _fused, _inplace

LR = 0.05
IN_PLACE = {  # every rule with an in-place or fused form
    "descent": ost.Descent(LR),
    "momentum": ost.Momentum(LR, momentum=0.9),
    "nesterov": ost.Nesterov(LR, momentum=0.9),
    "adam": ost.Adam(LR),
    "adamw": ost.AdamW(LR, weight_decay=0.1),
    "adagrad": ost.AdaGrad(LR, lr_decay=0.01, initial_accumulator=0.1),
}


def as_numpy(x: Any) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


# -- 12.3: gradients that are parameters --------------------------------------------------------


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(
    ("rule", "u", "v"),
    [
        # u - 0.5 v and v - 0.5 u, both from the values before the step.
        (ost.Descent(0.5), [-0.5, 0.0], [2.5, 3.0]),
        # Nesterov's first step: b = g, p - lr (g + mu b) = p - 0.95 g.
        (ost.Nesterov(0.5, momentum=0.9), [-1.85, -1.8], [2.05, 2.1]),
    ],
    ids=["descent", "nesterov"],
)
def test_gradient_of_sum_u_times_v_is_the_other_parameter(rule, u, v, backend):
    """The hand-written gradient of ``sum(u * v)``: du = v and dv = u, the very arrays."""
    make = torch.tensor if backend == "torch" else np.array
    model = {"u": make([1.0, 2.0], dtype=torch.float64 if backend == "torch" else np.float64)}
    model["v"] = make([3.0, 4.0], dtype=model["u"].dtype)
    state = ost.setup(rule, model)
    _, pure = ost.update(state, model, {"u": model["v"], "v": model["u"]})
    ost.update_(state, model, {"u": model["v"], "v": model["u"]})
    for key, expected in (("u", u), ("v", v)):
        np.testing.assert_allclose(as_numpy(pure[key]), expected, rtol=1e-14)
        np.testing.assert_allclose(as_numpy(model[key]), expected, rtol=1e-14)


def world(backend: str, rule: ost.Rule, seed: int) -> tuple[dict[str, Any], ost.State]:
    """Three 2x2 parameters, ``a`` also seen as its transpose (a view), and their state."""
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(2, 2)) for _ in range(3)]
    if backend == "torch":
        arrays = [torch.from_numpy(x) for x in arrays]
    a, b, c = arrays
    model = {"a": a, "at": a.T, "b": b, "c": c}
    return model, ost.setup(rule, model)


NAMES = ["a", "at", "b", "c"]
PARAMS = {"a": 0, "at": 0, "b": 1, "c": 2}  # the parameter of each name (key order: a, b, c)


def resolve(choice: tuple[str, Any], model: dict[str, Any], state: ost.State, fresh: Any) -> Any:
    """A gradient that is a new array, a parameter, a view of one, or one of the state's arrays,
    taken from this model and state."""
    kind, which = choice
    if kind == "fresh":
        return fresh
    if kind == "param":
        return model[which]
    if kind == "view":
        return model[which].T
    if kind == "state":
        k, j = which
        arrays = [x for x in leaves(state.states[k]) if x.ndim == 2]
        return arrays[j % len(arrays)] if arrays else fresh
    return None


CHOICE = st.one_of(
    st.tuples(st.just("fresh"), st.none()),
    st.tuples(st.just("none"), st.none()),
    st.tuples(st.just("param"), st.sampled_from(NAMES)),
    st.tuples(st.just("view"), st.sampled_from(NAMES)),
    st.tuples(st.just("state"), st.tuples(st.integers(0, 2), st.integers(0, 1))),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    backend=st.sampled_from(["numpy", "torch"]),
    name=st.sampled_from(list(IN_PLACE)),
    choices=st.lists(st.fixed_dictionaries(dict.fromkeys(NAMES, CHOICE)), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_update_in_place_equals_update_under_any_aliasing(backend, name, choices, seed):
    """Each position's gradient may be any parameter (or its view) or any state array, of this
    very model: ``update_`` must give what ``update`` gives on an identical copy."""
    rule = IN_PLACE[name]
    ours, state = world(backend, rule, seed)
    pure, pure_state = world(backend, rule, seed)
    rng = np.random.default_rng(seed + 1)
    for step in choices:
        fresh = {n: rng.normal(size=(2, 2)) for n in NAMES}
        if backend == "torch":
            fresh = {n: torch.from_numpy(x) for n, x in fresh.items()}
        grads = {n: resolve(step[n], ours, state, fresh[n]) for n in NAMES}
        pure_grads = {n: resolve(step[n], pure, pure_state, fresh[n]) for n in NAMES}
        state, ours = ost.update_(state, ours, grads)
        pure_state, pure = ost.update(pure_state, pure, pure_grads)
    for n in NAMES:
        np.testing.assert_allclose(as_numpy(ours[n]), as_numpy(pure[n]), rtol=1e-12, atol=1e-14)
    for mine, theirs in zip(leaves(state.states), leaves(pure_state.states), strict=True):
        np.testing.assert_allclose(as_numpy(mine), as_numpy(theirs), rtol=1e-12, atol=1e-14)
    assert int(state.step) == int(pure_state.step)


# -- 12.6: a failed step changes nothing --------------------------------------------------------

KERNELS = [  # the step's one write, the fused kernels' count moves, and the fused kernels
    *(f"_inplace.{name}" for name in ("values", "count_", "commit_")),
    "torch._fused_adam_",
    "torch._fused_adamw_",
    "torch._fused_adagrad_",
]  # fmt: skip


def failing(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a kernel failed")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(IN_PLACE))
def test_a_kernel_that_raises_leaves_every_array_and_count_unchanged(name, backend, monkeypatch):
    model, state = world(backend, IN_PLACE[name], 3)
    rng = np.random.default_rng(4)
    to = torch.from_numpy if backend == "torch" else np.asarray
    grads = {n: to(rng.normal(size=(2, 2))) for n in NAMES}
    state, model = ost.update_(state, model, grads)  # counts and moments away from their start
    raised = 0
    for kernel in KERNELS:
        module, attr = kernel.split(".")
        params = {n: as_numpy(x).copy() for n, x in model.items()}
        arrays = [as_numpy(x).copy() for x in leaves(state.states)]
        with monkeypatch.context() as patch:
            patch.setattr(_inplace if module == "_inplace" else torch, attr, failing)
            try:
                ost.update_(state, model, grads)
            except RuntimeError as err:
                failure = str(err)
            else:
                continue  # this rule does not use that kernel here
        assert failure == "a kernel failed"
        raised += 1
        for n, x in model.items():
            np.testing.assert_array_equal(as_numpy(x), params[n], err_msg=f"{kernel}: {n}")
        for now, then in zip(leaves(state.states), arrays, strict=True):
            np.testing.assert_array_equal(as_numpy(now), then, err_msg=kernel)
        assert int(state.step) == 1
    # A fused kernel moves the counts and runs (two calls that can fail); the rules' own
    # arithmetic writes with the one commit.
    fused = backend == "torch" and name in ("adam", "adamw", "adagrad")
    assert raised >= (2 if fused else 1)


# -- 12.6 / 15.7: sparse gradients -------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "adamw", "momentum"])
def test_sparse_embedding_gradient_steps_as_its_dense_equal(name):
    """``nn.Embedding(sparse=True)``: ``update_`` equals ``torch.optim`` on the dense gradient."""
    make = {
        "adam": lambda ps: torch.optim.Adam(ps, lr=LR),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1),
        "momentum": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=0.9),
    }[name]
    torch.manual_seed(0)
    ours = nn.Embedding(7, 3, sparse=True).double()
    ref = copy.deepcopy(ours)
    opt = make(list(ref.parameters()))
    state = ost.setup(IN_PLACE[name], ours)
    for step in range(4):
        x = torch.tensor([step % 7, (3 * step + 1) % 7])
        ours.zero_grad()
        ref.zero_grad()
        ours(x).pow(2).sum().backward()
        ref(x).pow(2).sum().backward()
        assert ours.weight.grad.layout == torch.sparse_coo
        ref.weight.grad = ref.weight.grad.to_dense()
        state, ours = ost.update_(state, ours, ost_torch.grad_totals(ours))
        opt.step()
    torch.testing.assert_close(ours.weight, ref.weight, rtol=1e-12, atol=1e-14)
    if name.startswith("adam"):
        assert int(state.states[0].count) == 4


# -- 12.7 / 15.7: the meta device, and devices ---------------------------------------------------


def test_a_module_on_the_meta_device_is_refused_at_setup():
    with pytest.raises(TypeError, match=r"model\['weight'\] is on the meta device \(torch.float32"):
        ost.setup(ost.Adam(), nn.Linear(3, 2, bias=False, device="meta"))


@pytest.mark.parametrize("in_place", [True, False])
def test_meta_parameters_or_gradients_are_refused_at_update(in_place):
    net = nn.Linear(3, 2, bias=False)
    state = ost.setup(ost.Adam(), net)
    step = ost.update_ if in_place else ost.update
    with pytest.raises(TypeError, match=r"model\['weight'\] is on the meta device \(torch.float32"):
        step(state, copy.deepcopy(net).to("meta"), {"weight": torch.ones(2, 3)})
    before = net.weight.detach().clone()
    with pytest.raises(ValueError, match=r"gradient at grads\['weight'\] is a tensor on the meta"):
        step(state, net, {"weight": torch.ones(2, 3, device="meta")})
    torch.testing.assert_close(net.weight.detach(), before, rtol=0, atol=0)
    assert int(state.states[0].count) == 0


def test_a_state_on_another_device_than_its_parameter_is_named():
    model = {"w": torch.ones(3)}
    state = ost.setup(ost.Adam(0.1), model)
    moved = state.states[0]._replace(mu=torch.zeros(3, device="meta"))
    state = ost.State([moved], state.hyper, state.clocks, state.step, state.plan)
    for step in (ost.update_, ost.update):
        with pytest.raises(ValueError, match=r"state of model\['w'\] holds a tensor on meta, but"):
            step(state, model, {"w": torch.ones(3)})
    np.testing.assert_array_equal(model["w"].numpy(), np.ones(3))
    assert int(state.states[0].count) == 0


def test_the_fused_kernel_takes_one_device_only():
    """Tensors on two devices (meta beside cpu stands in for two GPUs) are no fused group: the
    step takes the foreach form, which handles each tensor on its own device."""

    def cpu() -> list[torch.Tensor]:
        return [torch.zeros(2), torch.zeros(2)]

    def two_devices() -> list[torch.Tensor]:
        return [torch.zeros(2), torch.zeros(2, device="meta")]

    count = [torch.zeros((), dtype=torch.int32)] * 2
    assert _fused.fits(cpu(), cpu(), [cpu(), cpu()], count)
    assert not _fused.fits(two_devices(), cpu(), [cpu(), cpu()], count)
    assert not _fused.fits(cpu(), two_devices(), [cpu(), cpu()], count)
    assert not _fused.fits(cpu(), cpu(), [cpu(), two_devices()], count)
    params = cpu()
    assert not _fused.fits(params, params[::-1], [cpu(), cpu()], count)  # aliased: foreach


# -- 12.4: np.matrix ----------------------------------------------------------------------------


def matrix(x: np.ndarray) -> np.matrix:
    """``np.matrix`` (NumPy warns that it is deprecated: the reason it is still met, from
    ``scipy.sparse``'s ``todense()``, is outside the user's hands)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        return np.asmatrix(x)


MATRIX_RULES = {
    "adam": ost.Adam(0.1),
    "adagrad": ost.AdaGrad(0.1),
    "rmsprop": ost.RMSProp(0.1),
    "momentum": ost.Momentum(0.1),
}


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("name", list(MATRIX_RULES))
def test_np_matrix_gradients_step_as_ndarrays(name, in_place):
    """``scipy.sparse``'s ``todense()`` gives an ``np.matrix``, whose ``g * g`` is ``g @ g``."""
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    ours, ref = {"w": np.ones((2, 2))}, {"w": np.ones((2, 2))}
    state, ref_state = ost.setup(MATRIX_RULES[name], ours), ost.setup(MATRIX_RULES[name], ref)
    step = ost.update_ if in_place else ost.update
    for _ in range(2):
        state, ours = step(state, ours, {"w": matrix(g)})
        ref_state, ref = ost.update(ref_state, ref, {"w": g})
    assert type(ours["w"]) is np.ndarray
    np.testing.assert_array_equal(ours["w"], ref["w"])


def test_np_matrix_parameters_are_refused():
    with pytest.raises(TypeError, match=r"model\['w'\] is an np.matrix.*np.asarray"):
        ost.setup(ost.Adam(), {"w": matrix(np.ones((2, 2)))})
    state = ost.setup(ost.Adam(), {"w": np.ones((2, 2))})
    with pytest.raises(TypeError, match=r"model\['w'\] is an np.matrix"):
        ost.update_(state, {"w": matrix(np.ones((2, 2)))}, {"w": np.ones((2, 2))})


# -- the per-step checks of a model update_ returned ---------------------------------------------


def test_a_module_changed_in_place_after_update_is_still_refused():
    """``update_`` returns the model's own tensors, which later steps recheck only for what can
    change in place: ``module.half()`` keeps the Parameter objects and changes their dtype."""
    net = nn.Linear(3, 2)
    state = ost.setup(ost.Adam(0.1), net)
    grads = {"weight": torch.ones(2, 3), "bias": torch.ones(2)}
    state, net = ost.update_(state, net, grads)
    state, net = ost.update_(state, net, grads)
    net.half()
    half = {k: g.half() for k, g in grads.items()}
    with pytest.raises(ValueError, match=r"model\['bias'\] changed since setup: .*float16"):
        ost.update_(state, net, half)


def test_a_view_tie_broken_in_place_after_update_is_still_refused():
    w = torch.ones(2, 3)
    model = {"w": w, "wt": w.t()}
    state = ost.setup(ost.Descent(0.1), model)
    grads = {"w": torch.ones(2, 3), "wt": torch.ones(3, 2)}
    state, model = ost.update_(state, model, grads)
    w.data = torch.zeros(2, 3)  # w's memory is new; model["wt"] still views the old one
    with pytest.raises(ost.TieError, match=r"tie between model\['w'\] and model\['wt'\] is broken"):
        ost.update_(state, model, grads)


def test_the_parameters_of_a_module_that_shares_submodules():
    """``parameters`` walks the module itself: the same names, objects and order as torch's
    ``named_parameters(remove_duplicate=False)``, shared submodules and Parameters included."""
    emb = nn.Embedding(5, 4)
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.LayerNorm(4))
    net = nn.Sequential(emb, block, nn.Sequential(block, nn.Linear(4, 5, bias=False)))
    net[2][1].weight = emb.weight
    ours = ost_torch.parameters(net)
    theirs = dict(net.named_parameters(remove_duplicate=False))
    assert list(ours) == list(theirs)
    assert all(ours[k] is theirs[k] for k in ours)
    totals = ost_torch.grad_totals(net)
    assert [k for k, v in totals.items() if v is None] == list(theirs)  # no .grad yet
    net(torch.tensor([1, 2])).sum().backward()
    totals = ost_torch.grad_totals(net)
    assert totals["0.weight"] is emb.weight.grad
    assert totals["2.1.weight"] is None  # the tied Parameter's total, counted once
    assert totals["2.0.0.weight"] is None  # the shared block: counted at its first name
    assert totals["1.0.weight"] is block[0].weight.grad


def test_a_non_parameter_made_a_parameter_in_place_after_update_is_refused():
    model = {"w": torch.ones(2), "n": torch.zeros(2, dtype=torch.int64)}
    state = ost.setup(ost.Descent(0.1), model)
    state, model = ost.update_(state, model, {"w": torch.ones(2), "n": None})
    model["n"].data = torch.zeros(2)  # the same object, now floating: a parameter
    with pytest.raises(ValueError, match=r"model\['n'\] holds a parameter .* not there at setup"):
        ost.update_(state, model, {"w": torch.ones(2), "n": None})
