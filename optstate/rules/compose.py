"""Composition of rules."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import jax

from ._contract import AcrossParameters, Rule, check_member
from ._numerics import namespace, select
from ._validate import member


@dataclass(frozen=True, init=False)
class OptimiserChain(AcrossParameters):
    r"""Rules applied one after another: ``OptimiserChain(*rules)``.

    Each rule's step is the next rule's gradient; the last one's step is subtracted from the
    parameter. ``OptimiserChain(ClipGrad(1.0), WeightDecay(1e-4), Momentum(0.1))`` clips the summed
    gradient, adds the decay term, then takes a momentum step. Every rule keeps its own state and
    hyper-parameters. The same as Optimisers.jl's ``OptimiserChain`` and ``optax.chain`` (with
    optax's sign convention: a step is subtracted, an optax update is added).

    Args:
        *rules: the rules, in the order they act on the gradient.

    Raises:
        TypeError: an argument that is not an optstate rule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.ClipGrad(1.0), ost.Descent(0.1)), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # g clipped to [1, -1], then p - lr g
        (array([0.9, 2.1]), True)
    """

    rules: tuple[Rule, ...] = member(many=True)
    across: ClassVar[bool] = False  # only its members may look across parameters

    def __init__(self, *rules: Rule) -> None:
        for i, rule in enumerate(rules):
            check_member(rule, f"OptimiserChain (argument {i})")
            if i < len(rules) - 1 and _ends(rule):
                raise TypeError(
                    f"OptimiserChain (argument {i}): {rule.name()} gives a whole update, which "
                    "the rules after it would take as their gradient; it can only end a chain. "
                    "For an optax gradient transformation before optax's optimiser, chain them in "
                    "optax and bridge the chain: from_optax(optax.chain(...))"
                )
        object.__setattr__(self, "rules", tuple(rules))

    def __repr__(self) -> str:
        return f"OptimiserChain({', '.join(map(repr, self.rules))})"

    def name(self) -> str:
        return f"OptimiserChain({', '.join(r.name() for r in self.rules)})"

    def hyper(self) -> tuple[Any, ...]:
        return tuple(rule.hyper() for rule in self.rules)

    def structure(self) -> OptimiserChain:
        return OptimiserChain(*(rule.structure() for rule in self.rules))

    def clocks(self) -> tuple[Any, ...]:
        return tuple(rule.clocks() for rule in self.rules)

    def tick(self, clock: Any, before: list[Any], after: list[Any]) -> Any:
        # A member steps when every gathering member before it is ready (for one parameter of
        # the group at least: they step together when every parameter has a gradient).
        out = []
        gate = None  # per parameter: are the members so far ready?
        for i, rule in enumerate(self.rules):
            old, new = [s[i] for s in before], [s[i] for s in after]
            ticked = rule.tick(clock[i], old, new)
            if gate is not None:
                xp = namespace(gate[0])
                ticked = select(xp, xp.any(xp.stack(gate)), ticked, clock[i])
            out.append(ticked)
            flags = [rule.ready(s) for s in new]
            if flags[0] is not None:
                gate = flags if gate is None else [g & f for g, f in zip(gate, flags, strict=True)]
        return tuple(out)

    def ready(self, state: Any) -> Any:
        flags = [rule.ready(s) for rule, s in zip(self.rules, state, strict=True)]
        out = None
        for flag in flags:
            out = _both(out, flag)
        return out

    def init(self, param: Any) -> tuple[Any, ...]:
        return tuple(rule.init(param) for rule in self.rules)

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        # Rule by rule over all parameters, so a rule that looks across parameters (such as
        # ClipGlobalNorm) sees every parameter's gradient as it stands at its place in the chain.
        members: list[list[Any]] = []
        ready: list[Any] = [None] * len(states)  # per parameter: may the rules go on?
        for i, rule in enumerate(self.rules):
            old = [s[i] for s in states]
            new, grads = rule.apply_all([h[i] for h in hypers], old, params, grads)
            new = [_hold(r, n, o) for r, n, o in zip(ready, new, old, strict=True)]
            members.append(new)
            ready = [_both(r, rule.ready(n)) for r, n in zip(ready, new, strict=True)]
        steps = [
            g if r is None else select(namespace(g), r, g, namespace(g).zeros_like(g))
            for r, g in zip(ready, grads, strict=True)
        ]
        return [tuple(m) for m in zip(*members, strict=True)] or [() for _ in states], steps


def _ends(rule: Rule) -> bool:
    """``rule``, or the last rule of a chain or wrapper it is, gives a whole update."""
    members = rule.members()
    return type(rule).final or (bool(members) and _ends(members[-1]))


def _hold(ready: Any, new: Any, old: Any) -> Any:
    """A later rule's state only moves once the rules before it are ready."""
    if ready is None or not jax.tree_util.tree_leaves(new):
        return new
    return select(namespace(jax.tree_util.tree_leaves(new)[0]), ready, new, old)


def _both(a: Any, b: Any) -> Any:
    if a is None or b is None:
        return b if a is None else a
    return a & b
