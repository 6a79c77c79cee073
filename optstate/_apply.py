"""The step itself: sum each parameter's gradients in its own orientation, run its rule once.

``step`` is pure and knows nothing of model trees: it takes the tie plan, which positions carry a
gradient and in what orientation (``layout``), and flat lists of arrays. For JAX arrays ``update``
runs it compiled, one dispatch per step, with one compilation per plan and layout; for NumPy, and
inside a user's ``jax.jit``, it runs as it is.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from . import _arrays
from ._state import Plan
from .rules import _inplace
from .rules._contract import Rule, increment
from .schedules import Schedule

# ``layout[pos]`` for a position without a gradient to use (none given, not a parameter, or its
# parameter frozen or without a rule); otherwise the orientation of the given gradient.
ABSENT = False
Layout = tuple[Any, ...]


@functools.lru_cache(maxsize=64)
def active_params(plan: Plan, layout: Layout) -> tuple[int, ...]:
    """The parameters that step: those with a gradient at one of their positions at least."""
    return tuple(
        sorted({plan.slots[pos].param for pos, o in enumerate(layout) if o is not ABSENT})  # type: ignore[union-attr]
    )


@functools.lru_cache(maxsize=64)
def n_trained(plan: Plan) -> int:
    """How many parameters have a rule and are not frozen."""
    return sum(1 for k, r in enumerate(plan.param_rules) if r >= 0 and not plan.frozen[k])


def step(
    plan: Plan,
    layout: Layout,
    hyper: tuple[Any, ...],
    clocks: tuple[Any, ...],
    states: list[Any],
    count: Any,
    bases: list[Any],
    grads: list[Any],
) -> tuple[list[Any], list[Any], tuple[Any, ...], Any]:
    """``(new_states, new_bases, new_clocks, count + 1)`` for the active parameters.

    ``states`` and ``bases`` hold the active parameters' rule states and arrays (in the order of
    ``active_params``); ``grads`` the gradients of the positions that carry one, in position order.
    Each group's schedules are evaluated at its clocks, which then advance by the steps taken.
    """
    index, sums = _summed(plan, layout, bases, grads)
    new_states, new_bases, new_clocks = list(states), list(bases), list(clocks)
    for r, ks, members in _groups(plan, index):
        rule = plan.rules[r]
        hypers = _hypers(plan, hyper[r], clocks[r], ks)
        _pure(rule, hypers, members, states, bases, sums, new_states, new_bases)
        before, after = [states[i] for i in members], [new_states[i] for i in members]
        new_clocks[r] = rule.tick(clocks[r], before, after)
    return new_states, new_bases, tuple(new_clocks), increment(count)


def step_in_place(
    plan: Plan,
    layout: Layout,
    hyper: tuple[Any, ...],
    clocks: tuple[Any, ...],
    states: list[Any],
    count: Any,
    bases: list[Any],
    grads: list[Any],
) -> tuple[list[Any], list[Any], tuple[Any, ...], Any]:
    """``step`` for ``update_`` on mutable arrays, writing the new parameters into the arrays
    they have (where writable); those arrays are returned.

    Every new value is computed before anything is written, by the rules' own arithmetic
    (``apply``, as ``step``). One ``commit_`` then makes all the writes. So no value is read
    after it was written, whatever memory the gradients share with the parameters and states
    (``update_`` equals ``update``), and a step that fails before the commit leaves every array
    as it was. A step
    whose one group is a rule with a fused kernel (``Rule.fused_``) is that kernel's one call.
    """
    index, sums = _summed(plan, layout, bases, grads)
    groups = _groups(plan, index)
    new_states, new_bases, new_clocks = list(states), list(bases), list(clocks)
    if len(groups) == 1 and _fused(plan, hyper, clocks, groups[0], states, bases, sums):
        r = groups[0][0]
        new_clocks[r] = plan.rules[r].tick(clocks[r], states, states)
        return new_states, new_bases, tuple(new_clocks), increment(count)
    writes: _inplace.Writes = []
    for r, ks, members in groups:
        rule = plan.rules[r]
        hypers = _hypers(plan, hyper[r], clocks[r], ks)
        _pure(rule, hypers, members, states, bases, sums, new_states, new_bases)
        before, after = [states[i] for i in members], [new_states[i] for i in members]
        new_clocks[r] = rule.tick(clocks[r], before, after)
        for i in members:
            if new_bases[i] is not bases[i] and _arrays.writable(bases[i]):
                writes.append((bases[i], new_bases[i]))
                new_bases[i] = bases[i]
    _inplace.commit_(writes)
    return new_states, new_bases, tuple(new_clocks), increment(count)


def _fused(
    plan: Plan,
    hyper: tuple[Any, ...],
    clocks: tuple[Any, ...],
    group: tuple[int, list[int], list[int]],
    states: list[Any],
    bases: list[Any],
    sums: list[Any],
) -> bool:
    """The step's one group, with one variant of hyper-parameters, stepped by its rule's fused
    kernel (``Rule.fused_``), if the rule has one and the arrays allow it."""
    r, ks, members = group
    rule = plan.rules[r]
    if type(rule).fused_ is Rule.fused_ or len({plan.param_variants[k] for k in ks}) != 1:
        return False
    (h,) = _hypers(plan, hyper[r], clocks[r], ks[:1])
    picked = ([xs[i] for i in members] for xs in (states, bases, sums))
    return rule.fused_(h, *picked)


def _hypers(plan: Plan, variants: tuple[Any, ...], clock: Any, ks: list[int]) -> list[Any]:
    """The hyper-parameters of each parameter ``ks`` of one group at this step: its variant, with
    every schedule evaluated at the group's clock (each variant evaluated once)."""
    evaluated = [evaluate(v, clock) for v in variants]
    return [evaluated[plan.param_variants[k]] for k in ks]


def _summed(
    plan: Plan, layout: Layout, bases: list[Any], grads: list[Any]
) -> tuple[dict[int, int], list[Any]]:
    """Each active parameter's place among the active ones, and its gradients summed in its own
    orientation."""
    active = active_params(plan, layout)
    index = {k: i for i, k in enumerate(active)}
    sums: list[Any] = [None] * len(active)
    given = iter(grads)
    for pos, orient in enumerate(layout):
        if orient is ABSENT:
            continue
        i = index[plan.slots[pos].param]  # type: ignore[union-attr]
        g = _arrays.coerce(next(given), bases[i])
        if orient is not None:
            g = _arrays.permute(g, _arrays.inverse(orient))
        sums[i] = g if sums[i] is None else _arrays.as_array(sums[i] + g, g)  # 0-d stays an array
    return index, sums


def _groups(plan: Plan, index: dict[int, int]) -> list[tuple[int, list[int], list[int]]]:
    """Each rule group with active parameters: the group, those parameters, and their places
    among the active ones (``index``)."""
    out = []
    for r, group in enumerate(plan.groups):
        ks = [k for k in group if k in index]
        if ks:
            out.append((r, ks, [index[k] for k in ks]))
    return out


def _pure(
    rule: Any,
    hypers: list[Any],
    members: list[int],
    states: list[Any],
    bases: list[Any],
    sums: list[Any],
    new_states: list[Any],
    new_bases: list[Any],
) -> None:
    """One rule's ``update_all`` on its members, its results put into ``new_states`` and
    ``new_bases``."""
    rule_states, news = rule.update_all(
        hypers,
        [states[i] for i in members],
        [bases[i] for i in members],
        [sums[i] for i in members],
    )
    for i, rule_state, new in zip(members, rule_states, news, strict=True):
        if _arrays.is_numpy(bases[i]) and bases[i].ndim == 0:  # NumPy makes 0-d results scalars
            rule_state = jax.tree_util.tree_map(np.asarray, rule_state)
        new_states[i] = rule_state
        new_bases[i] = _arrays.as_array(new, bases[i])


compiled_step = jax.jit(step, static_argnums=(0, 1))
# The same, giving the stepped parameters' arrays and rule states to XLA to reuse: each unique
# parameter is passed once, so a tied weight's one buffer is donated once.
donating_step = jax.jit(step, static_argnums=(0, 1), donate_argnums=(4, 5, 6))


def evaluate(hyper: Any, clock: Any) -> Any:
    """A rule's hyper-parameters at a step: every schedule evaluated at its clock. ``clock`` has
    the shape of ``Rule.clocks()``: one count for a rule, a tuple for a chain's members."""
    if isinstance(clock, tuple):
        return tuple(evaluate(h, c) for h, c in zip(hyper, clock, strict=True))
    return jax.tree_util.tree_map(
        lambda h: h(clock) if isinstance(h, Schedule) else h,
        hyper,
        is_leaf=lambda h: isinstance(h, Schedule),
    )
