"""``update`` and ``update_``: gather each parameter's gradients, apply its rule once, and put the
one new array back at every position.

Data flows one way: model -> positions -> (tie plan) -> one summed gradient per parameter -> rule
-> one new array per parameter -> positions -> model. Every check runs before anything is computed
or written, so a bad call leaves state and model as they were.
"""

from __future__ import annotations

import numbers
import weakref
from typing import Any

import jax
import numpy as np

from . import _apply, _arrays
from ._errors import StructureError, TieError
from ._state import Plan, State
from ._ties import Slot, orientation, overlapping_pairs
from ._transpose import Transpose
from ._walk import flatten, gather, path_string, path_strings, unwrap, wrap
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
    if _arrays.is_torch_module(model):
        from .interop.torch import update_module

        return update_module(state, model, grads, in_place=False)
    return _step(state, model, grads, in_place=False, donate=donate)


def update_(state: State, model: Any, grads: Any) -> tuple[State, Any]:
    """``update``, writing each new parameter into its array where that array is writable (NumPy
    arrays, torch tensors), so views and ties held elsewhere see the step. Returns
    ``(state, model)`` like ``update``; the written arrays are the same objects as before. JAX
    arrays are immutable: for them it is ``update``. Where a rule has an in-place form
    (``Descent``, ``Momentum``, ``Nesterov``, ``Adam``, ``AdamW``) and the arrays allow it
    (writable float32 or float64 NumPy arrays or torch tensors, moments in the parameter's
    dtype), the rule's state is written in place too, and the returned state holds the same
    arrays: keep a copy (``copy.deepcopy``) to hold on to an earlier state. ``Adam``, ``AdamW``
    and ``AdaGrad`` on contiguous torch tensors of one device and dtype (16-bit included) run
    torch's fused kernels when theirs is the step's only rule group (docs/pytorch.md). A torch
    ``nn.Module`` has its Parameters written in place and is returned itself (see
    ``optstate.interop.torch``).

    Every new value is computed before any is written, so ``update_`` gives what ``update``
    gives whatever memory the gradients share with the parameters and the state (a gradient may
    be another parameter's array), and a step that fails writes nothing, step counts included.
    """
    if _arrays.is_torch_module(model):
        from .interop.torch import update_module

        return update_module(state, model, grads, in_place=True)
    return _step(state, model, grads, in_place=True, donate=False)


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
    plan = _plan(_held_state(state))
    if _arrays.is_torch_module(model):
        from .interop.torch import parameters

        model = parameters(model)
    leaves, treedef = flatten(model)
    _check_structure(plan, treedef, model)
    bases = [unwrap(leaves[p.primary])[0] for p in plan.params]
    viewed = {s.param for s in plan.slots if s is not None and s.perm is not None}
    for k in viewed:
        if _arrays.is_jax(bases[k]) and not _arrays.is_tracer(bases[k]):
            bases[k] = np.array(bases[k])  # views are NumPy's: rebuilt on one NumPy array
    return treedef.unflatten(_place(plan, leaves, bases, changed=[True] * len(bases)))


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


def _plan(state: Any) -> Plan:
    if not isinstance(state, State):
        raise TypeError(
            f"expected the State returned by optstate.setup, got {type(state).__name__}; "
            "the call is update(state, model, grads)"
        )
    return state.plan


def _step(
    state: State, model: Any, grads: Any, *, in_place: bool, donate: bool
) -> tuple[State, Any]:
    plan = _plan(state)
    leaves, treedef = flatten(model)
    _check_structure(plan, treedef, model)
    bases = [unwrap(leaves[p.primary])[0] for p in plan.params]
    verified = _returned_with(state, leaves)
    # The very arrays of the last step: only what can change in place in them is checked again.
    if not verified or not _unchanged(plan, leaves, bases):
        _check_model(plan, leaves, bases, model)
    grads = _structural(grads, model)
    torch_model = any(_arrays.is_torch(b) for b in bases)
    if torch_model:
        from .interop.torch import named_grads  # only imported once torch is

        grads = named_grads(model, grads)  # a name left out of a named dict: no gradient
    per_position = gather(plan.treedef, model, grads)
    if torch_model:
        from .interop.torch import checked_gradients  # only imported once torch is

        per_position = checked_gradients(plan, bases, per_position, model)
    layout, given = _layout(plan, bases, per_position, model)

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
            # The compiled step's outputs are strongly typed, and committed to the parameters'
            # devices if any input is: inputs that are not yet (weak types, a count created
            # without a device beside committed parameters, or the other way round) are made so,
            # or the second step would compile again.
            # A weakly typed gradient (a weakly typed parameter's, on the first step) would make
            # the next step, whose gradient is strongly typed, compile again.
            if any(getattr(g, "weak_type", False) for g in given):
                given = [_arrays.strong(g) for g in given]
            if not verified:
                inputs = [
                    *active_bases,
                    *jax.tree_util.tree_leaves(active_states),
                    *jax.tree_util.tree_leaves(clocks),
                    step_count,
                ]
                committed = any(getattr(x, "committed", False) for x in [*inputs, *given])
                if any(_arrays.unsettled(x, committed) for x in inputs):
                    active_states = [
                        jax.tree_util.tree_map(lambda x, b=b: _arrays.settled(x, b, committed), s)
                        for s, b in zip(active_states, active_bases, strict=True)
                    ]
                    first = active_bases[0]
                    step_count = _arrays.settled(step_count, first, committed)
                    clocks = jax.tree_util.tree_map(
                        lambda x: _arrays.settled(x, first, committed), clocks
                    )
                    active_bases = [_arrays.settled(b, b, committed) for b in active_bases]
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

    changed = [False] * len(bases)
    for k in active:
        if new_bases[k] is bases[k]:
            continue  # written in place already (or the rule left it as it was)
        if in_place and _arrays.writable(bases[k]):
            _arrays.write_(bases[k], new_bases[k])
            new_bases[k] = bases[k]  # every position already holds the new values
        else:
            changed[k] = True
    new_leaves = _place(plan, leaves, new_bases, changed)
    new_state = State(new_states, state.hyper, new_clocks, count, plan)
    if compiled and len(active) == _apply.n_trained(plan):  # every array came out of the step
        new_state._verified = _references(new_leaves)
    elif in_place and not compiled and not any(changed):  # the model's own arrays, checked
        new_state._verified = _references(new_leaves, mutable=True)
    return new_state, treedef.unflatten(new_leaves)


def _references(leaves: list[Any], *, mutable: bool = False) -> tuple[Any, ...] | None:
    """Weak references to ``leaves`` if they are all JAX arrays (see ``State._verified``), or
    with ``mutable``, all NumPy arrays and torch tensors (which ``_unchanged`` checks again)."""
    if mutable:
        if not all(_arrays.has_layout(x) for x in leaves):
            return None
    elif not all(_arrays.is_jax(x) and not _arrays.is_tracer(x) for x in leaves):
        return None
    return tuple(weakref.ref(x) for x in leaves)


def _unchanged(plan: Plan, leaves: list[Any], bases: list[Any]) -> bool:
    """The arrays of a model that ``update_`` returned, checked for what can change in place in
    a NumPy array or torch tensor: shape, dtype and device (``module.half()`` and ``.data = ...``
    keep the object), and the views that make ties. JAX arrays are immutable: always true."""
    for param, base in zip(plan.params, bases, strict=True):
        if base.dtype != param.dtype or base.shape != param.shape or _arrays.unusable(base):
            return False
    return all(
        not _arrays.is_trainable(x)  # (an integer tensor given a float .data is one now)
        if slot is None
        else slot.perm is None or _arrays.same_view(bases[slot.param], x, slot.perm)
        for slot, x in zip(plan.slots, leaves, strict=True)
    )


def _returned_with(state: State, leaves: list[Any]) -> bool:
    """``leaves`` are the very arrays ``update`` returned with ``state``."""
    refs = state._verified
    return (
        refs is not None
        and len(refs) == len(leaves)
        and all(ref() is x for ref, x in zip(refs, leaves, strict=True))
    )


def _structural(grads: Any, model: Any) -> Any:
    """A ``Grads`` of the implicit bridge (totals keyed by array) as a structural gradient."""
    from .implicit import Grads  # the bridge is built on this module, not the other way round

    return grads.to_tree(model) if isinstance(grads, Grads) else grads


def _place(plan: Plan, leaves: list[Any], bases: list[Any], changed: list[bool]) -> list[Any]:
    """Every position's new leaf: the parameter's new array, oriented and wrapped as before."""
    out = list(leaves)
    views: dict[tuple[int, Any], Any] = {}
    for pos, slot in enumerate(plan.slots):
        if slot is None or not changed[slot.param]:
            continue
        key = (slot.param, slot.perm)
        view = views.get(key)
        if view is None:
            view = views[key] = _arrays.permute(bases[slot.param], slot.perm)
        out[pos] = wrap(view, slot.depth)
    return out


# -- checks ------------------------------------------------------------------------------------


def _check_structure(plan: Plan, treedef: Any, model: Any) -> None:
    if treedef == plan.treedef:
        return
    expected = path_strings(plan.treedef.unflatten([0] * plan.treedef.num_leaves))
    actual = path_strings(model)
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    detail = ""
    if missing:
        detail += f"; positions missing from the model: {', '.join(missing[:5])}"
    if extra:
        detail += f"; positions the state does not know: {', '.join(extra[:5])}"
    raise StructureError(
        "the model does not have the structure the state was set up for (a state set up for a "
        f"different model?){detail}. Expected {plan.treedef}, got {treedef}"
    )


def _check_model(plan: Plan, leaves: list[Any], bases: list[Any], model: Any) -> None:
    """The model still has the parameters and ties the state was set up for."""

    def name(pos: int) -> str:  # paths cost a walk over the model: only for a message
        return path_string(model, pos)

    for param, base in zip(plan.params, bases, strict=True):
        if not _arrays.is_trainable(base):
            raise ValueError(
                f"{name(param.primary)} was a parameter at setup but is now {_describe(base)}; "
                "a state set up for a different model?"
            )
        why = _arrays.unusable(base)
        if why is not None:
            raise TypeError(f"{name(param.primary)} is {why}")
        if base.dtype != param.dtype or tuple(base.shape) != param.shape:
            raise ValueError(
                f"{name(param.primary)} changed since setup: the state is for "
                f"{param.dtype}{list(param.shape)}, the model holds {_describe(base)} "
                "(a state set up for a different model?)"
            )
    owner: dict[int, int] = {}  # id(base array) -> the parameter it belongs to
    for pos, slot in enumerate(plan.slots):
        x, depth = unwrap(leaves[pos])
        if slot is None:
            if _arrays.is_trainable(x):
                raise ValueError(
                    f"{name(pos)} holds a parameter ({_describe(x)}) that was not there at "
                    "setup; call setup again"
                )
            continue
        if depth != slot.depth:
            raise ValueError(
                f"{name(pos)} had {slot.depth} Transpose layer(s) at setup, now {depth}"
            )
        base = bases[slot.param]
        if _arrays.is_tracer(base):
            continue  # under jit identity means nothing: the plan stands for the ties
        primary = plan.params[slot.param].primary
        if pos == primary:
            first = owner.setdefault(id(base), slot.param)
            if first != slot.param:
                raise TieError(
                    f"{name(pos)} and {name(plan.params[first].primary)} hold the same array "
                    "now, but were separate parameters at setup; call setup again to train "
                    "them as one"
                )
        elif not (x is base or _arrays.same_view(base, x, slot.perm)):
            raise TieError(
                f"the tie between {name(primary)} and {name(pos)} is broken: they held one "
                "parameter at setup but now hold different arrays. After a step under jax.jit "
                "(which returns a separate array per position) call "
                "optstate.retie(state, model), or compile the step with optstate.jit, which "
                "returns a tied weight as one array; to untie on purpose, call setup again"
            )
    if any(_arrays.is_view(b) for b in bases):  # only views overlap
        for i, j in overlapping_pairs(bases):
            if _arrays.shares_memory(bases[i], bases[j]):
                raise TieError(
                    f"{name(plan.params[i].primary)} and {name(plan.params[j].primary)} share "
                    "memory now, but were separate parameters at setup; call setup again to "
                    "train a view and its array as one, or pass a copy"
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

    for k, base in enumerate(bases):  # a tensor state left behind when the model moved
        if not _arrays.is_torch(base) or k >= len(state.states):
            continue
        for x in jax.tree_util.tree_leaves(state.states[k]):
            if _arrays.is_torch(x) and x.ndim and x.device != base.device:
                raise ValueError(
                    f"the state of {path_string(model, plan.params[k].primary)} holds a tensor "
                    f"on {x.device}, but the parameter is on {base.device}; the state's tensors "
                    "live on their parameter's device: call setup again after moving the model"
                ) from err
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


def _describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"


def _layout(
    plan: Plan, bases: list[Any], per_position: list[Any], model: Any
) -> tuple[_apply.Layout, list[Any]]:
    """Which positions carry a gradient to use, in what orientation, and those gradients."""
    layout: list[Any] = [_apply.ABSENT] * len(per_position)
    given = []
    for pos, slot in enumerate(plan.slots):
        g = per_position[pos]
        if slot is None or g is None:
            continue
        k = slot.param
        if plan.frozen[k] or plan.param_rules[k] < 0:
            continue
        base = bases[k]
        if (
            not slot.depth
            and slot.perm is None
            and getattr(g, "dtype", None) == base.dtype
            and getattr(g, "shape", None) == base.shape
            and not isinstance(g, Transpose | np.matrix)
        ):  # the common case, an array just like its parameter: every check of _oriented holds
            layout[pos] = None
            given.append(g)
            continue
        oriented = _oriented(slot, base, g, pos, model)
        if oriented is not None:
            layout[pos], g = oriented
            given.append(g)
    return tuple(layout), given


def _oriented(slot: Slot, base: Any, g: Any, pos: int, model: Any) -> tuple[Any, Any] | None:
    """A position's gradient as an array, checked, and its orientation relative to the base."""
    remaining = slot.depth
    while remaining and isinstance(g, Transpose):
        g, remaining = g.parent, remaining - 1
    if g is None:
        return None

    def fail(message: str, error: type[Exception] = ValueError) -> Exception:
        return error(message.format(path=path_string(model, pos, "grads")))

    if isinstance(g, Transpose):
        raise fail(
            "the gradient at {path} is a Transpose, but the model holds no Transpose "
            "there; give a plain array"
        )
    if isinstance(g, np.matrix):  # (scipy.sparse's todense()): its * would be a matrix product
        g = np.asarray(g)
    if not hasattr(g, "shape"):
        if not isinstance(g, numbers.Number | list | tuple):
            raise fail(
                f"the gradient at {{path}} must be an array (or None), got {type(g).__name__}",
                TypeError,
            )
        # Under jax.jit a list's numbers arrive as traced scalars, which NumPy cannot hold.
        traced = any(_arrays.is_jax(x) for x in jax.tree_util.tree_leaves(g))
        try:
            g = jax.numpy.asarray(g) if traced else np.asarray(g)
        except (ValueError, TypeError) as err:  # a ragged list
            reason = str(err).replace("{", "{{").replace("}", "}}")
            raise fail("the gradient at {path} is not a rectangular array: " + reason) from None
    if _arrays.has_dtype(g) and not _arrays.is_numeric(g.dtype):
        dtype = str(g.dtype).replace("{", "{{").replace("}", "}}")
        raise fail(
            f"the gradient at {{path}} has dtype {dtype}; a gradient holds numbers (floating, "
            "integer or complex), not booleans, strings or objects",
            TypeError,
        )
    if _arrays.is_complex(g) and not _arrays.is_complex(base):
        raise fail(
            f"the gradient at {{path}} is complex ({g.dtype}) but the parameter is real "
            f"({base.dtype})"
        )
    orient = orientation(slot, base.ndim, remaining)
    expected = tuple(base.shape) if orient is None else tuple(base.shape[a] for a in orient)
    if tuple(g.shape) != expected:
        hint = ""
        if remaining and tuple(g.shape) == tuple(base.shape):
            hint = (
                " (a dense gradient at a Transpose position is in the transposed orientation; "
                "wrap one in the parent's orientation as optstate.Transpose(g))"
            )
        raise fail(
            f"the gradient at {{path}} has shape {tuple(g.shape)}, expected {expected}"
            f"{' (the transpose of the parameter)' if remaining else ''}{hint}"
        )
    return orient, g
