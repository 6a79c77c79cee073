"""Changing a state between steps: ``adjust`` hyper-parameters, ``freeze`` and ``thaw`` parameters.

All three return a new state and leave the moments as they are. ``adjust`` writes new arrays into
the state's hyper-parameters, so a jitted ``update`` does not recompile; ``freeze`` and ``thaw``
change the static plan (one recompilation each).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from . import _arrays
from ._state import Plan, State
from ._update import _plan
from ._walk import Key, position_keys, skeleton
from .schedules import Schedule

Where = str | Sequence[Key] | Callable[[tuple[Key, ...]], bool] | None


def _selector(where: Where) -> Callable[[tuple[Key, ...]], bool]:
    """A predicate on position paths. A string ``"dec/w"`` or a tuple ``("dec", "w")`` selects the
    positions at or below that path; a function receives each position's path as a tuple."""
    if where is None:
        return lambda path: True
    if callable(where):
        return where
    if isinstance(where, str):
        prefix: tuple[str, ...] = tuple(k for k in where.split("/") if k)
    else:
        prefix = tuple(str(k) for k in where)
    return lambda path: tuple(str(k) for k in path[: len(prefix)]) == prefix


def _selected(plan: Plan, where: Where) -> list[bool]:
    """Per parameter: is any of its positions selected? (A tie is selected as a whole.)"""
    keys = position_keys(skeleton(plan.treedef))
    chosen = _selector(where)
    hit = [chosen(path) for path in keys]
    selected = [any(hit[pos] for pos in p.positions) for p in plan.params]
    if not any(selected):
        raise ValueError(f"`where` = {where!r} selects no parameter of this state")
    return selected


def freeze(state: State, where: Where) -> State:
    """The state with the selected parameters frozen: ``update`` keeps their values and states.

    ``where`` selects positions: a path such as ``"encoder"`` or ``"dec/w"`` (this position and
    everything below it), a tuple of keys ``("layers", 0)``, or a predicate on a position's path
    (a tuple of keys). Freezing one position of a tied parameter freezes the parameter: it is one
    array, so it cannot move at one position and stay at another.

    Example:
        >>> import numpy as np, optstate as ost
        >>> model = {"a": np.ones(2), "b": np.ones(2)}
        >>> state = ost.freeze(ost.setup(ost.Descent(1.0), model), "a")
        >>> _, new = ost.update(state, model, {"a": np.ones(2), "b": np.ones(2)})
        >>> new["a"], new["b"]
        (array([1., 1.]), array([0., 0.]))
    """
    return _set_frozen(state, where, True)


def thaw(state: State, where: Where = None) -> State:
    """The state with the selected parameters trained again (all of them by default)."""
    return _set_frozen(state, where, False)


def _set_frozen(state: State, where: Where, value: bool) -> State:
    plan = _plan(state)
    selected = _selected(plan, where)
    if value is False:
        untrained = [k for k, s in enumerate(selected) if s and plan.param_rules[k] < 0]
        if untrained:
            raise ValueError(
                f"{len(untrained)} selected parameter(s) have no rule (None at setup) and cannot "
                "be thawed; give them a rule with setup"
            )
    frozen = tuple(value if s else f for s, f in zip(selected, plan.frozen, strict=True))
    return state.replace(plan=plan.replace(frozen=frozen))


def adjust(state: State, where: Where = None, /, **hyper: Any) -> State:
    """The state with new hyper-parameters and the same moments.

    ``adjust(state, lr=1e-4)`` changes ``lr`` wherever a rule of the state has it;
    ``adjust(state, "decoder", lr=1e-4)`` only for the parameters ``where`` selects (see
    ``freeze``). A value may be a number or a schedule. New numbers go into the state's existing
    hyper-parameter arrays, so a jitted ``update`` does not recompile; giving a subset of a rule's
    parameters their own values splits that rule in two (one recompilation).

    Example:
        >>> import numpy as np, optstate as ost
        >>> state = ost.setup(ost.Adam(1e-3), {"w": np.ones(3)})
        >>> float(ost.adjust(state, lr=1e-4).hyper[0]["lr"])
        0.0001

    Raises:
        ValueError: a name that no selected rule has (the message lists the valid ones), or a
            ``where`` that selects nothing.
    """
    if not hyper:
        raise TypeError("adjust needs at least one hyper-parameter, e.g. adjust(state, lr=1e-4)")
    plan = _plan(state)
    selected = _selected(plan, where) if where is not None else [True] * len(plan.params)
    rules = list(plan.rules)
    hypers = list(state.hyper)
    param_rules = list(plan.param_rules)
    touched = sorted({r for k, r in enumerate(param_rules) if selected[k] and r >= 0})
    valid = sorted({name for r in touched for name in _names(hypers[r])})
    unknown = sorted(set(hyper) - set(valid))
    if not touched:
        raise ValueError(
            "the selected parameters have no rule (set up with None), so they have no "
            "hyper-parameters to adjust"
        )
    if unknown:
        names = ", ".join(plan.rules[r].name() for r in touched)
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for {names}; "
            + (f"valid: {', '.join(valid)}" if valid else f"{names} has no hyper-parameters")
        )
    for r in touched:
        changed = _replace(hypers[r], hyper)
        members = [k for k in plan.groups[r] if selected[k]]
        if len(members) == len(plan.groups[r]):
            hypers[r] = changed
        else:  # only some of this rule's parameters: they get a rule of their own
            rules.append(rules[r])
            hypers.append(changed)
            for k in members:
                param_rules[k] = len(rules) - 1
    new_plan = plan.replace(rules=tuple(rules), param_rules=tuple(param_rules))
    return state.replace(hyper=tuple(hypers), plan=new_plan)


def _names(tree: Any) -> set[str]:
    """Every hyper-parameter name in a rule's hyper tree (chains hold one dict per member)."""
    if isinstance(tree, dict):
        return set(tree) | {n for v in tree.values() for n in _names(v)}
    if isinstance(tree, tuple | list):
        return {n for v in tree for n in _names(v)}
    return set()


def _replace(tree: Any, values: dict[str, Any]) -> Any:
    if isinstance(tree, dict):
        return {
            k: _converted(v, values[k]) if k in values else _replace(v, values)
            for k, v in tree.items()
        }
    if isinstance(tree, tuple | list):
        return type(tree)(_replace(v, values) for v in tree)
    return tree


def _converted(old: Any, new: Any) -> Any:
    """``new`` in the form of the hyper-parameter it replaces: arrays of the same namespace and
    dtype, so the jitted step sees the same input types."""
    like = jax.tree_util.tree_leaves(old)[0]
    if isinstance(new, Schedule | tuple):
        return jax.tree_util.tree_map(lambda v: _as_hyper(v, like), new)
    return _as_hyper(new, like)


def _as_hyper(value: Any, like: Any) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (is_number or hasattr(value, "dtype")):
        raise TypeError(f"a hyper-parameter must be a number or a schedule, got {value!r}")
    return _arrays.namespace(like).asarray(value, dtype=like.dtype)
