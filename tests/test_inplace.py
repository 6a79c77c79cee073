"""``update_`` (``Descent``, ``Momentum``, ``Nesterov``, ``Adam``, ``AdamW`` on NumPy arrays and
torch tensors): it writes into the arrays the model already has, agrees with the pure ``update``
and with ``torch.optim``'s ``foreach`` implementations, steps a tie once, and writes nothing when
a rule fails.

References: ``torch.optim`` (``foreach=True``) on the same tied module; the pure ``update`` of the
same rule, itself checked against optax and ``torch.optim`` elsewhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
import pytest
import torch
from torch_models import TiedLM, grads_of, model_of

import optstate as ost
from optstate.interop import torch as ost_torch

LR, MOMENTUM, BETAS, EPS, WD = 0.05, 0.9, (0.9, 0.999), 1e-8, 0.1
STEPS = 5
RULES = {
    "descent": ost.Descent(LR),
    "momentum": ost.Momentum(LR, momentum=MOMENTUM),
    "nesterov": ost.Nesterov(LR, momentum=MOMENTUM),
    "adam": ost.Adam(LR, BETAS, EPS),
    "adamw": ost.AdamW(LR, BETAS, EPS, weight_decay=WD),
}
# torch's fused Adam kernel (float32 and float64 tensors, one group) computes in another order
# than the pure form (lerp for the first moment, the bias corrections folded into lr and the
# denominator), so the two round apart by a few units in the last place per step. Relative
# tolerances a few hundred ulps wide over five steps; a wrong formula or a tie counted twice is
# off by percents.
TOL = {"float32": 2e-5, "float64": 1e-12}


def as_numpy(x: Any) -> np.ndarray:
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(RULES))
def test_in_place_form_writes_into_the_arrays_and_matches_the_pure_form(
    name: str, backend: str, dtype: str
) -> None:
    rule = RULES[name]
    ours, pure = model_of(backend, dtype, 0), model_of(backend, dtype, 0)
    state, pure_state = ost.setup(rule, ours), ost.setup(rule, pure)
    w, b = ours["w"], ours["b"]
    for step in range(STEPS):
        state, ours = ost.update_(state, ours, grads_of(ours, step))
        pure_state, pure = ost.update(pure_state, pure, grads_of(pure, step))
        # Written in place: the same parameter arrays, the tie still one memory (the moments are
        # new arrays, except where torch's fused kernel wrote them in place).
        assert ours["w"] is w
        assert ours["b"] is b
        assert np.shares_memory(as_numpy(ours["wt"]), as_numpy(w))
    for key in ours:
        np.testing.assert_allclose(
            as_numpy(ours[key]), as_numpy(pure[key]), rtol=TOL[dtype], atol=TOL[dtype], err_msg=key
        )
    for mine, theirs in zip(leaves(state.states), leaves(pure_state.states), strict=True):
        np.testing.assert_allclose(as_numpy(mine), as_numpy(theirs), rtol=TOL[dtype], atol=1e-30)
    if name.startswith("adam"):  # parameters in key order: b, which stepped on even steps only, w
        assert [int(s.count) for s in state.states] == [(STEPS + 1) // 2, STEPS]


FOREACH = {
    "descent": lambda ps: torch.optim.SGD(ps, lr=LR, foreach=True),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=LR, momentum=MOMENTUM, foreach=True),
    "nesterov": lambda ps: torch.optim.SGD(
        ps, lr=LR, momentum=MOMENTUM, nesterov=True, foreach=True
    ),
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR, betas=BETAS, eps=EPS, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(
        ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, foreach=True
    ),
}


@pytest.mark.parametrize("name", list(RULES))
def test_tied_float32_module_matches_torch_optim_foreach(name: str) -> None:
    """float32, where the order of operations shows: optstate's step (its own arithmetic, or
    torch's fused kernel for Adam and AdamW) stays within float32 rounding of torch.optim's."""
    ours = TiedLM(0)
    ref = copy.deepcopy(ours)
    opt = FOREACH[name](list(ref.parameters()))
    state = ost.setup(RULES[name], ours)
    for step in range(STEPS):
        x = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(step))
        for module in (ours, ref):
            module.zero_grad()
            module(x).logsumexp(-1).sum().backward()
        state, ours = ost.update_(state, ours, ost_torch.grad_totals(ours))
        opt.step()
    assert ours.head.weight is ours.emb.weight
    for (key, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=key)


@dataclass(frozen=True)
class Fails(ost.Rule):
    """A rule whose step raises, as a user's rule with a bug would."""

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        raise ArithmeticError("this rule fails")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_a_failing_rule_leaves_the_in_place_groups_unwritten(backend: str) -> None:
    tied = model_of(backend, "float64", 1)
    model = {"w": tied["w"], "wt": tied["wt"], "z": tied["b"]}  # z's rule comes after w's
    state = ost.setup({"w": ost.Adam(LR), "wt": ost.Adam(LR), "z": Fails()}, model)
    copies = {k: as_numpy(v).copy() for k, v in model.items()}
    moments = [as_numpy(x).copy() for x in leaves(state.states)]
    grads = grads_of(tied, 0)
    with pytest.raises(ArithmeticError, match="this rule fails"):
        ost.update_(state, model, {"w": grads["w"], "wt": grads["wt"], "z": grads["b"]})
    for key, value in model.items():
        np.testing.assert_array_equal(as_numpy(value), copies[key], err_msg=key)
    for now, then in zip(leaves(state.states), moments, strict=True):
        np.testing.assert_array_equal(as_numpy(now), then)


def read_only(model: dict[str, Any]) -> dict[str, Any]:
    w = model["w"].copy()
    w.flags.writeable = False
    return {"w": w, "wt": w.T, "b": model["b"]}


FALLBACKS = {  # rule, model: where an in-place form does not fit, the pure form runs
    "mu_dtype": (ost.Adam(LR, mu_dtype="float32"), lambda: model_of("numpy", "float64", 2)),
    # (torch's float16 Adam takes the fused kernel now: tests/test_fused.py)
    "float16": (ost.Momentum(LR), lambda: model_of("torch", "float16", 2)),
    "float16-numpy": (ost.Adam(LR), lambda: model_of("numpy", "float16", 2)),
    "read-only": (ost.Momentum(LR), lambda: read_only(model_of("numpy", "float64", 2))),
    "chain": (
        ost.OptimiserChain(ost.ClipNorm(1.0), ost.Adam(LR)),
        lambda: model_of("torch", "float64", 2),
    ),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_the_pure_form_runs_where_the_in_place_form_does_not_fit(case: str) -> None:
    rule, make = FALLBACKS[case]
    ours, pure = make(), make()
    state, pure_state = ost.setup(rule, ours), ost.setup(rule, pure)
    before = leaves(state.states)
    for step in range(3):
        state, ours = ost.update_(state, ours, grads_of(ours, step))
        pure_state, pure = ost.update(pure_state, pure, grads_of(pure, step))
    assert not any(new is old for new, old in zip(leaves(state.states), before, strict=True))
    for key in ours:  # the same pure arithmetic on both sides
        np.testing.assert_array_equal(as_numpy(ours[key]), as_numpy(pure[key]), err_msg=key)
