"""Schedules: hyper-parameters that are functions of the step count.

Pass a schedule wherever a rule takes a number, ``Adam(lr=ost.schedules.warmup_cosine(...))``.
A schedule is a small pytree whose numbers ``setup`` stores as 0-d arrays in the state, beside
the other hyper-parameters, and ``update`` evaluates it at the state's step count (0 on the first
step) inside the compiled step: changing its numbers with ``adjust`` does not recompile. Every
schedule reproduces the optax schedule of the same meaning, which the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import jax

from ._arrays import namespace

__all__ = [
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear",
    "piecewise_constant",
    "warmup_cosine",
]


class Schedule:
    """Base class: ``schedule(count)`` is the value at step ``count`` (a 0-d integer array)."""

    def __call__(self, count: Any) -> Any:
        raise NotImplementedError


def _float(count: Any, like: Any) -> Any:
    """``count`` as a float array of the dtype of ``like``, one of the schedule's numbers."""
    xp = namespace(count)
    return xp.astype(count, xp.asarray(like).dtype)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Constant(Schedule):
    value: Any

    def __call__(self, count: Any) -> Any:
        return namespace(count).asarray(self.value)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Linear(Schedule):
    init: Any
    end: Any
    steps: Any
    begin: Any

    def __call__(self, count: Any) -> Any:
        xp = namespace(count)
        t = _float(count, self.init)
        frac = xp.clip((t - self.begin) / self.steps, 0.0, 1.0)
        return self.init + (self.end - self.init) * frac


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CosineDecay(Schedule):
    init: Any
    steps: Any
    alpha: Any

    def __call__(self, count: Any) -> Any:
        xp = namespace(count)
        t = _float(count, self.init)
        frac = xp.clip(t / self.steps, 0.0, 1.0)
        cosine = 0.5 * (1 + xp.cos(math.pi * frac))
        return self.init * ((1 - self.alpha) * cosine + self.alpha)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    init: Any
    rate: Any
    steps: Any
    begin: Any
    end: Any  # a bound (lower when decaying, upper when growing); nan for none
    staircase: bool = field(default=False, metadata={"static": True})

    def __call__(self, count: Any) -> Any:
        xp = namespace(count)
        t = xp.maximum(_float(count, self.init) - self.begin, 0.0)
        exponent = t / self.steps
        if self.staircase:
            exponent = xp.floor(exponent)
        value = self.init * self.rate**exponent
        bound = xp.where(xp.isnan(self.end), value, self.end)
        return xp.where(self.rate < 1, xp.maximum(value, bound), xp.minimum(value, bound))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    boundaries: tuple[Any, ...]
    values: tuple[Any, ...]

    def __call__(self, count: Any) -> Any:
        xp = namespace(count)
        t = _float(count, self.values[0])
        value = xp.asarray(self.values[0])
        for boundary, v in zip(self.boundaries, self.values[1:], strict=True):
            value = xp.where(t >= boundary, v, value)
        return value


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Join(Schedule):
    schedules: tuple[Schedule, ...]
    boundaries: tuple[Any, ...]

    def __call__(self, count: Any) -> Any:
        xp = namespace(count)
        value = self.schedules[0](count)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:], strict=True):
            shift = xp.astype(xp.asarray(boundary), count.dtype)
            value = xp.where(count >= shift, schedule(count - shift), value)
        return value


# -- constructors ------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """``value`` at every step (``optax.constant_schedule``)."""
    return Constant(value)


def linear(init: float, end: float, steps: int, begin: int = 0) -> Schedule:
    """From ``init`` to ``end`` linearly over ``steps`` steps, starting at step ``begin``; ``init``
    before, ``end`` after (``optax.linear_schedule(init, end, steps, begin)``)."""
    if steps <= 0:
        raise ValueError(f"linear(steps=...) must be positive, got {steps}")
    return Linear(init, end, steps, begin)


def cosine_decay(init: float, steps: int, alpha: float = 0.0) -> Schedule:
    r"""Half a cosine from ``init`` down to ``alpha * init`` over ``steps`` steps, then flat:
    :math:`v_t = v_0\,((1-lpha)\,	frac12(1+\cos(\pi \min(t, T)/T)) + lpha)`
    (``optax.cosine_decay_schedule(init, steps, alpha)``).

    Reference: Loshchilov and Hutter, *SGDR: Stochastic Gradient Descent with Warm Restarts*
    (ICLR 2017), https://arxiv.org/abs/1608.03983
    """
    if steps <= 0:
        raise ValueError(f"cosine_decay(steps=...) must be positive, got {steps}")
    return CosineDecay(init, steps, alpha)


def warmup_cosine(
    peak: float, warmup_steps: int, decay_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init`` to ``peak`` over ``warmup_steps``, then cosine decay to ``end``
    until step ``decay_steps`` (which counts the warm-up, as in
    ``optax.warmup_cosine_decay_schedule(init, peak, warmup_steps, decay_steps, end)``)."""
    if not 0 < warmup_steps < decay_steps:
        raise ValueError(
            "warmup_cosine needs 0 < warmup_steps < decay_steps, "
            f"got warmup_steps={warmup_steps}, decay_steps={decay_steps}"
        )
    decay = cosine_decay(peak, decay_steps - warmup_steps, alpha=end / peak if peak else 0.0)
    return join([linear(init, peak, warmup_steps), decay], [warmup_steps])


def exponential_decay(
    init: float,
    rate: float,
    steps: int,
    *,
    begin: int = 0,
    staircase: bool = False,
    end: float | None = None,
) -> Schedule:
    """``init * rate ** ((t - begin) / steps)`` from step ``begin`` on (``init`` before), floored
    to whole periods with ``staircase``, and bounded by ``end`` if given
    (``optax.exponential_decay(init, steps, rate, begin, staircase, end)``)."""
    if steps <= 0:
        raise ValueError(f"exponential_decay(steps=...) must be positive, got {steps}")
    return ExponentialDecay(init, rate, steps, begin, math.nan if end is None else end, staircase)


def piecewise_constant(values: list[float], boundaries: list[int]) -> Schedule:
    """``values[0]`` before ``boundaries[0]``, ``values[i]`` from ``boundaries[i-1]`` on (as
    ``torch.optim.lr_scheduler.MultiStepLR`` or ``optax.piecewise_constant_schedule`` with the
    products of its scales as ``values``)."""
    if len(values) != len(boundaries) + 1:
        raise ValueError(
            "piecewise_constant needs one more value than boundaries, "
            f"got {len(values)} values and {len(boundaries)} boundaries"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"piecewise_constant boundaries must increase, got {boundaries}")
    return PiecewiseConstant(tuple(boundaries), tuple(values))


def join(schedules: list[Schedule], boundaries: list[int]) -> Schedule:
    """``schedules[0]`` until ``boundaries[0]``, then ``schedules[i]`` counted from
    ``boundaries[i-1]`` (``optax.join_schedules``)."""
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            "join needs one more schedule than boundaries, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    for s in schedules:
        if not isinstance(s, Schedule):
            raise TypeError(f"join takes schedules, got {s!r}")
    return Join(tuple(schedules), tuple(boundaries))
