"""``eval_params``: the model at which to evaluate, for rules that train one point and evaluate
at another (the schedule-free rules); the model itself for every other rule."""

from __future__ import annotations

from typing import Any

from . import _arrays, _models
from ._apply import evaluate
from ._positions import check_model, check_structure, place
from ._state import State
from ._walk import flatten, unwrap
from .rules._contract import Rule
from .rules.compose import OptimiserChain
from .rules.wrappers import MixedPrecision, SkipNonFinite


def eval_params(state: State, model: Any) -> Any:
    """The model at which to evaluate a model trained with ``state``: ties kept.

    A schedule-free rule (``ScheduleFreeSGD``, ``ScheduleFreeAdamW``) trains the parameters at
    one point, :math:`y`, where gradients are taken, and keeps in its state the sequence
    :math:`z`; the model to evaluate (validation loss, the final model) is at the average
    :math:`x = (y - (1-\\beta_1) z)/\\beta_1`. ``eval_params`` returns the model with every such
    parameter replaced by its :math:`x`, one new array per parameter put back at all its
    positions (re-wrapped in ``Transpose``, as a view where a NumPy view was), as ``update``
    puts a new parameter back. Parameters of other rules, untrained and non-trainable leaves are
    the model's own; for a state without a schedule-free rule the result is ``model`` itself.
    The schedule-free rule may stand in an ``OptimiserChain``, ``SkipNonFinite`` or
    ``MixedPrecision`` (whose float32 copy then gives :math:`x`, rounded to the parameter's
    dtype). Matches ``optax.contrib.schedule_free_eval_params``. Works under ``jax.jit``. A
    torch ``nn.Module`` is read as its named-parameter dict, and that dict is returned.

    Hyper-parameters are read as the next step would use them (schedules at the rule's clock).

    Args:
        state: the ``State`` the model is trained with.
        model: the model at the training point :math:`y`, as ``update`` returned it.

    Returns:
        The model with every schedule-free parameter at :math:`x`, its ties kept; ``model``
        itself when the state has no schedule-free rule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([[1.0, 2.0]])
        >>> model = {"w": w, "wt": ost.Transpose(w)}
        >>> state = ost.setup(ost.ScheduleFreeSGD(0.5), model)
        >>> for _ in range(2):
        ...     state, model = ost.update(state, model, {"w": np.ones((1, 2)), "wt": None})
        >>> x = ost.eval_params(state, model)
        >>> x["w"], x["wt"].parent is x["w"]
        (array([[0.25, 1.25]]), True)

    Raises:
        TypeError: ``state`` is not a ``State``; a rule holds a schedule-free rule inside a
            container whose state ``eval_params`` cannot read.
        StructureError: ``model`` does not have the structure the state was set up for.
        ValueError, TieError: the model's parameters or ties are not those of the state (as for
            ``update``).
    """
    if not isinstance(state, State):
        raise TypeError(
            f"expected the State returned by optstate.setup, got {type(state).__name__}; "
            "the call is eval_params(state, model)"
        )
    plan = state.plan
    model = _models.positions(model)  # a module as its named parameters
    leaves, treedef = flatten(model)
    check_structure(plan, treedef, model)
    bases = [unwrap(leaves[p.primary])[0] for p in plan.params]
    check_model(plan, leaves, bases, model)
    points, changed = list(bases), [False] * len(bases)
    with _arrays.no_grad(bases):
        for k, r in enumerate(plan.param_rules):
            if r < 0 or not _evaluates_apart(plan.rules[r]):
                continue
            hyper = evaluate(state.hyper[r][plan.param_variants[k]], state.clocks[r])
            base = _arrays.detached(bases[k])
            points[k] = _arrays.as_array(_point(plan.rules[r], hyper, state.states[k], base), base)
            changed[k] = True
    if not any(changed):
        return model
    return treedef.unflatten(place(plan, leaves, points, changed))


def _evaluates_apart(rule: Rule) -> bool:
    """``rule`` or a member of it has an evaluation point of its own (``eval_point``)."""
    return callable(getattr(rule, "eval_point", None)) or any(
        _evaluates_apart(m) for m in rule.members()
    )


def _point(rule: Rule, hyper: Any, state: Any, param: Any) -> Any:
    """The evaluation point of one parameter under ``rule``, from its rule state."""
    own = getattr(rule, "eval_point", None)
    if callable(own):
        return own(hyper, state, param)
    if isinstance(rule, OptimiserChain):
        for member, h, s in zip(rule.rules, hyper, state, strict=True):
            if _evaluates_apart(member):
                param = _point(member, h, s, param)
        return param
    if isinstance(rule, SkipNonFinite):
        return _point(rule.rule, hyper, state.inner, param)
    if isinstance(rule, MixedPrecision):
        if state.master is None:
            return _point(rule.rule, hyper, state.inner, param)
        return _arrays.cast(_point(rule.rule, hyper, state.inner, state.master), param.dtype)
    raise TypeError(
        f"eval_params cannot read the evaluation point of a rule inside {rule.name()}: it knows "
        "OptimiserChain, SkipNonFinite and MixedPrecision. Put the schedule-free rule outside it"
    )
