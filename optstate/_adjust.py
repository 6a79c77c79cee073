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
from ._apply import evaluate
from ._state import Plan, State, plan_of
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

    Args:
        state: the ``State`` to change.
        where: the positions: a path such as ``"decoder"`` or ``"dec/w"`` (that position and
            everything below it), a tuple of keys ``("layers", 0)``, or a predicate on a
            position's path (a tuple of keys).

    Returns:
        A new ``State`` whose selected parameters are frozen (``state`` is unchanged).

    Raises:
        ValueError: a ``where`` that selects nothing.
        TypeError: ``state`` is not a ``State``.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"a": np.ones(2), "b": np.ones(2)}
        >>> state = ost.freeze(ost.setup(ost.Descent(1.0), model), "a")
        >>> _, new = ost.update(state, model, {"a": np.ones(2), "b": np.ones(2)})
        >>> new["a"], new["b"]
        (array([1., 1.]), array([0., 0.]))
    """
    return _set_frozen(state, where, True)


def thaw(state: State, where: Where = None) -> State:
    """The state with the selected parameters trained again (all of them by default).

    Args:
        state: the ``State`` to change.
        where: the positions: a path such as ``"decoder"`` or ``"dec/w"`` (that position and
            everything below it), a tuple of keys ``("layers", 0)``, or a predicate on a
            position's path (a tuple of keys); ``None`` (the default) thaws every parameter.

    Returns:
        A new ``State`` whose selected parameters step again, their rule states as they were
        when frozen (``state`` is unchanged).

    Raises:
        ValueError: a ``where`` that selects nothing.
        TypeError: ``state`` is not a ``State``.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"a": np.ones(2), "b": np.ones(2)}
        >>> grads = {"a": np.ones(2), "b": np.ones(2)}
        >>> state = ost.freeze(ost.setup(ost.Descent(0.5), model), "a")
        >>> state, model = ost.update(state, model, grads)  # "a" frozen: only "b" moves
        >>> state, model = ost.update(ost.thaw(state), model, grads)  # both move by lr g
        >>> model["a"], model["b"]
        (array([0.5, 0.5]), array([0., 0.]))
    """
    return _set_frozen(state, where, False)


def _set_frozen(state: State, where: Where, value: bool) -> State:
    plan = plan_of(state, "freeze(state, where)" if value else "thaw(state, where=None)")
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
    ``freeze``). A value may be a number, a 0-d array or a schedule; it is checked as the rule
    checks it when it is made (``lr`` may not be negative, ...). New numbers go into the state's
    existing hyper-parameter arrays, so a jitted ``update`` does not recompile; giving a subset
    of a rule group's parameters their own values gives them a variant of the group's
    hyper-parameters (one recompilation), and they keep stepping with the group: a
    ``ClipGlobalNorm`` or ``SkipNonFinite`` in the rule still sees all of its parameters.

    Args:
        state: the ``State`` to change.
        where: the positions: a path such as ``"decoder"`` or ``"dec/w"`` (that position and
            everything below it), a tuple of keys ``("layers", 0)``, or a predicate on a
            position's path (a tuple of keys); ``None`` (the default) selects every parameter.
            Positional-only, as ``state`` is.
        **hyper: the new values by name (``lr=1e-4``): numbers, 0-d arrays or schedules.

    Returns:
        A new ``State``: the same rule states, the new hyper-parameters (``state`` is unchanged).

    Examples:
        >>> import numpy as np, optstate as ost
        >>> state = ost.setup(ost.Adam(1e-3), {"w": np.ones(3)})
        >>> ost.hyperparams(ost.adjust(state, lr=1e-4))["w"]["lr"]
        0.0001

    Raises:
        ValueError: a name that no selected rule has (the message lists the valid ones), a
            value out of the rule's range, a ``where`` that selects nothing, or a
            hyper-parameter of a rule that looks across parameters (``ClipGlobalNorm``'s
            ``max_norm``) given to a subset of its group: it is one value for all of them.
        TypeError: a value that is not a number, a 0-d real array or a schedule.
    """
    if not hyper:
        raise TypeError("adjust needs at least one hyper-parameter, e.g. adjust(state, lr=1e-4)")
    plan = plan_of(state, "adjust(state, where=None, **hyper)")
    selected = _selected(plan, where) if where is not None else [True] * len(plan.params)
    touched = sorted({r for k, r in enumerate(plan.param_rules) if selected[k] and r >= 0})
    if not touched:
        raise ValueError(
            "the selected parameters have no rule (set up with None), so they have no "
            "hyper-parameters to adjust"
        )
    valid = sorted({name for r in touched for v in state.hyper[r] for name in _names(v)})
    unknown = sorted(set(hyper) - set(valid))
    if unknown:
        names = ", ".join(plan.rules[r].name() for r in touched)
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for {names}; "
            + (f"valid: {', '.join(valid)}" if valid else f"{names} has no hyper-parameters")
        )
    for r in touched:
        for name, value in hyper.items():
            plan.rules[r].check_hyper(name, value)
    hypers = list(state.hyper)
    variants = list(plan.param_variants)
    for r in touched:
        group = plan.groups[r]
        members = [k for k in group if selected[k]]
        shared = sorted(plan.rules[r].shared() & set(hyper))
        if shared and len(members) < len(group):
            raise ValueError(
                f"{', '.join(shared)} of {plan.rules[r].name()} applies to all "
                f"{len(group)} parameters of its group together (the rule looks across "
                f"parameters), but `where` = {where!r} selects {len(members)} of them; adjust "
                "it for the whole group (without `where`), or set up separate rules"
            )
        hypers[r] = _adjusted(hypers[r], variants, group, selected, hyper)
    new_plan = plan.replace(param_variants=tuple(variants))
    return state.replace(hyper=tuple(hypers), plan=new_plan)


def _adjusted(
    group_variants: tuple[Any, ...],
    variants: list[int],
    group: tuple[int, ...],
    selected: list[bool],
    values: dict[str, Any],
) -> tuple[Any, ...]:
    """A group's variants with ``values`` given to its selected parameters: a variant all of whose
    parameters are selected is changed; the selected ones of another get a new variant. Variants
    that no parameter uses any more are dropped (``variants``, per parameter, is updated)."""
    out = list(group_variants)
    for v, tree in enumerate(group_variants):
        users = [k for k in group if variants[k] == v]
        chosen = [k for k in users if selected[k]]
        if not chosen:
            continue
        changed = _replace(tree, values)
        if len(chosen) == len(users):
            out[v] = changed
        else:
            out.append(changed)
            for k in chosen:
                variants[k] = len(out) - 1
    used = sorted({variants[k] for k in group})
    renumber = {old: new for new, old in enumerate(used)}
    for k in group:
        variants[k] = renumber[variants[k]]
    return tuple(out[v] for v in used)


def hyperparams(state: State, where: Where = None) -> dict[str, Any]:
    """The hyper-parameters each trained parameter will use at its next step, as Python numbers.

    Returns a dict from each parameter's path (``"dec/w"``, its first position, in the form
    ``where`` takes) to its rule's hyper-parameters: a dict by name, or for an
    ``OptimiserChain`` a tuple with one dict per member. Schedules are evaluated at the number of
    steps their rule has taken (see docs/rules.md, "Schedules"), which is the value the next
    ``update`` uses. ``where`` restricts the result to the parameters it selects (see
    ``freeze``). Frozen parameters are included (with the values they would use when thawed);
    parameters without a rule are not.

    Args:
        state: the ``State`` to read.
        where: the positions: a path such as ``"decoder"`` or ``"dec/w"`` (that position and
            everything below it), a tuple of keys ``("layers", 0)``, or a predicate on a
            position's path (a tuple of keys); ``None`` (the default) reads every trained
            parameter.

    Returns:
        A dict from each parameter's path to its rule's hyper-parameters (see above).

    Examples:
        >>> import numpy as np, optstate as ost
        >>> lr = ost.schedules.linear(1.0, 0.0, 4)
        >>> model = {"w": np.ones(2), "b": np.zeros(2)}
        >>> state = ost.setup(lambda path: ost.Descent(lr if path[-1] == "w" else 0.5), model)
        >>> state, model = ost.update(state, model, {"w": np.ones(2), "b": np.ones(2)})
        >>> ost.hyperparams(state)
        {'b': {'lr': 0.5}, 'w': {'lr': 0.75}}

    Raises:
        TypeError: ``state`` is not a ``State``.
        ValueError: a ``where`` that selects nothing.
    """
    plan = plan_of(state, "hyperparams(state, where=None)")
    selected = _selected(plan, where) if where is not None else [True] * len(plan.params)
    keys = position_keys(skeleton(plan.treedef))
    evaluated: dict[tuple[int, int], Any] = {}
    out: dict[str, Any] = {}
    for k, param in enumerate(plan.params):
        r, v = plan.param_rules[k], plan.param_variants[k]
        if r < 0 or not selected[k]:
            continue
        if (r, v) not in evaluated:
            values = evaluate(state.hyper[r][v], state.clocks[r])
            evaluated[r, v] = _numbers(values)
        out["/".join(str(key) for key in keys[param.primary])] = evaluated[r, v]
    return out


def _numbers(tree: Any) -> Any:
    """A tree of 0-d arrays as Python numbers (dicts, tuples and ``None`` kept)."""
    if isinstance(tree, dict):
        return {k: _numbers(v) for k, v in tree.items()}
    if isinstance(tree, tuple | list):
        return tuple(_numbers(v) for v in tree)
    return None if tree is None else float(tree)


def _names(tree: Any) -> set[str]:
    """Every hyper-parameter name in a rule's hyper tree (chains hold one dict per member)."""
    if isinstance(tree, dict):
        return set(tree) | {n for v in tree.values() for n in _names(v)}
    if isinstance(tree, tuple | list):
        return {n for v in tree for n in _names(v)}
    return set()


def _replace(tree: Any, values: dict[str, Any], like: Any = None) -> Any:
    """A variant's hyper-parameter tree with the named values replaced (at any depth: every
    member of a chain that has the name)."""
    if like is None:
        like = _float_leaf(tree)
    if isinstance(tree, dict):
        return {
            k: _converted(values[k], like) if k in values else _replace(v, values, like)
            for k, v in tree.items()
        }
    if isinstance(tree, tuple | list):
        return type(tree)(_replace(v, values, like) for v in tree)
    return tree


def _float_leaf(tree: Any) -> Any:
    """A floating-point array of a hyper-parameter tree: new values take its namespace and dtype."""
    leaves = jax.tree_util.tree_leaves(tree)
    floats = [x for x in leaves if _arrays.namespace(x).isdtype(x.dtype, "real floating")]
    return floats[0] if floats else leaves[0]


def _converted(new: Any, like: Any) -> Any:
    """``new`` as arrays of the namespace and dtype of the state's hyper-parameters (step counts of
    a schedule as int32), so the jitted step sees the same input types."""
    if new is None:
        return None
    xp = _arrays.namespace(like)
    if isinstance(new, Schedule):
        return new.map_numbers(
            lambda v: xp.asarray(v, dtype=like.dtype), lambda v: xp.asarray(v, dtype=xp.int32)
        )
    if isinstance(new, tuple):
        return tuple(_converted(n, like) for n in new)
    return xp.asarray(new, dtype=like.dtype)
