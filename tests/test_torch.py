"""PyTorch: tied modules and tied views trained with optstate against ``torch.optim`` step for
step, with gradients from ``torch.func.grad`` (partials per name) and from ``backward()`` (totals
per Parameter); every rule on torch tensors against the same rule on NumPy arrays; views as ties;
the errors; the example.

References: ``torch.optim`` on the same module (its tie is the shared Parameter, which autograd and
the optimiser see once), hand-derived sums of partial gradients, and NumPy runs of the same rules.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from rules_under_test import RULES
from torch import nn
from torch.func import functional_call

import optstate as ost
from optstate.interop import torch as ost_torch

ROOT = Path(__file__).resolve().parents[1]
V, D = 11, 6  # vocabulary, width
LR, MOMENTUM, BETAS, EPS, WD = 0.05, 0.9, (0.9, 0.999), 1e-8, 0.1
STEPS = 6

# name -> (optstate rule, torch.optim optimiser for a list of Parameters)
OPTIMISERS = {
    "momentum": (
        ost.Momentum(LR, momentum=MOMENTUM),
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM),
    ),
    "nesterov": (
        ost.Nesterov(LR, momentum=MOMENTUM),
        lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, nesterov=True),
    ),
    "adam": (
        ost.Adam(LR, BETAS, EPS),
        lambda ps: torch.optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS),
    ),
    "adamw": (
        ost.AdamW(LR, BETAS, EPS, weight_decay=WD),
        lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD),
    ),
}
# float64 runs of the same arithmetic in another order (torch folds lr into the bias correction,
# optstate divides by it): both sides round each operation, about 1e-16 relative, and six steps
# of Adam amplify that by at most 1/(1 - beta1) each. 1e-12 stays far below any real difference
# (a tie counted twice moves a weight by about LR = 0.05).
TOL = 1e-12


class TiedLM(nn.Module):
    """A small language model whose output layer is its input embedding (one Parameter)."""

    def __init__(self, seed: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(V, D, dtype=dtype)
        self.mix = nn.Linear(D, D, dtype=dtype)
        self.head = nn.Linear(D, V, bias=False, dtype=dtype)
        self.head.weight = self.emb.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.5)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, V, (8,), generator=gen), torch.randint(0, V, (8,), generator=gen)


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


def partials(module: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """``torch.func.grad`` over every name: one partial gradient per name, tied names apart."""
    x, y = batch(step)

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm_loss(functional_call(module, params, (x,), tie_weights=False), y)

    grads: dict[str, torch.Tensor] = torch.func.grad(loss)(ost_torch.parameters(module))
    return grads


def totals(module: nn.Module, step: int) -> Any:
    """``backward()``: autograd's total per Parameter, in ``.grad``."""
    x, y = batch(step)
    module.zero_grad()
    lm_loss(module(x), y).backward()
    return ost_torch.grad_totals(module)


def reference_step(module: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    x, y = batch(step)
    opt.zero_grad()
    lm_loss(module(x), y).backward()
    opt.step()


def assert_close(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=TOL, atol=TOL, msg=name)


# -- a tied module against torch.optim ---------------------------------------------------------


@pytest.mark.parametrize("source", ["func_grad", "backward"])
@pytest.mark.parametrize("name", list(OPTIMISERS))
def test_tied_module_matches_torch_optim(name: str, source: str) -> None:
    rule, make = OPTIMISERS[name]
    ours, ref = TiedLM(0), TiedLM(0)
    opt = make(list(ref.parameters()))  # parameters() gives the tied Parameter once
    before = {n: id(p) for n, p in ost_torch.parameters(ours).items()}
    state = ost.setup(rule, ours)
    assert len(state.plan.params) == 3
    assert state.plan.n_ties == 1
    for step in range(STEPS):
        grads = partials(ours, step) if source == "func_grad" else totals(ours, step)
        state, returned = ost.update_(state, ours, grads)
        assert returned is ours
        reference_step(ref, opt, step)
        assert_close(ost_torch.parameters(ours), ost_torch.parameters(ref))
    # In place: the very same Parameters, still registered and still one object for both names.
    assert {n: id(p) for n, p in ost_torch.parameters(ours).items()} == before
    assert ours.head.weight is ours.emb.weight
    assert all(p.requires_grad and p.is_leaf for p in ours.parameters())


def test_partials_and_totals_give_the_same_steps() -> None:
    """The two conventions are one gradient: func.grad's partials, summed by optstate, and
    backward()'s totals, counted once, move the model the same way (float64 rounding apart)."""
    a, b = TiedLM(1), TiedLM(1)
    state_a = ost.setup(ost.Adam(LR), a)
    state_b = ost.setup(ost.Adam(LR), b)
    for step in range(3):
        state_a, a = ost.update_(state_a, a, partials(a, step))
        state_b, b = ost.update_(state_b, b, totals(b, step))
    assert_close(ost_torch.parameters(a), ost_torch.parameters(b))


def test_pure_update_of_a_module_returns_the_new_parameters() -> None:
    """``update`` leaves the module alone and returns a named dict, tied names sharing one new
    tensor, that ``functional_call`` runs; chained for several steps it follows torch.optim."""
    rule, make = OPTIMISERS["adamw"]
    module, ref = TiedLM(2), TiedLM(2)
    original = {n: p.detach().clone() for n, p in ost_torch.parameters(module).items()}
    opt = make(list(ref.parameters()))
    state = ost.setup(rule, module)
    params: dict[str, torch.Tensor] = ost_torch.parameters(module)
    for step in range(STEPS):
        x, y = batch(step)

        def loss(p: dict[str, torch.Tensor], x: torch.Tensor = x, y: torch.Tensor = y) -> Any:
            return lm_loss(functional_call(module, p, (x,), tie_weights=False), y)

        state, params = ost.update(state, params, torch.func.grad(loss)(params))
        reference_step(ref, opt, step)
    assert_close(params, ost_torch.parameters(ref))
    assert params["head.weight"] is params["emb.weight"]
    assert all(p.requires_grad and p.is_leaf for p in params.values())
    assert_close(ost_torch.parameters(module), original)  # the module was not touched

    # ``update`` on the module itself: the module is unchanged, the dict is returned.
    state = ost.setup(rule, module)
    state, new = ost.update(state, module, partials(module, 0))
    assert isinstance(new, dict)
    assert new["head.weight"] is new["emb.weight"]
    assert new["mix.weight"] is not module.mix.weight
    assert_close(ost_torch.parameters(module), original)
    logits = functional_call(module, new, (batch(0)[0],))  # tie_weights=True accepts one tensor
    assert logits.shape == (8, V)


def test_a_subset_of_names_from_the_deduplicated_dict() -> None:
    """``torch.func.grad`` over ``dict(named_parameters())`` (one name per Parameter, default
    ``tie_weights=True``) gives the total at the first name only; the other name is no gradient."""
    rule, make = OPTIMISERS["momentum"]
    ours, ref = TiedLM(3), TiedLM(3)
    opt = make(list(ref.parameters()))
    state = ost.setup(rule, ours)
    for step in range(3):
        x, y = batch(step)

        def loss(p: Any, m: nn.Module = ours, x: Any = x, y: Any = y) -> torch.Tensor:
            return lm_loss(functional_call(m, p, (x,)), y)

        grads = torch.func.grad(loss)(dict(ours.named_parameters()))
        assert "head.weight" not in grads
        state, ours = ost.update_(state, ours, grads)
        reference_step(ref, opt, step)
    assert_close(ost_torch.parameters(ours), ost_torch.parameters(ref))


@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("kind", ["module", "named_dict"])
def test_names_missing_from_the_grads_are_not_stepped_as_in_torch_optim(
    kind: str, in_place: bool
) -> None:
    """A name left out of the gradient dict is a Parameter without a gradient, for a module and
    for its named dict alike: ``torch.optim`` skips a Parameter whose ``.grad`` is ``None`` (its
    Adam step count does not advance), and a tied name left out beside its twin adds nothing."""
    ours, ref = TiedLM(4), TiedLM(4)
    opt = torch.optim.Adam(list(ref.parameters()), lr=LR, betas=BETAS, eps=EPS)
    model: Any = ours if kind == "module" else ost_torch.parameters(ours)
    state = ost.setup(ost.Adam(LR, BETAS, EPS), model)
    for step in range(3):
        x, y = batch(step)
        current = ost_torch.parameters(model) if isinstance(model, nn.Module) else model

        def loss(p: Any, x: Any = x, y: Any = y) -> torch.Tensor:
            return lm_loss(functional_call(ours, p, (x,)), y)

        # The de-duplicated dict: the tied total at "emb.weight", "head.weight" left out.
        dedup = {name: t for name, t in current.items() if name != "head.weight"}
        grads = torch.func.grad(loss)(dedup)
        if step == 0:
            del grads["mix.bias"]  # no gradient for the bias on the first step
        state, model = (ost.update_ if in_place else ost.update)(state, model, grads)
        opt.zero_grad()
        lm_loss(ref(x), y).backward()
        if step == 0:
            ref.mix.bias.grad = None
        opt.step()
        new = ost_torch.parameters(model) if isinstance(model, nn.Module) else model
        assert_close(dict(new), ost_torch.parameters(ref))
        assert new["head.weight"] is new["emb.weight"]


def test_names_missing_from_the_grads_of_a_numpy_dict_are_refused() -> None:
    """Outside torch a gradient has the model's structure (``jax.grad`` gives every leaf): a
    missing name is an error naming what was expected, with ``None`` the way to say "none"."""
    w = np.ones((2, 2))
    model = {"a": w, "b": w.T, "c": np.zeros(2)}
    state = ost.setup(ost.Adam(LR), model)
    with pytest.raises(ost.StructureError, match=r"expected \{'a': \*, 'b': \*, 'c': \*\}"):
        ost.update(state, model, {"a": np.ones((2, 2)), "c": np.ones(2)})
    _, new = ost.update(state, model, {"a": np.ones((2, 2)), "b": None, "c": None})
    assert np.array_equal(new["c"], np.zeros(2))
    assert new["b"].base is new["a"]


def test_schedule_and_adjust_follow_torch_learning_rate_changes() -> None:
    """A schedule evaluated at the step count is ``ExponentialLR``; ``adjust`` is a change of
    ``param_groups[...]["lr"]``. Both act on the tied module as on torch.optim's."""
    rule = ost.Momentum(ost.schedules.exponential_decay(LR, rate=0.5, steps=1), momentum=MOMENTUM)
    ours, ref = TiedLM(9), TiedLM(9)
    opt = torch.optim.SGD(ref.parameters(), lr=LR, momentum=MOMENTUM)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    state = ost.setup(rule, ours)
    for step in range(STEPS):
        state, ours = ost.update_(state, ours, totals(ours, step))
        reference_step(ref, opt, step)
        decay.step()
    assert_close(ost_torch.parameters(ours), ost_torch.parameters(ref))

    rule, make = OPTIMISERS["adam"]
    ours, ref = TiedLM(10), TiedLM(10)
    opt = make(list(ref.parameters()))
    state = ost.setup(rule, ours)
    for step in range(STEPS):
        if step == 3:
            state = ost.adjust(state, lr=LR / 10)
            for group in opt.param_groups:
                group["lr"] = LR / 10
        state, ours = ost.update_(state, ours, partials(ours, step))
        reference_step(ref, opt, step)
    assert_close(ost_torch.parameters(ours), ost_torch.parameters(ref))


# -- a view as a tie ---------------------------------------------------------------------------


def view_model(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(D, generator=gen, dtype=torch.float64).requires_grad_()
    return {"embed": W, "bias": b, "unembed": W.t()}  # W.t(): a view of W's memory


def view_loss(model: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    x, y = batch(step)
    h = torch.tanh(model["embed"][x] + model["bias"])
    return lm_loss(h @ model["unembed"], y)


@pytest.mark.parametrize("source", ["func_grad", "backward"])
@pytest.mark.parametrize("in_place", [True, False], ids=["update_", "update"])
def test_view_tie_matches_torch_optim(in_place: bool, source: str) -> None:
    rule, make = OPTIMISERS["adam"]
    model = view_model(4)
    ref = view_model(4)
    opt = make([ref["embed"], ref["bias"]])
    W, view = model["embed"], model["unembed"]
    state = ost.setup(rule, model)
    assert len(state.plan.params) == 2
    assert state.plan.n_ties == 1
    for step in range(STEPS):
        if source == "func_grad":
            grads = torch.func.grad(view_loss)(model, step)  # a partial for each position
        else:
            for t in (model["embed"], model["bias"]):
                t.grad = None
            view_loss(model, step).backward()
            grads = ost_torch.grad_totals(model)
            assert grads["unembed"] is None
        state, model = (ost.update_ if in_place else ost.update)(state, model, grads)
        opt.zero_grad()
        view_loss(ref, step).backward()
        opt.step()
        torch.testing.assert_close(model["embed"], ref["embed"].detach(), rtol=TOL, atol=TOL)
        torch.testing.assert_close(model["bias"], ref["bias"].detach(), rtol=TOL, atol=TOL)
        assert model["unembed"]._base is model["embed"]  # still a view: still one parameter
        assert torch.equal(model["unembed"], model["embed"].t())
    if in_place:  # the same tensors, and the view held elsewhere sees every step
        assert model["embed"] is W
        assert model["unembed"] is view
        torch.testing.assert_close(view, ref["embed"].detach().t(), rtol=TOL, atol=TOL)
    else:
        assert model["embed"] is not W
        assert model["embed"].is_leaf
        assert model["embed"].requires_grad


@pytest.mark.parametrize(
    ("shape", "make_view", "perm"),
    [
        ((3, 4), lambda w: w.t(), (1, 0)),
        ((2, 3, 4), lambda w: w.transpose(0, 2), (2, 1, 0)),
        ((2, 3, 4), lambda w: w.permute(2, 0, 1), (2, 0, 1)),
        ((2, 3, 4), lambda w: w.view_as(w), None),
        ((2, 3, 4), lambda w: w[:], None),
    ],
    ids=["t", "transpose", "permute", "view_as", "full-slice"],
)
def test_views_are_ties_with_their_orientation(shape: Any, make_view: Any, perm: Any) -> None:
    """Each view position's gradient is in the view's orientation and is brought back to the
    base's before summing: one Descent step is ``W - lr * (g_w + g_view permuted back)``."""
    W = torch.arange(float(np.prod(shape)), dtype=torch.float64).reshape(shape)
    view = make_view(W)
    model = {"w": W, "v": view}
    state = ost.setup(ost.Descent(0.5), model)
    assert len(state.plan.params) == 1
    g_w = torch.ones_like(W)
    g_v = torch.arange(float(view.numel()), dtype=torch.float64).reshape(view.shape) ** 2
    back = g_v if perm is None else g_v.permute(*np.argsort(perm).tolist())
    expected = W - 0.5 * (g_w + back)
    state, model = ost.update_(state, model, {"w": g_w, "v": g_v})
    torch.testing.assert_close(W, expected, rtol=0, atol=0)
    assert model["v"] is view
    assert torch.equal(view, make_view(W))


def test_two_leaf_parameters_over_one_memory_are_one_parameter() -> None:
    """``nn.Parameter(W)`` and ``nn.Parameter(W.t())`` are two autograd leaves, each with its own
    ``.grad``, over one memory: one parameter, whose total is the sum of both ``.grad``s.
    d/dW [sum(W**2) + sum(W.t() * c)] = 2W + c.t()."""
    W = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    a, b = nn.Parameter(W), nn.Parameter(W.t())
    model = {"a": a, "b": b}
    state = ost.setup(ost.Descent(0.1), model)
    assert len(state.plan.params) == 1
    c = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    ((a**2).sum() + (b * c).sum()).backward()
    totals = ost_torch.grad_totals(model)
    assert totals["a"] is a.grad
    assert totals["b"] is b.grad
    expected = W - 0.1 * (2 * W + c.t())
    ost.update_(state, model, totals)
    torch.testing.assert_close(a.detach(), expected, rtol=0, atol=0)
    torch.testing.assert_close(b.detach(), expected.t(), rtol=0, atol=0)


def test_overlaps_that_are_not_views_are_refused() -> None:
    W = torch.zeros(4, 3)
    with pytest.raises(ost.TieError, match=r"model\['row'\] and model\['w'\] share memory"):
        ost.setup(ost.Descent(), {"w": W, "row": W[0]})
    with pytest.raises(ost.TieError, match="share memory"):
        ost.setup(ost.Descent(), {"w": W, "flat": W.reshape(3, 4)})
    C = torch.zeros(2, 2, dtype=torch.complex64)
    with pytest.raises(ost.TieError, match="share memory"):  # conj() reads the memory negated
        ost.setup(ost.Descent(), {"c": C, "conj": C.conj()})
    A = np.zeros((2, 3), dtype=np.float32)
    with pytest.raises(ost.TieError, match=r"model\['a'\] and model\['t'\] share memory"):
        ost.setup(ost.Descent(), {"a": A, "t": torch.from_numpy(A)})  # two kinds, one buffer
    # Disjoint views of one buffer (two columns) are two parameters.
    state = ost.setup(ost.Descent(), {"a": W[:, 0], "b": W[:, 1]})
    assert len(state.plan.params) == 2
    assert state.plan.n_ties == 0


# -- the two conventions: the guard ------------------------------------------------------------


def test_grad_at_every_name_is_refused_and_nothing_changes() -> None:
    module = TiedLM(5)
    state = ost.setup(ost.Adam(LR), module)
    totals(module, 0)
    before = {n: p.detach().clone() for n, p in ost_torch.parameters(module).items()}
    wrong = {n: p.grad for n, p in module.named_parameters(remove_duplicate=False)}
    with pytest.raises(
        ValueError,
        match=r"grads\['emb\.weight'\] and grads\['head\.weight'\] both hold the \.grad .*"
        r"counted 2 times.*grad_totals",
    ):
        ost.update_(state, module, wrong)
    assert_close(ost_torch.parameters(module), before)
    assert int(state.step) == 0
    assert int(state.states[0].count) == 0

    model = view_model(6)
    state = ost.setup(ost.Momentum(LR), model)
    view_loss(model, 0).backward()
    total = model["embed"].grad
    with pytest.raises(ValueError, match=r"grads\['embed'\] and grads\['unembed'\] both hold"):
        ost.update_(state, model, {"embed": total, "bias": None, "unembed": total.t()})


def test_one_tensor_as_two_partials_is_summed() -> None:
    """``torch.func.grad`` returns one tensor object as the partial of two inputs that meet in a
    sum; that is two partials, not a total, and must be added: d/dW sum((W + W) * c) = 2c."""
    W = torch.ones(2, 3, dtype=torch.float64, requires_grad=True)
    W.grad = torch.zeros_like(W)  # a stale total: not what is passed
    c = torch.arange(6.0, dtype=torch.float64).reshape(2, 3)
    model = {"a": W, "b": W}
    grads = torch.func.grad(lambda p: ((p["a"] + p["b"]) * c).sum())(model)
    assert grads["a"] is grads["b"]
    _, model = ost.update(ost.setup(ost.Descent(0.1), model), model, grads)
    torch.testing.assert_close(model["a"], (W - 0.1 * 2 * c).detach(), rtol=0, atol=1e-15)


# -- errors ------------------------------------------------------------------------------------


def test_errors_name_the_path_and_leave_everything_as_it_was() -> None:
    module = TiedLM(7)
    state = ost.setup(ost.Adam(LR), module)
    before = {n: p.detach().clone() for n, p in ost_torch.parameters(module).items()}
    with pytest.raises(ValueError, match=r"grads\['mix\.bias'\] has shape \(3,\), expected \(6,\)"):
        ost.update_(state, module, {"mix.bias": torch.zeros(3, dtype=torch.float64)})
    with pytest.raises(ost.StructureError, match=r"not parameters of the module: \['mix\.b'\]"):
        ost.update_(state, module, {"mix.b": torch.zeros(6, dtype=torch.float64)})
    with pytest.raises(ost.StructureError, match=r"not parameters of the model: \['mix\.b'\]"):
        ost.update_(state, ost_torch.parameters(module), {"mix.b": torch.zeros(6)})
    with pytest.raises(TypeError, match="a dict from its parameter names"):
        ost.update_(state, module, [torch.zeros(6)])
    # A state set up for another module: other names, or other shapes under the same names.
    with pytest.raises(ost.StructureError, match=r"different model.*model\['emb\.weight'\]"):
        ost.update_(state, nn.Linear(D, D, dtype=torch.float64), {})
    other = TiedLM(7)
    other.mix = nn.Linear(D + 1, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model\['mix\.weight'\] changed since setup"):
        ost.update(state, other, {})
    assert_close(ost_torch.parameters(module), before)


def test_a_state_carries_over_to_a_copy_of_its_module() -> None:
    """The state records names, shapes and dtypes, not Parameter objects: after three steps it
    carries on with a copy of the module (as after loading weights), as torch.optim carries on."""
    rule, make = OPTIMISERS["nesterov"]
    ours, ref = TiedLM(11), TiedLM(11)
    opt = make(list(ref.parameters()))
    state = ost.setup(rule, ours)
    for step in range(STEPS):
        if step == 3:
            ours = copy.deepcopy(ours)  # new Parameter objects, the tie kept
        state, ours = ost.update_(state, ours, totals(ours, step))
        reference_step(ref, opt, step)
    assert_close(ost_torch.parameters(ours), ost_torch.parameters(ref))


def test_grad_totals_needs_leaf_tensors() -> None:
    W = torch.ones(2, 2, requires_grad=True)
    with pytest.raises(ValueError, match=r"model\['w'\] is not a leaf tensor \(computed"):
        ost_torch.grad_totals({"w": W * 2})
    with pytest.raises(ValueError, match=r"model\['wt'\] is not a leaf .*not in the model"):
        ost_torch.grad_totals({"wt": W.t()})  # W, which holds the .grad, is not in the model


# -- every rule on torch tensors, against the same rule on NumPy arrays --------------------------


# NumPy computes float and complex. The 16-bit floats are compared with JAX, which computes them
# but compiles each rule's step first (a second each): for the rules 16-bit training uses.
SIXTEEN_BIT_RULES = ["Adam", "MixedPrecision(Adam)"]


def _tree(seed: int, dtype: str, kind: str) -> list[Any]:
    rng = np.random.default_rng(seed)
    shapes = [(), (5,), (3, 4)]
    values = [
        rng.normal(size=s) + (1j * rng.normal(size=s) if "complex" in dtype else 0) for s in shapes
    ]
    if kind == "torch":
        return [torch.tensor(v).to(getattr(torch, dtype)) for v in values]
    if kind == "jax":
        return [jnp.asarray(v, dtype=getattr(jnp, dtype)) for v in values]
    return [np.asarray(v, dtype=dtype) for v in values]  # 0-d arrays, not scalars


@pytest.mark.parametrize("dtype", ["float64", "float32", "complex64"])
@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_runs_on_torch_as_on_numpy(name: str, dtype: str) -> None:
    """A consistency check across backends (the accuracy references are the torch.optim tests):
    four steps of each rule of the shared list on torch tensors and on NumPy arrays of the same
    values agree to rounding; results and states stay torch tensors, results in the parameters'
    dtype, states in NumPy's shapes and dtypes."""
    compare_backends(name, dtype, "numpy")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", SIXTEEN_BIT_RULES)
def test_16_bit_rules_run_on_torch_as_on_jax(name: str, dtype: str) -> None:
    compare_backends(name, dtype, "jax")


def compare_backends(name: str, dtype: str, kind: str) -> None:
    rule, _ = RULES[name]
    model_ref, model_t = _tree(0, dtype, kind), _tree(0, dtype, "torch")
    if name.startswith("Adafactor") and "complex" in dtype:  # refused alike, as torch.optim does
        for model in (model_ref, model_t):
            with pytest.raises(TypeError, match="Adafactor does not support complex"):
                ost.setup(rule, model)
        return
    state_ref, state_t = ost.setup(rule, model_ref), ost.setup(rule, model_t)
    for seed in range(1, 5):
        state_ref, model_ref = ost.update(state_ref, model_ref, _tree(seed, dtype, kind))
        state_t, model_t = ost.update(state_t, model_t, _tree(seed, dtype, "torch"))
    # Observed: at most one ulp apart (the namespaces may order a reduction differently, and
    # torch keeps the hyper-parameters in float64 where JAX keeps them in float32).
    eps = float(torch.finfo(getattr(torch, dtype)).eps)
    for a, b in zip(model_ref, model_t, strict=True):
        assert isinstance(b, torch.Tensor)
        assert b.dtype == getattr(torch, dtype)
        expected = np.asarray(a.astype(np.complex128) if "complex" in dtype else a, np.complex128)
        got = b.to(torch.complex128).numpy()
        np.testing.assert_allclose(got, expected, rtol=4 * eps, atol=4 * eps)
    leaves_t, leaves_ref = _leaves(state_t.states), _leaves(state_ref.states)
    assert all(isinstance(x, torch.Tensor) for x in leaves_t)
    assert [(tuple(x.shape), str(x.dtype).removeprefix("torch.")) for x in leaves_t] == [
        (tuple(np.shape(x)), str(np.dtype(x.dtype))) for x in leaves_ref
    ]


def _leaves(tree: Any) -> list[Any]:
    return list(jax.tree_util.tree_leaves(tree))


def test_float32_module_keeps_dtype_and_optstate_matches_torch_optim() -> None:
    """float32: the same Adam as torch.optim to float32 rounding (a few ulps per step)."""
    rule, make = OPTIMISERS["adam"]
    ours, ref = TiedLM(8, torch.float32), TiedLM(8, torch.float32)
    opt = make(list(ref.parameters()))
    state = ost.setup(rule, ours)
    for step in range(STEPS):
        state, ours = ost.update_(state, ours, totals(ours, step))
        reference_step(ref, opt, step)
    # The two orders of operations give steps a float32 ulp or so apart, and ``p - step`` rounds
    # to the weight's own ulp: at most two ulps of the largest weight per step (where a tie
    # counted twice moves a weight by about LR = 0.05).
    largest = max(float(p.detach().abs().max()) for p in ours.parameters())
    atol = 2 * STEPS * float(torch.finfo(torch.float32).eps) * largest
    pairs = zip(ost_torch.parameters(ours).items(), ost_torch.parameters(ref).values(), strict=True)
    for (name, p), q in pairs:
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=name)
    assert all(x.dtype == torch.float32 for x in state.states[0][:2])


# -- the backend stays optional ----------------------------------------------------------------


def test_importing_optstate_does_not_import_torch() -> None:
    code = "import sys, optstate; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# -- the example -------------------------------------------------------------------------------

EXAMPLE = ROOT / "examples" / "torch_tied_lm.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torch_tied_lm", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    result: dict[str, Any] = load_example().main(["--steps", "40", "--quiet"])
    return result


def test_example_import_does_not_run(capsys: pytest.CaptureFixture[str]) -> None:
    load_example()
    assert capsys.readouterr().out == ""


def test_example_trains_keeps_the_tie_and_agrees_with_torch_optim(figures: dict[str, Any]) -> None:
    assert figures["steps"] == 40
    assert figures["resumed_at"] == 20  # the Optimizer's run went through a checkpoint file
    assert figures["final_loss"] < 0.8 * figures["initial_loss"]
    assert figures["tie_kept"] is True
    # The scheduler's learning rate, through the Optimizer's param_groups, is torch.optim's.
    assert figures["final_lr"] == figures["reference_final_lr"]
    # Partials summed by optstate and autograd's totals are the same two float32 partials added
    # (a + b == b + a exactly), and adjust gives update_ the Optimizer's lr: the two optstate
    # copies are identical.
    assert figures["max_diff_partials_vs_optimizer"] == 0.0
    # optstate and torch.optim.AdamW run the same float32 arithmetic in another order; training
    # feeds each step's rounding into the next gradients. As for the JAX example: at most two
    # float32 ulps per step relative to the largest weight (4e-6 here), where a tie counted
    # twice or broken moves weights by about lr = 1e-2 per step.
    eps = float(torch.finfo(torch.float32).eps)
    bound = 2 * figures["steps"] * eps * figures["max_abs_weight"]
    assert figures["max_diff_vs_torch_optim"] <= bound
