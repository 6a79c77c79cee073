"""``update`` and ``update_``: gather each parameter's gradients, apply its rule once, and put the
one new array back at every position.

Data flows one way: model -> positions -> (tie plan) -> one summed gradient per parameter -> rule
-> one new array per parameter -> positions -> model. Every check runs before anything is computed
or written, so a bad call leaves state and model as they were.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from . import _apply, _arrays, _models, _positions
from ._errors import StructureError
from ._state import Plan, State, plan_of
from ._transpose import Transpose
from ._walk import flatten, gather, path_string
from .rules._contract import increment


def update(state: State, model: Any, grads: Any, *, donate: bool = False) -> tuple[State, Any]:
    """One optimisation step: ``state, model = update(state, model, grads)``.

    ``grads`` is the structural gradient, the model's structure with each position's own partial
    gradient (what ``jax.grad`` returns), or the ``Grads`` of ``optstate.implicit.gradient``.
    ``None`` stands for a leaf or a whole branch without a gradient. At a ``Transpose`` position
    the gradient is either a ``Transpose`` holding it in the parent's orientation (what
    ``jax.grad`` gives) or a dense array in the transposed orientation.

    For every unique parameter the gradients of all its positions are brought to the parameter's
    orientation and summed, the rule runs once, and the one new array goes back to every position:
    the same object, re-wrapped in ``Transpose`` where there was one, as a view of the new array
    where a NumPy view was. A parameter without any gradient keeps its array and its state. Inputs
    are not modified. Works under ``jax.jit``, where the state's tie plan stands in for identity.

    On JAX arrays outside ``jit`` the step runs compiled, once per model structure. With
    ``donate=True`` it also hands the stepped parameters' buffers and their rule states to XLA to
    reuse (each tied weight's one buffer once): the old arrays are deleted and the returned
    state and model must be used from then on. It saves a copy of every parameter and moment.

    Args:
        state: the ``State`` from ``setup`` or from the previous ``update``.
        model: the model ``state`` was set up for, with its ties.
        grads: the structural gradient (the model's structure, ``None`` where there is none) or an
            ``optstate.implicit.Grads``.
        donate: hand the old parameters' and states' buffers to XLA (JAX arrays; keyword-only).

    Returns:
        ``(state, model)``: the advanced state, and the model with every trained parameter's new
        array at all of its positions.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = (w, w)                      # one parameter at two positions
        >>> state = ost.setup(ost.Momentum(0.1, momentum=0.9), model)
        >>> state, model = ost.update(state, model, (np.array([3.0, 3.0]), np.array([7.0, 7.0])))
        >>> model[0], model[0] is model[1]
        (array([0., 1.]), True)

    Gradients are cast to their parameter's dtype (a ``float64`` gradient of a ``float32``
    parameter is rounded); nested lists of numbers are read as arrays. After any exception the
    state and the model are as they were: nothing is written until every check has passed and
    the step has been computed.

    A torch ``nn.Module`` is trained as its named-parameter dict (``optstate.interop.torch``):
    ``update`` leaves the module as it is and returns the new parameters as that dict, for
    ``torch.func.functional_call``; ``update_`` writes them into the module. For a module and for
    a flat dict from names to tensors, a name missing from the ``grads`` dict is ``None``: that
    parameter does not step, as ``torch.optim`` skips a Parameter whose ``.grad`` is ``None``,
    and a tied name left out adds nothing to its twin's gradient. Every other model needs
    ``grads`` of its own structure (``None`` at a leaf without a gradient).

    Raises:
        StructureError: ``model`` or ``grads`` does not have the structure the state was set up
            for; the state's rule states or hyper-parameters are not those of its rules.
        TieError: a tie of the model was broken or a new one made since ``setup`` (NumPy arrays
            that share memory now included).
        ValueError: a gradient's shape fits neither the parameter nor, at a ``Transpose``, its
            transpose; a complex gradient for a real parameter; a ragged list; a parameter's
            shape or dtype changed since ``setup``.
        TypeError: ``state`` is not a ``State``; a gradient is not an array, or holds booleans,
            strings or objects.
    """
    kind = _models.model_kind(model)
    if kind is not None:
        return kind.update(state, model, grads, False)
    return step(state, model, grads, in_place=False, donate=donate)


def update_(state: State, model: Any, grads: Any) -> tuple[State, Any]:
    """``update``, writing each new parameter into its array where that array is writable (NumPy
    arrays, torch tensors), so views and ties held elsewhere see the step. Returns
    ``(state, model)`` like ``update``; the written arrays are the same objects as before. JAX
    arrays are immutable: for them it is ``update``. The new values are the rule's own
    arithmetic, as ``update`` computes them. ``Adam``, ``AdamW`` and ``AdaGrad`` on contiguous
    torch tensors of one device and dtype (16-bit included) run torch's fused kernels when theirs
    is the step's only rule group (docs/pytorch.md); the kernel writes the moments in place too,
    and the returned state then holds the same tensors: keep a copy (``copy.deepcopy``) to hold
    on to an earlier state. A torch
    ``nn.Module`` has its Parameters written in place and is returned itself (see
    ``optstate.interop.torch``).

    Every new value is computed before any is written, so ``update_`` gives what ``update``
    gives whatever memory the gradients share with the parameters and the state (a gradient may
    be another parameter's array), and a step that fails writes nothing, step counts included.

    Args:
        state: the ``State`` from ``setup`` (or the last step).
        model: the model the state was set up for: a pytree of arrays or an ``nn.Module``.
        grads: the gradient, as for ``update``.

    Returns:
        ``(state, model)``: the new state and the model, whose writable arrays are the same
        objects as before, holding the new values.

    Raises:
        StructureError, TieError, ValueError, TypeError: as ``update``, before anything is
            written.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> W = np.array([[1.0, 2.0], [3.0, 4.0]])
        >>> model = {"enc": W, "dec": W.T}  # a NumPy view: one parameter
        >>> state = ost.setup(ost.Descent(0.5), model)
        >>> grads = {"enc": np.ones((2, 2)), "dec": np.ones((2, 2))}  # summed: 2 everywhere
        >>> state, model = ost.update_(state, model, grads)
        >>> W  # written in place: W - 0.5 * 2
        array([[0., 1.],
               [2., 3.]])
        >>> model["enc"] is W and model["dec"].base is W
        True
    """
    kind = _models.model_kind(model)
    if kind is not None:
        return kind.update(state, model, grads, True)
    return step(state, model, grads, in_place=True, donate=False)


def retie(state: State, model: Any) -> Any:
    """The model with its ties restored from the state's tie plan.

    ``jax.jit`` returns a separate array for every output position, so after a user's own jitted
    step a tied weight is held by several equal arrays. ``retie`` puts one array back at all
    positions of each parameter (the one at the parameter's first direct position), so that eager
    ``update`` calls and a later ``setup`` see the tie again and memory holds one copy.
    A parameter that was tied through NumPy views (``W`` and ``W.T``) comes back as a NumPy array
    with its views, since only NumPy arrays have views (JAX's ``W.T`` is a copy).
    A torch ``nn.Module`` is read as its named-parameter dict, which is returned.
    ``state`` may also be an optax state that holds the state of a ``to_optax`` transformation
    (under ``inject_hyperparams``, say). ``optstate.jit`` returns ties as one array already: it
    needs no ``retie``.

    Args:
        state: the ``State`` whose tie plan the model follows (or an optax state holding one).
        model: the model, with the positions of a tie held by separate equal arrays.

    Returns:
        The model with one array at all positions of each parameter (its views and
        ``Transpose`` wrappers rebuilt).

    Examples:
        >>> import jax, numpy as np, optstate as ost
        >>> w = np.arange(6, dtype=np.float32).reshape(2, 3)
        >>> state = ost.setup(ost.Descent(0.5), {"w": w, "wt": w.T})
        >>> grads = {"w": np.ones((2, 3), np.float32), "wt": np.ones((3, 2), np.float32)}
        >>> state, model = jax.jit(ost.update)(state, {"w": w, "wt": w.T}, grads)
        >>> model = ost.retie(state, model)
        >>> type(model["w"]).__name__, model["wt"].base is model["w"]
        ('ndarray', True)
    """
    plan = plan_of(_held_state(state), "retie(state, model)")
    model = _models.positions(model)
    leaves, treedef = flatten(model)
    _positions.check_structure(plan, treedef, model)
    bases = _bases(plan, leaves)
    viewed = {s.param for s in plan.slots if s is not None and s.perm is not None}
    for k in viewed:
        if _arrays.is_jax(bases[k]) and not _arrays.is_tracer(bases[k]):
            bases[k] = np.array(bases[k])  # views are NumPy's: rebuilt on one NumPy array
    return treedef.unflatten(_positions.place(plan, leaves, bases, changed=[True] * len(bases)))


def _held_state(state: Any) -> Any:
    """The one optstate ``State`` that ``state`` is or holds (an optax wrapper's state of a
    ``to_optax`` transformation, such as ``inject_hyperparams``'s), else ``state`` itself."""
    if isinstance(state, State):
        return state
    held = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, State))
        if isinstance(s, State)
    ]
    plans = {id(s.plan) for s in held}
    return held[0] if len(plans) == 1 else state


def step(
    state: State, model: Any, grads: Any, *, in_place: bool, donate: bool
) -> tuple[State, Any]:
    """``update`` (or with ``in_place``, ``update_``) of a model that is a pytree of arrays: the
    step every model kind comes down to."""
    plan = plan_of(state, "update(state, model, grads)")
    leaves, treedef = flatten(model)
    _positions.check_structure(plan, treedef, model)
    bases = _bases(plan, leaves)
    verified = _returned_with(state, leaves)
    # The very arrays of the last step: only what can change in place in them is checked again.
    if not verified or not _positions.unchanged(plan, leaves, bases):
        _positions.check_model(plan, leaves, bases, model)
    grads = _models.structural(grads, model)
    hooks = _models.tensor_hooks(bases)  # torch's, for a model of tensors
    if hooks is not None:
        grads = hooks.prepare(model, grads)
    per_position = gather(plan.treedef, model, grads)
    if hooks is not None:
        per_position = hooks.check(plan, bases, per_position, model)
    layout, given = _positions.layout(plan, bases, per_position, model)

    active = _apply.active_params(plan, layout)
    new_bases = list(bases)
    new_states = list(state.states)
    new_clocks = state.clocks
    compiled = False
    if not active:
        count = increment(state.step)
    else:
        compiled = all(_arrays.is_jax(bases[k]) and not _arrays.is_tracer(bases[k]) for k in active)
        run = _apply.step_in_place if in_place and not compiled else _apply.step
        step_count = state.step
        clocks = state.clocks
        active_states = [state.states[k] for k in active]
        active_bases = [bases[k] for k in active]
        if compiled:
            run = _apply.donating_step if donate else _apply.compiled_step
            given, active_states, active_bases, step_count, clocks = _settled(
                given, active_states, active_bases, step_count, clocks, verified
            )
        try:
            # Non-finite numbers flow through a step as they do in JAX and PyTorch, silently
            # (``SkipNonFinite`` discards such steps): NumPy is not to warn about them either.
            with np.errstate(all="ignore"), _arrays.no_grad(active_bases):
                stepped_states, stepped, new_clocks, count = run(
                    plan,
                    layout,
                    state.hyper,
                    clocks,
                    active_states,
                    step_count,
                    active_bases,
                    given,
                )
        except Exception as err:
            _check_state(plan, state, bases, model, err)
            raise
        for k, rule_state, new in zip(active, stepped_states, stepped, strict=True):
            new_states[k], new_bases[k] = rule_state, new

    changed = _write_back(active, bases, new_bases, in_place)
    new_leaves = _positions.place(plan, leaves, new_bases, changed)
    new_state = State(new_states, state.hyper, new_clocks, count, plan)
    if compiled and len(active) == _apply.n_trained(plan):  # every array came out of the step
        new_state._verified = _references(new_leaves)
    elif in_place and not compiled and not any(changed):  # the model's own arrays, checked
        # (the very arrays of the last step again: its references hold)
        new_state._verified = state._verified if verified else _references(leaves, mutable=True)
    return new_state, treedef.unflatten(new_leaves)


def _bases(plan: Plan, leaves: list[Any]) -> list[Any]:
    """Each parameter's array: the one at its first direct position, ``Transpose`` unwrapped."""
    bases = []
    for param in plan.params:
        x = leaves[param.primary]
        while isinstance(x, Transpose):
            x = x.parent
        bases.append(x)
    return bases


def _write_back(
    active: Sequence[int], bases: list[Any], new_bases: list[Any], in_place: bool
) -> list[bool]:
    """With ``in_place``, each new value written into its writable array (``new_bases`` then
    holds the array itself); per parameter, whether its positions need a new array."""
    changed = [False] * len(bases)
    for k in active:
        if new_bases[k] is bases[k]:
            continue  # written in place already (or the rule left it as it was)
        if in_place and _arrays.writable(bases[k]):
            _arrays.write_(bases[k], new_bases[k])
            new_bases[k] = bases[k]  # every position already holds the new values
        else:
            changed[k] = True
    return changed


def _settled(
    given: list[Any],
    states: list[Any],
    bases: list[Any],
    step_count: Any,
    clocks: Any,
    verified: bool,
) -> tuple[list[Any], list[Any], list[Any], Any, Any]:
    """The inputs of a compiled step, typed and placed as its outputs will be.

    The compiled step's outputs are strongly typed, and committed to the parameters' devices if
    any input is: inputs that are not yet (weak types, a count created without a device beside
    committed parameters, or the other way round) are made so, or the second step would compile
    again. A weakly typed gradient (a weakly typed parameter's, on the first step) would make the
    next step, whose gradient is strongly typed, compile again. Arrays that a compiled step
    returned (``verified``) are settled already.
    """
    if any(getattr(g, "weak_type", False) for g in given):
        given = [_arrays.strong(g) for g in given]
    if verified:
        return given, states, bases, step_count, clocks
    inputs = [
        *bases,
        *jax.tree_util.tree_leaves(states),
        *jax.tree_util.tree_leaves(clocks),
        step_count,
    ]
    committed = any(getattr(x, "committed", False) for x in [*inputs, *given])
    if not any(_arrays.unsettled(x, committed) for x in inputs):
        return given, states, bases, step_count, clocks
    states = [
        jax.tree_util.tree_map(lambda x, b=b: _arrays.settled(x, b, committed), s)
        for s, b in zip(states, bases, strict=True)
    ]
    first = bases[0]
    step_count = _arrays.settled(step_count, first, committed)
    clocks = jax.tree_util.tree_map(lambda x: _arrays.settled(x, first, committed), clocks)
    bases = [_arrays.settled(b, b, committed) for b in bases]
    return given, states, bases, step_count, clocks


def _references(leaves: list[Any], *, mutable: bool = False) -> tuple[Any, ...] | None:
    """Weak references to ``leaves`` if they are all JAX arrays (see ``State._verified``), or
    with ``mutable``, all NumPy arrays and torch tensors (which ``unchanged`` checks again)."""
    if mutable:
        if not all(_arrays.has_layout(x) for x in leaves):
            return None
    elif not all(_arrays.is_jax(x) and not _arrays.is_tracer(x) for x in leaves):
        return None
    return tuple(weakref.ref(x) for x in leaves)


def _returned_with(state: State, leaves: list[Any]) -> bool:
    """``leaves`` are the very arrays ``update`` returned with ``state``."""
    refs = state._verified
    return (
        refs is not None
        and len(refs) == len(leaves)
        and all(ref() is x for ref, x in zip(refs, leaves, strict=True))
    )


def _check_state(plan: Plan, state: State, bases: list[Any], model: Any, err: Exception) -> None:
    """After a step failed: a clear error if the state's hyper-parameters or rule states do not
    fit its rules, as when they were taken from a state set up with another rule."""

    def fits(expected: Any, actual: Any) -> bool:  # ``None`` in a rule's structure: any value
        if isinstance(expected, dict):
            return (
                isinstance(actual, dict)
                and expected.keys() == actual.keys()
                and all(fits(expected[k], actual[k]) for k in expected)
            )
        if isinstance(expected, tuple | list):
            return (
                isinstance(actual, tuple | list)
                and len(expected) == len(actual)
                and all(fits(e, a) for e, a in zip(expected, actual, strict=True))
            )
        return True

    def layout(tree: Any) -> str:
        shapes = jax.tree_util.tree_map(
            lambda x: f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}",
            tree,
        )
        return repr(shapes).replace("'", "")

    _check_state_devices(plan, state, bases, model, err)
    for r, rule in enumerate(plan.rules):
        variants = state.hyper[r] if r < len(state.hyper) else None
        wrong = (
            [variants]
            if not isinstance(variants, tuple)
            else [v for v in variants if not fits(rule.hyper(), v)]
        )
        if wrong:
            raise StructureError(
                f"the state's hyper-parameters for its rule {rule.name()} are "
                f"{layout(wrong[0])}, which are not {rule.name()}'s; were they taken from "
                "a state set up with another rule? A state carries its rule: call setup to "
                "change rules"
            ) from err
    for k, r in enumerate(plan.param_rules):
        if r < 0 or plan.frozen[k]:
            continue
        try:
            expected = plan.rules[r].init(bases[k])
        except Exception:
            continue  # a rule whose init needs its hyper-parameters: no diagnosis
        actual = state.states[k]
        kept: Any = jax.tree_util.tree_structure(expected)
        same = kept == jax.tree_util.tree_structure(actual)
        if not same or layout(expected) != layout(actual):
            raise StructureError(
                f"the state's rule state for {path_string(model, plan.params[k].primary)} is "
                f"{layout(actual)}, but its rule {plan.rules[r].name()} keeps "
                f"{layout(expected)}; was it taken from a state set up with another rule? A "
                "state carries its rule: call setup to change rules"
            ) from err


def _check_state_devices(
    plan: Plan, state: State, bases: list[Any], model: Any, err: Exception
) -> None:
    """A tensor state left behind on another device when the model moved."""
    for k, base in enumerate(bases):
        if not _arrays.is_torch(base) or k >= len(state.states):
            continue
        for x in jax.tree_util.tree_leaves(state.states[k]):
            if _arrays.is_torch(x) and x.ndim and x.device != base.device:
                raise ValueError(
                    f"the state of {path_string(model, plan.params[k].primary)} holds a tensor "
                    f"on {x.device}, but the parameter is on {base.device}; the state's tensors "
                    "live on their parameter's device: call setup again after moving the model"
                ) from err
