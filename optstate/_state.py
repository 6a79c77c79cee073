"""The optimiser state: one rule state per unique parameter, the hyper-parameters as arrays, and
the tie plan as static structure.

``State`` is a pytree. Its leaves are arrays (the rules' moments and counters, the
hyper-parameters and the schedules' clocks), so it goes through ``jax.jit`` and can be donated or
sharded; its static part is the ``Plan``: the model's structure, which positions share which
parameter, and the structure of each rule group. Two states with equal plans and same-shaped
arrays reuse one compiled step.

Parameters are trained in *groups*: the parameters whose rules have one structure (and, where a
member looks across parameters, the same values for it) are one group and step together, so a
``ClipGlobalNorm`` in their rule sees all of them. Within a group the other hyper-parameters may
differ: each parameter uses one of the group's *variants* (a set of hyper-parameter values).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from ._ties import Param, Slot
from .rules._contract import Rule


class Plan:
    """The static part of a state: model structure, tie plan, rule structures, frozen flags.

    Hashable and compared by value, so a jitted ``update`` compiles once per plan.
    """

    __slots__ = (
        "_hash",
        "checked",
        "frozen",
        "groups",
        "param_rules",
        "param_variants",
        "params",
        "rules",
        "slots",
        "trained",
        "treedef",
    )

    def __init__(
        self,
        treedef: Any,
        slots: tuple[Slot | None, ...],
        params: tuple[Param, ...],
        rules: tuple[Rule, ...],
        param_rules: tuple[int, ...],
        frozen: tuple[bool, ...] | None = None,
        param_variants: tuple[int, ...] | None = None,
    ) -> None:
        self.treedef = treedef
        self.slots = slots
        self.params = params
        self.rules = rules  # per group, with its hyper-parameters taken out: those are state
        self.param_rules = param_rules  # per parameter: its group (index into ``rules``); -1: none
        self.frozen = frozen if frozen is not None else (False,) * len(params)
        # per parameter: which of its group's variants of hyper-parameters it uses
        self.param_variants = (
            param_variants
            if param_variants is not None
            else tuple(0 if r >= 0 else -1 for r in param_rules)
        )
        self.groups = tuple(  # per group: its parameters
            tuple(k for k, r in enumerate(param_rules) if r == i) for i in range(len(rules))
        )
        # Derived, for the per-step loops: the positions whose gradient trains a parameter (with
        # their slots), and those whose leaf is not a parameter's own array (no parameter, or a
        # view of one), which a step checks again.
        self.trained = tuple(
            (pos, slot)
            for pos, slot in enumerate(slots)
            if slot is not None and not self.frozen[slot.param] and param_rules[slot.param] >= 0
        )
        self.checked = tuple(
            pos for pos, slot in enumerate(slots) if slot is None or slot.perm is not None
        )
        self._hash = hash(self._key())

    def _key(self) -> tuple[Any, ...]:
        return (
            self.treedef,
            self.slots,
            self.params,
            self.rules,
            self.param_rules,
            self.frozen,
            self.param_variants,
        )

    def replace(self, **changes: Any) -> Plan:
        fields = dict(
            treedef=self.treedef,
            slots=self.slots,
            params=self.params,
            rules=self.rules,
            param_rules=self.param_rules,
            frozen=self.frozen,
            param_variants=self.param_variants,
        )
        return Plan(**{**fields, **changes})

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Plan) and self._hash == other._hash and self._key() == other._key()
        )

    @property
    def n_ties(self) -> int:
        """How many parameters sit at more than one position."""
        return sum(len(p.positions) > 1 for p in self.params)


@jax.tree_util.register_pytree_with_keys_class
class State:
    """What ``setup`` returns and ``update`` advances.

    Made by ``setup``, not by hand: its tie plan and rule states must agree with each other.

    Attributes:
        states: one rule state per unique parameter, in the order of their first positions.
        hyper: per rule group, its variants of hyper-parameters (a tuple; one per distinct set of
            values among the group's parameters), each a tree of 0-d arrays and schedules of them
            (changing them with ``adjust`` does not recompile). ``optstate.hyperparams`` reads
            them as numbers, schedules evaluated.
        clocks: per rule group, the clock of its schedules: how many steps the rule has taken (a
            0-d int32 array, or a tuple of them for a chain, one per member).
        step: how many times ``update`` has run, a 0-d int32 array (saturating at ``2**31 - 1``).
        plan: the static tie plan (see ``Plan``).

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.ones((2, 3))
        >>> model = {"enc": w, "dec": ost.Transpose(w), "b": np.zeros(3)}
        >>> state = ost.setup(ost.Momentum(), model)
        >>> state
        State(Momentum; 2 parameters, 1 tied)
        >>> int(state.step), [s.velocity.shape for s in state.states]  # b first, then w
        (0, [(3,), (2, 3)])
    """

    __slots__ = ("_verified", "clocks", "hyper", "plan", "states", "step")

    def __init__(
        self,
        states: Sequence[Any],
        hyper: Sequence[Any],
        clocks: Sequence[Any],
        step: Any,
        plan: Plan,
    ) -> None:
        self.states = tuple(states)
        self.hyper = tuple(hyper)
        self.clocks = tuple(clocks)
        self.step = step
        self.plan = plan
        # Weak references to the leaves of the model that ``update`` returned with this state,
        # when they are all JAX arrays: a model holding exactly those arrays has passed every
        # check, and its arrays and this state's come out of a compiled step, ready for the next.
        self._verified: tuple[Any, ...] | None = None

    def tree_flatten_with_keys(self) -> tuple[Any, Plan]:
        key = jax.tree_util.GetAttrKey
        children = (
            (key("states"), self.states),
            (key("hyper"), self.hyper),
            (key("clocks"), self.clocks),
            (key("step"), self.step),
        )
        return children, self.plan

    @classmethod
    def tree_unflatten(cls, plan: Plan, children: Any) -> State:
        states, hyper, clocks, step = children
        return cls(states, hyper, clocks, step, plan)

    def replace(self, **changes: Any) -> State:
        fields = dict(
            states=self.states,
            hyper=self.hyper,
            clocks=self.clocks,
            step=self.step,
            plan=self.plan,
        )
        return State(**{**fields, **changes})

    def __repr__(self) -> str:
        rules = ", ".join(r.name() for r in self.plan.rules)
        n = len(self.plan.params)
        frozen = sum(self.plan.frozen)
        extra = f", {frozen} frozen" if frozen else ""
        return f"State({rules}; {n} parameters, {self.plan.n_ties} tied{extra})"


def plan_of(state: Any, call: str) -> Plan:
    """The tie plan of ``state``, or a TypeError naming the call (``call``, such as
    ``"update(state, model, grads)"``) when ``state`` is not a ``State``."""
    if not isinstance(state, State):
        raise TypeError(
            f"expected the State returned by optstate.setup, got {type(state).__name__}; "
            f"the call is {call}"
        )
    return state.plan
