"""A model's positions against its tie plan: the checks that a model still fits the plan, each
position's gradient read in its parameter's orientation, and the new arrays put back at every
position.

``update``, ``eval_params`` and the checkpoints read and write models through these; every check
runs before anything is computed or written.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

from . import _apply, _arrays
from ._errors import StructureError, TieError
from ._state import Plan
from ._ties import Slot, orientation, overlapping_pairs
from ._transpose import Transpose
from ._walk import path_string, path_strings, unwrap, wrap

__all__ = ["check_model", "check_structure", "describe", "layout", "oriented", "place", "unchanged"]


def check_structure(plan: Plan, treedef: Any, model: Any) -> None:
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


def check_model(plan: Plan, leaves: list[Any], bases: list[Any], model: Any) -> None:
    """The model still has the parameters and ties the state was set up for."""

    def name(pos: int) -> str:  # paths cost a walk over the model: only for a message
        return path_string(model, pos)

    for param, base in zip(plan.params, bases, strict=True):
        if not _arrays.is_trainable(base):
            raise ValueError(
                f"{name(param.primary)} was a parameter at setup but is now {describe(base)}; "
                "a state set up for a different model?"
            )
        why = _arrays.unusable(base)
        if why is not None:
            raise TypeError(f"{name(param.primary)} is {why}")
        if base.dtype != param.dtype or tuple(base.shape) != param.shape:
            raise ValueError(
                f"{name(param.primary)} changed since setup: the state is for "
                f"{param.dtype}{list(param.shape)}, the model holds {describe(base)} "
                "(a state set up for a different model?)"
            )
    owner: dict[int, int] = {}  # id(base array) -> the parameter it belongs to
    for pos, slot in enumerate(plan.slots):
        x, depth = unwrap(leaves[pos])
        if slot is None:
            if _arrays.is_trainable(x):
                raise ValueError(
                    f"{name(pos)} holds a parameter ({describe(x)}) that was not there at "
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


def unchanged(plan: Plan, leaves: list[Any], bases: list[Any]) -> bool:
    """The arrays of a model that ``update_`` returned, checked for what can change in place in
    a NumPy array or torch tensor: shape, dtype and device (``module.half()`` and ``.data = ...``
    keep the object), and the views that make ties. JAX arrays are immutable: always true."""
    for param, base in zip(plan.params, bases, strict=True):
        if base.dtype != param.dtype or base.shape != param.shape or _arrays.unusable(base):
            return False
    for pos in plan.checked:  # positions that are no parameter's own array
        slot, x = plan.slots[pos], leaves[pos]
        if slot is None:
            if _arrays.is_trainable(x):  # (an integer tensor given a float .data is one now)
                return False
        elif not _arrays.same_view(bases[slot.param], x, slot.perm):
            return False
    return True


def layout(
    plan: Plan, bases: list[Any], per_position: list[Any], model: Any
) -> tuple[_apply.Layout, list[Any]]:
    """Which positions carry a gradient to use, in what orientation, and those gradients."""
    layout: list[Any] = [_apply.ABSENT] * len(per_position)
    given = []
    for pos, slot in plan.trained:
        g = per_position[pos]
        if g is None:
            continue
        base = bases[slot.param]
        if (
            not slot.depth
            and slot.perm is None
            and getattr(g, "dtype", None) == base.dtype
            and getattr(g, "shape", None) == base.shape
            and not isinstance(g, Transpose | np.matrix)
        ):  # the common case, an array just like its parameter: every check of oriented holds
            layout[pos] = None
            given.append(g)
            continue
        read = oriented(slot, base, g, pos, model)
        if read is not None:
            layout[pos], g = read
            given.append(g)
    return tuple(layout), given


def oriented(slot: Slot, base: Any, g: Any, pos: int, model: Any) -> tuple[Any, Any] | None:
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


def place(plan: Plan, leaves: list[Any], bases: list[Any], changed: list[bool]) -> list[Any]:
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


def describe(x: Any) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{type(x).__name__} {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"
