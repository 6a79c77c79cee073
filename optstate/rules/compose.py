"""Composition of rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._base import Rule


@dataclass(frozen=True, init=False)
class OptimiserChain(Rule):
    r"""Rules applied one after another: ``OptimiserChain(*rules)``.

    Each rule's step is the next rule's gradient; the last one's step is subtracted from the
    parameter. ``OptimiserChain(ClipGrad(1.0), WeightDecay(1e-4), Momentum(0.1))`` clips the summed
    gradient, adds the decay term, then takes a momentum step. Every rule keeps its own state and
    hyper-parameters. The same as Optimisers.jl's ``OptimiserChain`` and ``optax.chain`` (with
    optax's sign convention: a step is subtracted, an optax update is added).
    """

    rules: tuple[Rule, ...]

    def __init__(self, *rules: Rule) -> None:
        for i, rule in enumerate(rules):
            if not isinstance(rule, Rule):
                raise TypeError(
                    f"OptimiserChain takes optstate rules; argument {i} is {rule!r} "
                    f"of type {type(rule).__name__}"
                )
        object.__setattr__(self, "rules", tuple(rules))

    def __repr__(self) -> str:
        return f"OptimiserChain({', '.join(map(repr, self.rules))})"

    def name(self) -> str:
        return f"OptimiserChain({', '.join(r.name() for r in self.rules)})"

    def hyper(self) -> tuple[Any, ...]:  # type: ignore[override]
        return tuple(rule.hyper() for rule in self.rules)

    def structure(self) -> OptimiserChain:
        return OptimiserChain(*(rule.structure() for rule in self.rules))

    def init(self, param: Any) -> tuple[Any, ...]:
        return tuple(rule.init(param) for rule in self.rules)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        (new_state,), (step,) = self.apply_all(hyper, [state], [param], [grad])
        return new_state, step

    def apply_all(
        self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        # Rule by rule over all parameters, so a rule that looks across parameters (such as
        # ClipGlobalNorm) sees every parameter's gradient as it stands at its place in the chain.
        members: list[list[Any]] = []
        for i, (rule, h) in enumerate(zip(self.rules, hyper, strict=True)):
            new, grads = rule.apply_all(h, [s[i] for s in states], params, grads)
            members.append(new)
        return [tuple(m) for m in zip(*members, strict=True)] or [() for _ in states], grads
