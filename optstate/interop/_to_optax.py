"""``to_optax``: an optstate rule as a tie-aware optax transformation (the public name lives in
``optstate.interop.optax``, whose docstring tells both directions of the bridge).

Three things make the transformation a citizen of optax's world, beyond ``init`` and ``update``:

* ``update`` takes and ignores extra keyword arguments, as optax's own transformations do, so it
  sits in an ``optax.chain`` with transformations that need the loss's value;
* ``init`` given optax's parameter placeholder (what ``optax.tree.map_params`` passes) returns the
  state's skeleton with the placeholder wherever an array of a rule state mirrors its parameter,
  so ``map_params`` maps the moments and leaves counters, hyper-parameters, clocks and the plan;
* hyper-parameters given as JAX arrays (``optax.inject_hyperparams`` passes them, traced) are read
  from the rule at every ``update``, so changing them in optax's state changes the step.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax  # type: ignore[import-untyped]

from .. import _arrays
from .._setup import RuleSpec, rules_per_position, setup
from .._state import State
from .._update import retie, update
from .._walk import flatten
from ..rules._contract import Rule
from ..rules.sgd import Descent
from ..schedules import Schedule

try:  # what optax.tree.map_params hands to init in place of the parameters
    from optax.tree_utils._state_utils import (  # type: ignore[import-untyped]
        _ParamsPlaceholder,
    )
except ImportError:  # pragma: no cover - another optax: map_params then fails in optax
    _ParamsPlaceholder = None


def to_optax(rule: RuleSpec, model: Any = None) -> optax.GradientTransformationExtraArgs:
    """A tie-aware optax transformation that runs optstate's ``rule``, for code that keeps its
    optax loop.

    ``init(params)`` is ``optstate.setup(rule, params)``: the optax state is an optstate
    ``State``. ``update(grads, state, params, **extra_args)`` takes the structural gradient (one
    partial gradient per position, as ``jax.grad`` gives it), sums each tied weight's gradients
    once, runs the rule once per unique parameter, and returns updates that move every position
    of a tied weight to its one new value: after ``optax.apply_updates(params, updates)`` the
    positions of a tie are equal again (not one object: optax makes a new array per position,
    and the next ``update`` takes the tie from the state's plan). ``params`` is required; extra
    keyword arguments (``value=loss``, ...) are accepted and ignored, as optax's own
    transformations do, so the transformation can share an ``optax.chain`` with ones that need
    them.

    ``rule`` is whatever ``optstate.setup`` takes (a rule, a tree of rules, a function of the
    path). ``model``, if given, is where the ties are read from (now, eagerly); ``init`` then
    only needs ``params`` of the same structure, so it may run inside ``jax.jit`` or on
    parameters whose ties a jitted step has already turned into copies. Without ``model`` the
    ties are found in the ``params`` given to ``init``, which must then still hold them (the
    same array at every position of a weight, or ``optstate.Transpose``). Flax NNX ``Variable``
    nodes in ``params`` are read as their values, so ``nnx.Optimizer(model, to_optax(rule),
    wrt=nnx.Param)`` works.

    **Hyper-parameters.** Numbers are copied into the state at ``init`` (``optstate.adjust`` on
    the state changes them). A hyper-parameter given as a JAX array, traced or not, belongs to
    the transformation: every ``update`` writes it into the state before the step. That is what
    ``optax.inject_hyperparams(lambda learning_rate: to_optax(Adam(learning_rate)))`` needs: it
    builds the transformation anew at every step from the values in its own state, so setting
    ``opt_state.hyperparams["learning_rate"]`` changes the step without recompiling.

    **``optax.tree.map_params(tx, fn, opt_state)``** maps ``fn`` over the arrays of the rule
    states that mirror a parameter (the moments: the parameter's shape, a floating dtype),
    leaving counters, hyper-parameters, clocks and the tie plan as they are, e.g. to place the
    moments with a sharding. The state has one moment per unique parameter, not one per
    position, so extra trees of the parameters' structure (``map_params``' ``*rest``) do not
    fit it. ``map_params`` asks ``init`` for the state's skeleton: the transformation reads it
    from ``model`` if given, else from the last state its ``init`` made.

    The update at a position is its new value minus its value in ``params``; at positions that
    are not parameters it is zero. Transformations chained before this one see one gradient per
    position (a tie counted once per use): linear ones (``optax.scale``, schedules) give what
    they would give on the de-duplicated model, others (clipping, decay) do not. Put those in
    the rule, where they see each tied weight once:
    ``to_optax(OptimiserChain(ClipGlobalNorm(1.0), AdamW(1e-3)))``. Transformations after it
    change each position's update: element-wise ones keep the tie. ``optax.MultiSteps`` and
    ``optax.apply_if_finite`` wrap it as they wrap any optimiser.

    Args:
        rule: what ``optstate.setup`` takes: a rule, a tree of rules or a function of the path.
        model: where to read the ties from, now (``None``: from the ``params`` given to
            ``init``).

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is an optstate ``State``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, optstate as ost
        >>> from optstate.interop import optax as ost_optax
        >>> w = jnp.ones((2, 2))
        >>> params = {"a": w, "b": w}                # one weight at two positions
        >>> tx = ost_optax.to_optax(ost.Adam(0.25), params)
        >>> opt_state = tx.init(params)
        >>> grads = {"a": jnp.ones((2, 2)), "b": jnp.zeros((2, 2))}
        >>> updates, opt_state = tx.update(grads, opt_state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> bool((params["a"] == params["b"]).all()), float(params["a"][0, 0])
        (True, 0.75)

    Raises:
        TypeError: ``update`` without ``params``, or with a state that is not an optstate
            ``State``; a rule at ``update`` (a transformation built anew by
            ``inject_hyperparams``) of another structure than the state's; ``map_params``
            before any ``init`` of a transformation made without ``model``.
        StructureError: ``params`` without the structure of ``model``.
    """
    pure = _pure(model)
    ties = None if model is None else setup(Descent(), pure)  # the tie plan, read now
    # The state's skeleton for optax.tree.map_params: from the model's shapes (computed when
    # first asked), else from the last state init made. Shapes only: no array is kept alive.
    abstract = None if model is None else _abstract_leaves(pure)
    skeleton: list[State | None] = [None]
    live = _Live(rule)

    def real_init(params: Any) -> State:
        params = _pure(params)
        return setup(rule, params if ties is None else retie(ties, params))

    def init(params: Any) -> State:
        if _ParamsPlaceholder is not None and isinstance(params, _ParamsPlaceholder):
            return _placeholders(skeleton[0] if abstract is None else _traced(real_init, abstract))
        state = real_init(params)
        if abstract is None:
            skeleton[0] = _skeleton(state)
        return state

    def step(grads: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, State]:
        del extra_args  # what other transformations of a chain need (the loss's value, ...)
        if params is None:
            raise TypeError(
                "the optstate transformation needs the parameters: call "
                "tx.update(grads, opt_state, params), so that every position of a tied weight "
                "can be moved to the same new value"
            )
        if not isinstance(state, State):
            raise TypeError(
                f"the optstate transformation's state is an optstate State (from tx.init), got "
                f"{type(state).__name__}"
            )
        tied = retie(state, params)
        state, new = update(live.written(state, tied), tied, grads)
        return _differences(new, params), state

    return optax.GradientTransformationExtraArgs(init, step)


def _differences(new: Any, old: Any) -> Any:
    """``new - old`` at every position (Transpose nodes are gone through to their parents), zero
    where nothing is trained."""

    def difference(n: Any, o: Any) -> Any:
        if _arrays.is_trainable(o):
            return n - o
        return jnp.zeros_like(o)

    return jax.tree_util.tree_map(difference, new, old)


def _pure(tree: Any) -> Any:
    """``tree`` with Flax NNX ``Variable`` nodes replaced by their values (``nnx.as_pure``), as
    ``nnx.Optimizer`` passes them to ``init`` (and plain arrays to ``update``). Flax is only
    looked at if the program has imported it."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or tree is None:
        return tree

    def is_variable(x: Any) -> bool:
        return isinstance(x, nnx.Variable)

    if not any(map(is_variable, jax.tree_util.tree_leaves(tree, is_leaf=is_variable))):
        return tree
    return nnx.as_pure(tree)


# -- optax.tree.map_params ---------------------------------------------------------------------


def _mirrors(x: Any, shape: tuple[int, ...]) -> bool:
    """An array of a rule state that mirrors its parameter: the parameter's shape, a floating
    (or complex) dtype. Counters (integers) and factored statistics (other shapes) do not."""
    return tuple(x.shape) == shape and bool(jnp.issubdtype(x.dtype, jnp.inexact))


def _skeleton(state: State) -> State | None:
    """The state with each array replaced by its shape and dtype (nothing kept alive); ``None``
    for a state of torch tensors, which optax does not step."""
    if not all(_arrays.is_jax(x) or _arrays.is_numpy(x) for x in jax.tree_util.tree_leaves(state)):
        return None
    shaped: State = jax.tree_util.tree_map(lambda x: _shape_of(x.shape, x.dtype), state)
    return shaped


def _shape_of(shape: Any, dtype: Any) -> Any:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)  # type: ignore[no-untyped-call]


def _placeholders(skeleton: State | None) -> State:
    """What ``init`` returns to ``optax.tree.map_params``: the state's structure with optax's
    parameter placeholder at each array that mirrors a parameter, and shapes elsewhere."""
    if skeleton is None:
        raise TypeError(
            "optax.tree.map_params needs the structure of the optstate state, which this "
            "transformation learns from its model: call tx.init(params) first, or make the "
            "transformation with to_optax(rule, model)"
        )
    plan = skeleton.plan
    assert _ParamsPlaceholder is not None  # only called with one

    def moments(k: int, tree: Any) -> Any:
        shape = plan.params[k].shape
        return jax.tree_util.tree_map(
            lambda x: _ParamsPlaceholder() if _mirrors(x, shape) else x, tree
        )

    states = [moments(k, s) for k, s in enumerate(skeleton.states)]
    return State(states, skeleton.hyper, skeleton.clocks, skeleton.step, plan)


def _abstract_leaves(model: Any) -> tuple[Any, list[Any], list[int]]:
    """The model's structure and leaves with each array replaced by its shape and dtype, and
    the indices of those arrays."""
    leaves, treedef = flatten(model)
    arrays = [i for i, x in enumerate(leaves) if _arrays.is_jax(x) or _arrays.is_numpy(x)]
    for i in arrays:
        leaves[i] = _shape_of(leaves[i].shape, np.dtype(leaves[i].dtype))
    return treedef, leaves, arrays


def _traced(init: Any, abstract: tuple[Any, list[Any], list[int]]) -> State:
    """The skeleton of the state ``init`` makes for a model of these shapes (no array made)."""
    treedef, leaves, arrays = abstract

    def run(values: list[Any]) -> State:
        filled = list(leaves)
        for i, value in zip(arrays, values, strict=True):
            filled[i] = value
        return init(treedef.unflatten(filled))  # type: ignore[no-any-return]

    return jax.eval_shape(run, [leaves[i] for i in arrays])  # type: ignore[no-any-return]


# -- hyper-parameters given as JAX arrays ------------------------------------------------------


class _Live:
    """The hyper-parameters of a transformation's rule that are JAX arrays (concrete or traced),
    written into the state at every ``update``."""

    def __init__(self, spec: RuleSpec) -> None:
        self.spec = spec
        if isinstance(spec, Rule):
            self.may_hold = _holds_arrays(spec)
        elif callable(spec) and not isinstance(spec, type):
            self.may_hold = True  # a function of the path: only its rules can tell
        else:
            leaves = jax.tree_util.tree_leaves(spec, is_leaf=lambda x: isinstance(x, Rule))
            self.may_hold = any(isinstance(r, Rule) and _holds_arrays(r) for r in leaves)

    def written(self, state: State, params: Any) -> State:
        """``state`` with the rule's JAX-array hyper-parameters in place of its own."""
        if not self.may_hold:
            return state
        plan = state.plan
        rules = self._rules(plan, params)
        first: dict[tuple[int, int], int] = {}  # (group, variant): its first parameter
        for k, key in enumerate(zip(plan.param_rules, plan.param_variants, strict=True)):
            first.setdefault(key, k)
        hypers = list(state.hyper)
        found = False
        for r, variants in enumerate(state.hyper):
            new_variants = list(variants)
            for v in range(len(variants)):
                rule = rules(first[(r, v)])
                if rule is None or not _holds_arrays(rule):
                    continue
                found = True
                if rule.structure() != plan.rules[r]:
                    raise TypeError(
                        f"the rule of this transformation is {rule!r}, but the state was set up "
                        f"for {plan.rules[r].name()} of another structure (its options, not its "
                        "hyper-parameters, differ); a transformation built anew at each step "
                        "(optax.inject_hyperparams) must build the same rule, with only its "
                        "hyper-parameters changed"
                    )
                new_variants[v] = _merged(rule.hyper(), variants[v])
            hypers[r] = tuple(new_variants)
        if not found:  # a function of the path giving numbers: it will give numbers again
            self.may_hold = False
            return state
        return state.replace(hyper=tuple(hypers))

    def _rules(self, plan: Any, params: Any) -> Callable[[int], Rule | None]:
        """Parameter ``k``'s rule in the spec (``None``: untrained)."""
        spec = self.spec
        if isinstance(spec, Rule):
            return lambda k: spec
        per_position = rules_per_position(spec, params, [s is not None for s in plan.slots])
        return lambda k: per_position[plan.params[k].primary]


def _is_jax_array(x: Any) -> bool:
    return isinstance(x, jax.Array)  # tracers included


def _holds_arrays(rule: Rule) -> bool:
    leaves = jax.tree_util.tree_leaves(rule.hyper(), is_leaf=lambda x: isinstance(x, Schedule))
    return any(map(_is_jax_array, leaves))


def _merged(new: Any, old: Any) -> Any:
    """The state's hyper-parameter tree ``old`` with the rule's JAX arrays of ``new`` written in
    (each in the dtype the state keeps it in); its other values stay as they are."""

    def merge(value: Any, kept: Any) -> Any:
        if not _is_jax_array(value):
            return kept
        if isinstance(kept, Schedule):
            raise TypeError(
                "a hyper-parameter that the transformation's rule gives as a JAX array is a "
                f"schedule in its state ({kept!r}, set by optstate.adjust?); a value given as an "
                "array belongs to the transformation, which writes it at every update: give the "
                "schedule to the rule instead, or the value as a number"
            )
        return jnp.asarray(value).astype(kept.dtype)

    return jax.tree_util.tree_map(merge, new, old, is_leaf=lambda x: isinstance(x, Schedule))


__all__ = ["to_optax"]
