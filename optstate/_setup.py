"""``setup``: walk the model, find its ties, and give each unique parameter one rule state."""

from __future__ import annotations

from typing import Any

import jax

from . import _arrays
from ._state import Plan, State
from ._ties import find_ties
from ._walk import flatten, path_strings, unwrap
from .rules._base import Rule


def setup(rule: Rule, model: Any) -> State:
    """The optimiser state of ``model`` under ``rule``: one rule state per unique parameter.

    ``model`` is any pytree (dicts, lists, tuples, namedtuples, registered dataclasses, Equinox
    modules, Flax parameter dicts). Its parameters are its floating and complex arrays (NumPy or
    JAX); everything else passes through ``update`` untouched. A parameter found at several
    positions (the same array object, ``Transpose(p)``, or a NumPy view such as ``W.T``) gets a
    single state, and ``update`` sums its gradients before the rule sees them.

    Call ``setup`` outside ``jax.jit``: inside, every position is a fresh tracer and ties cannot be
    seen. The returned state carries the tie plan, so a jitted ``update`` keeps applying it.

    Example:
        >>> import numpy as np, optstate as ost
        >>> w = np.ones((2, 3))
        >>> state = ost.setup(ost.Momentum(0.1), {"enc": w, "dec": ost.Transpose(w)})
        >>> state
        State(Momentum; 1 parameters, 1 tied)

    Raises:
        TypeError: ``rule`` is not an optstate rule.
        TieError: two leaves overlap in memory in a way that is not a tie (a slice or reshape).
    """
    if not isinstance(rule, Rule):
        hint = " (a rule class: call it, e.g. Adam())" if isinstance(rule, type) else ""
        raise TypeError(
            f"setup expects an optstate rule such as optstate.Adam(1e-3){hint}; "
            f"got {rule!r} of type {type(rule).__name__}"
        )
    leaves, treedef = flatten(model)
    slots, params = find_ties(leaves, lambda: path_strings(model))
    bases = [unwrap(leaves[p.primary])[0] for p in params]
    like = bases[0] if bases else None
    hyper = jax.tree_util.tree_map(lambda v: _arrays.hyper_array(v, like), rule.hyper())
    plan = Plan(treedef, slots, params, (rule.structure(),), (0,) * len(params))
    return State([rule.init(base) for base in bases], [hyper], plan)
