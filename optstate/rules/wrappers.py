"""Rules that change *when* or *in what precision* another rule steps: gradient accumulation,
skipping non-finite steps, and a float32 master copy for low-precision parameters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from ._contract import AcrossParameters, Rule, increment
from ._numerics import cast, finfo, isdtype, namespace, select
from ._validate import member, positive_int, static


class AccumGradState(NamedTuple):
    total: Any  # running sum of the gradients of this round
    count: Any  # gradients gathered in this round, int32


@dataclass(frozen=True)
class AccumGrad(Rule):
    r"""Gradient accumulation: ``AccumGrad(n)``.

    Gathers ``n`` gradients, then passes on their mean: on steps :math:`1, \dots, n-1` of each
    round the step is zero and the rules after it in an ``OptimiserChain`` do not move (their
    states hold); on step :math:`n` they see :math:`\frac1n \sum_{i=1}^{n} g_i`. Put it first:
    ``OptimiserChain(AccumGrad(4), Adam(1e-3))`` steps Adam once every 4 calls with the mean of 4
    gradients, as ``optax.MultiSteps(optax.adam(1e-3), every_k_schedule=4)`` and Optimisers.jl's
    ``AccumGrad`` do. A tied parameter accumulates its summed gradient, once per step.

    Args:
        n: how many gradients make one step, a positive integer.

    Raises:
        ValueError: ``n < 1``.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.AccumGrad(2), ost.Descent(0.1)), model)
        >>> first = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, first)
        >>> model["enc"]  # the first of two: no step
        array([1., 2.])
        >>> second = {"enc": np.array([1.5, 1.0]), "dec": np.array([1.5, 1.0])}  # g = [3, 2]
        >>> state, model = ost.update(state, model, second)
        >>> model["enc"], model["dec"] is model["enc"]  # p - lr (g1 + g2) / 2 = p - 0.1 [2, 0]
        (array([0.8, 2. ]), True)
    """

    n: int = static(1, check=positive_int)

    def init(self, param: Any) -> AccumGradState:
        xp = namespace(param)
        return AccumGradState(xp.zeros_like(param), xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del hyper, param
        xp = namespace(grad)
        count = increment(state.count)
        total = state.total + grad
        done = count >= self.n
        mean = total / xp.asarray(self.n, dtype=total.dtype)
        new_state = AccumGradState(
            xp.where(done, xp.zeros_like(total), total), xp.where(done, 0, count)
        )
        return new_state, xp.where(done, mean, xp.zeros_like(mean))

    def ready(self, state: Any) -> Any:
        return state.count == 0  # a round just ended


class SkipState(NamedTuple):
    inner: Any
    skipped: Any  # steps skipped for a non-finite gradient, int32


@dataclass(frozen=True)
class SkipNonFinite(AcrossParameters):
    r"""Skip steps whose gradient is not finite: ``SkipNonFinite(rule)``.

    If any gradient of the parameters under this rule holds a NaN or an infinity, the step changes
    neither those parameters nor the inner rule's state, and ``skipped`` in the state counts it;
    otherwise it is ``rule``'s step. The test is on the summed gradients of all parameters the rule
    applies to, together, as ``optax.apply_if_finite`` tests all updates (without its limit on
    consecutive skips).

    Args:
        rule: the rule whose steps are skipped when a gradient is not finite.

    Raises:
        TypeError: ``rule`` is not an optstate rule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.SkipNonFinite(ost.Descent(0.1)), model)
        >>> bad = {"enc": np.array([np.nan, 1.0]), "dec": np.array([0.5, -1.0])}
        >>> state, model = ost.update(state, model, bad)
        >>> model["enc"], int(state.states[0].skipped)  # unchanged, one step skipped
        (array([1., 2.]), 1)
        >>> good = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, good)
        >>> model["enc"], model["dec"] is model["enc"]  # Descent's step, p - lr g
        (array([0.9, 2.2]), True)
    """

    rule: Rule = member()

    def hyper(self) -> Any:
        return self.rule.hyper()

    def clocks(self) -> Any:
        return self.rule.clocks()

    def tick(self, clock: Any, before: list[Any], after: list[Any]) -> Any:
        # A skipped step leaves ``skipped`` one higher: the inner rule did not step, nor its clock.
        xp = namespace(after[0].skipped)
        taken = after[0].skipped == before[0].skipped
        inner = self.rule.tick(clock, [s.inner for s in before], [s.inner for s in after])
        return select(xp, taken, inner, clock)

    def name(self) -> str:
        return f"SkipNonFinite({self.rule.name()})"

    def init(self, param: Any) -> SkipState:
        return SkipState(
            self.rule.init(param), namespace(param).zeros((), dtype=namespace(param).int32)
        )

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        xp = namespace(grads[0])
        finite = xp.all(xp.stack([xp.all(xp.isfinite(g)) for g in grads]))
        inner, steps = self.rule.apply_all(hypers, [s.inner for s in states], params, grads)
        skip = xp.astype(xp.logical_not(finite), xp.int32)
        new_states = [
            SkipState(select(xp, finite, n, s.inner), xp.asarray(s.skipped + skip))
            for n, s in zip(inner, states, strict=True)
        ]
        return new_states, [xp.where(finite, s, xp.zeros_like(s)) for s in steps]


class MixedPrecisionState(NamedTuple):
    master: Any  # the float32 copy of a low-precision parameter (None for others)
    inner: Any


@dataclass(frozen=True)
class MixedPrecision(Rule):
    r"""A float32 master copy for low-precision parameters: ``MixedPrecision(rule)``.

    For a ``bfloat16`` or ``float16`` parameter the state keeps a ``float32`` copy; ``rule`` runs on
    the copy with the gradient cast to ``float32``, and the parameter becomes the copy rounded to
    its own dtype. Small steps that would round away in ``bfloat16`` accumulate in the copy.
    Parameters of 32 bits or more are stepped by ``rule`` directly. It must wrap the whole rule
    (``MixedPrecision(OptimiserChain(...))``), not stand inside a chain.

    Args:
        rule: the rule that steps the float32 copy (the whole rule: a chain goes inside).

    Raises:
        TypeError: ``rule`` is not an optstate rule.

    Examples:
        >>> import jax.numpy as jnp, optstate as ost
        >>> w = jnp.ones(1, jnp.bfloat16)
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> grads = {"enc": jnp.full(1, 0.5, jnp.bfloat16), "dec": jnp.full(1, 0.5, jnp.bfloat16)}
        >>> for rule in (ost.Descent(1e-3), ost.MixedPrecision(ost.Descent(1e-3))):
        ...     state, m = ost.setup(rule, model), model
        ...     for _ in range(10):  # g = 1; 1 - 0.001 rounds back to 1 in bfloat16
        ...         state, m = ost.update(state, m, grads)
        ...     print(float(m["enc"][0]), m["dec"] is m["enc"])
        1.0 True
        0.98828125 True

        The copy reached 0.99, whose nearest ``bfloat16`` is 0.98828125 (spacing 2**-8 below 1).

    Reference: Micikevicius et al., *Mixed Precision Training* (ICLR 2018),
    https://arxiv.org/abs/1710.03740
    """

    rule: Rule = member()
    outermost: ClassVar[bool] = True

    def hyper(self) -> Any:
        return self.rule.hyper()

    def clocks(self) -> Any:
        return self.rule.clocks()

    def tick(self, clock: Any, before: list[Any], after: list[Any]) -> Any:
        return self.rule.tick(clock, [s.inner for s in before], [s.inner for s in after])

    def name(self) -> str:
        return f"MixedPrecision({self.rule.name()})"

    def init(self, param: Any) -> MixedPrecisionState:
        if not _low_precision(param):
            return MixedPrecisionState(None, self.rule.init(param))
        master = cast(param, namespace(param).float32)
        return MixedPrecisionState(master, self.rule.init(master))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        raise TypeError("MixedPrecision must be the outermost rule, not a member of a chain")

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        raise TypeError("MixedPrecision must be the outermost rule, not a member of a chain")

    def update_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        working = [p if s.master is None else s.master for s, p in zip(states, params, strict=True)]
        grads = [cast(g, w.dtype) for g, w in zip(grads, working, strict=True)]
        inner, updated = self.rule.update_all(hypers, [s.inner for s in states], working, grads)
        new_states = [
            MixedPrecisionState(None if s.master is None else u, i)
            for s, u, i in zip(states, updated, inner, strict=True)
        ]
        return new_states, [cast(u, p.dtype) for u, p in zip(updated, params, strict=True)]


def _low_precision(x: Any) -> bool:
    xp = namespace(x)
    return bool(isdtype(xp, x.dtype, "real floating")) and finfo(xp, x.dtype).bits < 32
