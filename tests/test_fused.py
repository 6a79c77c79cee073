"""``update_`` with torch's fused kernels (``Adam``, ``AdamW``, ``AdaGrad``; issue 15 item 3).

References: ``torch.optim.Adam(fused=True)``, ``AdamW(fused=True)`` and ``Adagrad(fused=True)`` on
the same tied module; the pure ``update`` of the same rule (checked against optax and
``torch.optim`` elsewhere).
"""

from __future__ import annotations

import copy
from typing import Any

import jax
import numpy as np
import pytest
import torch
from torch_models import TiedLM, grads_of, model_of

import optstate as ost
from optstate.interop import torch as ost_torch

LR, WD, DECAY = 0.05, 0.1, 0.01
RULES = {
    "adam": (ost.Adam(LR), "_fused_adam_"),
    "adamw": (ost.AdamW(LR, weight_decay=WD), "_fused_adamw_"),
    "adagrad": (ost.AdaGrad(LR, lr_decay=DECAY, initial_accumulator=0.1), "_fused_adagrad_"),
}
TORCH = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=LR, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=LR, weight_decay=WD, fused=True),
    "adagrad": lambda ps: torch.optim.Adagrad(
        ps, lr=LR, lr_decay=DECAY, initial_accumulator_value=0.1, fused=True
    ),
}


def leaves(tree: Any) -> list[Any]:
    return jax.tree_util.tree_leaves(tree)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often each fused kernel ran."""
    counted = dict.fromkeys(["_fused_adam_", "_fused_adamw_", "_fused_adagrad_"], 0)
    for name in counted:
        kernel = getattr(torch, name)

        def spy(*args: Any, _name: str = name, _kernel: Any = kernel, **kwargs: Any) -> Any:
            counted[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)
    return counted


@pytest.mark.parametrize("name", list(RULES))
def test_tied_module_matches_torch_optim_fused(name: str, calls: dict[str, int]) -> None:
    rule, kernel = RULES[name]
    ours = TiedLM(0)
    ref = copy.deepcopy(ours)
    opt = TORCH[name](list(ref.parameters()))
    state = ost.setup(rule, ours)
    steps = 5
    for step in range(steps):
        x = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(step))
        for module in (ours, ref):
            module.zero_grad()
            module(x).logsumexp(-1).sum().backward()
        state, ours = ost.update_(state, ours, ost_torch.grad_totals(ours))
        opt.step()
    assert calls[kernel] == 2 * steps  # ours and torch.optim's, one call a step each
    assert ours.head.weight is ours.emb.weight
    assert [int(s.count) for s in state.states] == [steps] * len(state.states)
    for (key, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7, msg=key)


# The fused kernels compute in float32 at least and round once per stored value; the pure forms
# round after each operation (16-bit ones compute their scalars in float32 first). They agree to a
# few units in the last place of the dtype over these steps; a wrong formula or a count off by one
# is off by percents.
ULPS = 4
EPS = {
    "float32": torch.finfo(torch.float32).eps,
    "float64": torch.finfo(torch.float64).eps,
    "bfloat16": torch.finfo(torch.bfloat16).eps,
    "float16": torch.finfo(torch.float16).eps,
}


@pytest.mark.parametrize("dtype", list(EPS))
@pytest.mark.parametrize("name", list(RULES))
def test_fused_form_agrees_with_the_pure_form(name: str, dtype: str, calls: dict[str, int]) -> None:
    rule, kernel = RULES[name]
    if dtype == "float16" and name != "adagrad":
        # eps = 1e-8 is 0 in float16: the pure form (like torch.optim's foreach form) divides by
        # 0 where g**2 underflows, the fused kernel (float32 inside) does not. Compared where
        # eps is a float16 number.
        rule = type(rule)(**{**rule.hyper(), "eps": 1e-4})

    def make() -> dict[str, Any]:
        model = model_of("torch", "float64", 0)
        w, b = (model[k].to(getattr(torch, dtype)) for k in ("w", "b"))
        return {"w": w, "wt": w.T, "b": b}

    ours, pure = make(), make()
    state, pure_state = ost.setup(rule, ours), ost.setup(rule, pure)
    w, moments = ours["w"], leaves(state.states)
    for step in range(5):
        grads = {
            k: None if g is None else g.to(getattr(torch, dtype))
            for k, g in grads_of(model_of("torch", "float64", 0), step).items()
        }
        state, ours = ost.update_(state, ours, grads)
        pure_state, pure = ost.update(pure_state, pure, grads)
    assert calls[kernel] == 5
    assert ours["w"] is w
    assert all(a is b for a, b in zip(leaves(state.states), moments, strict=True))
    tol = ULPS * EPS[dtype]
    for key in ours:
        torch.testing.assert_close(
            ours[key].double(), pure[key].double(), rtol=tol, atol=tol, msg=key
        )
    for mine, theirs in zip(leaves(state.states), leaves(pure_state.states), strict=True):
        torch.testing.assert_close(mine.double(), theirs.double(), rtol=tol, atol=tol)
    # b has a gradient on even steps only: its count, and so its bias correction, falls behind.
    assert [int(s.count) for s in state.states] == [3, 5]


def test_where_the_tensors_do_not_allow_it_the_foreach_form_runs(calls: dict[str, int]) -> None:
    """Not the step's only group; NumPy; moments in another dtype; a gradient that is a
    parameter: no fused call, and the same numbers as the pure form."""
    cases = [
        ({"w": ost.Adam(LR), "wt": ost.Adam(LR), "b": ost.Momentum(LR)}, "torch", "float64"),
        (ost.Adam(LR), "numpy", "float64"),
        (ost.Adam(LR, mu_dtype=torch.float32), "torch", "float64"),
    ]
    for rule, backend, dtype in cases:
        ours, pure = model_of(backend, dtype, 3), model_of(backend, dtype, 3)
        state, pure_state = ost.setup(rule, ours), ost.setup(rule, pure)
        for step in (0, 2, 4):  # (on odd steps b has no gradient: Adam's group alone is fused)
            state, ours = ost.update_(state, ours, grads_of(ours, step))
            pure_state, pure = ost.update(pure_state, pure, grads_of(pure, step))
        for key in ours:
            np.testing.assert_allclose(
                np.asarray(ours[key]), np.asarray(pure[key]), rtol=1e-12, err_msg=key
            )
    model = {"u": torch.tensor([1.0, 2.0]), "v": torch.tensor([3.0, 4.0])}
    state = ost.setup(ost.Adam(LR), model)
    ost.update_(state, model, {"u": model["v"], "v": torch.ones(2)})
    assert calls["_fused_adam_"] == 0


@pytest.mark.parametrize("name", list(RULES))
def test_counts_past_float32s_integers_step_as_torch_optims(
    name: str, calls: dict[str, int]
) -> None:
    """On the CPU the kernel reads optstate's int32 counts as they are. Past 2**24 float32 no
    longer holds every integer (torch.optim's float32 step stops counting at 2**24): optstate's
    counts stay exact, and equal torch.optim given exact (float64) steps."""
    rule, kernel = RULES[name]
    ours = TiedLM(0).double()
    ref = copy.deepcopy(ours)
    opt = TORCH[name](list(ref.parameters()))
    state = ost.setup(rule, ours)
    far = 2**24 + 5  # float32: 2**24 + 4
    for step in range(3):
        x = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(step))
        for module in (ours, ref):
            module.zero_grad()
            module(x).logsumexp(-1).sum().backward()
        state, ours = ost.update_(state, ours, ost_torch.grad_totals(ours))
        opt.step()
        if step == 0:  # both as if 2**24 + 5 steps had been taken
            for s in state.states:
                s.count.fill_(far)
            for s in opt.state.values():
                s["step"] = torch.tensor(float(far), dtype=torch.float64)
    assert calls[kernel] == 6
    assert [int(s.count) for s in state.states] == [far + 2] * len(state.states)
    for (key, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-13, atol=1e-15, msg=key)


def _stepped_together(change: Any, calls: dict[str, int]) -> tuple[TiedLM, TiedLM, dict[str, int]]:
    """Three Adam steps of optstate's update_ and of torch.optim.Adam on one tied module in
    float64, ``change(module, state)`` applied to optstate's side after the first (returning
    the state to go on with)."""
    ours = TiedLM(0).double()  # (float64: the two agree to rounding, 1e-12)
    ref = copy.deepcopy(ours)
    opt = torch.optim.Adam(ref.parameters(), lr=LR, foreach=False)
    state = ost.setup(ost.Adam(LR), ours)
    fused = []
    for step in range(3):
        x = torch.randint(0, 11, (8,), generator=torch.Generator().manual_seed(step))
        for module in (ours, ref):
            module.zero_grad()
            module(x).logsumexp(-1).sum().backward()
        before = calls["_fused_adam_"]
        # (contiguous gradients: autograd gives a non-contiguous Parameter a .grad of its strides)
        totals = {
            k: None if g is None else g.contiguous() for k, g in ost_torch.grad_totals(ours).items()
        }
        state, ours = ost.update_(state, ours, totals)
        fused.append(calls["_fused_adam_"] - before)
        opt.step()
        if step == 0:
            state = change(ours, state)
    return ours, ref, {"fused steps": sum(fused), "first": fused[0]}


def test_a_parameter_made_non_contiguous_in_place_is_seen(calls: dict[str, int]) -> None:
    """The model's tensors are checked at every step: a Parameter given non-contiguous memory
    (``.data = ...``, the same object) after a fused step is stepped without the kernel."""

    def transpose_memory(module: TiedLM, state: Any) -> Any:
        w = module.mix.weight
        w.data = w.data.t().contiguous().t()  # the same values, column-major
        assert not w.is_contiguous()
        return state

    ours, ref, fused = _stepped_together(transpose_memory, calls)
    assert fused == {"fused steps": 1, "first": 1}
    for (key, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14, msg=key)


def test_a_state_with_other_tensors_is_checked_again(calls: dict[str, int]) -> None:
    """A rule state's tensors are checked once and then known by reference: a copy of the state
    holds other tensors, which are checked (here one moment of the copy is non-contiguous)."""

    def copy_with_a_column_major_moment(module: TiedLM, state: Any) -> Any:
        copied = copy.deepcopy(state)
        mu = next(s.mu for s in copied.states if s.mu.ndim == 2 and s.mu.shape == (6, 6))
        mu.set_(mu.t().contiguous().t())
        assert not mu.is_contiguous()
        return copied

    ours, ref, fused = _stepped_together(copy_with_a_column_major_moment, calls)
    assert fused == {"fused steps": 1, "first": 1}
    for (key, mine), theirs in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-14, msg=key)
