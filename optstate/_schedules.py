"""The schedules' implementation: the public face is ``optstate.schedules`` (its docstring tells
what a schedule is and how it counts steps). The classes here (``Constant``, ``Linear``, ...) are
what the constructors return; checkpoints name them by module and qualified name, and
``checkpoint._values.resolve`` finds them again if they move.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import jax
import numpy as np

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

# Step counts are int32 in the state and saturate at this value (see ``_numerics.increment``).
MAX_STEP = 2**31 - 1


def _steps_field() -> Any:
    """A field that counts steps: an integer, stored as an int32 array in the state."""
    return field(metadata={"steps": True})


class Schedule:
    """Base class: ``schedule(count)`` is the value at step ``count`` (an integer, or a 0-d integer
    array of any namespace).

    Examples:
        >>> import numpy as np, optstate as ost
        >>> lr = ost.schedules.linear(0.1, 0.0, 10)
        >>> isinstance(lr, ost.schedules.Schedule), float(lr(5))  # halfway down
        (True, 0.05)
        >>> model = {"w": np.zeros(2)}
        >>> state = ost.setup(ost.Descent(lr), model)
        >>> for _ in range(2):  # steps at lr(0) = 0.1 and lr(1) = 0.09
        ...     state, model = ost.update(state, model, {"w": np.ones(2)})
        >>> np.round(model["w"], 12)
        array([-0.19, -0.19])
    """

    def __call__(self, count: Any) -> Any:
        raise NotImplementedError

    def levels(self) -> list[Any]:
        """The values the schedule starts, passes through or ends at (rules check them against the
        hyper-parameter's range)."""
        raise NotImplementedError

    def map_numbers(self, values: Callable[[Any], Any], steps: Callable[[Any], Any]) -> Schedule:
        """The schedule with ``values`` applied to its values and ``steps`` to its step counts (how
        ``setup`` turns them into arrays of the right kinds)."""
        changes: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.metadata.get("static"):
                continue
            value = getattr(self, f.name)
            convert = steps if f.metadata.get("steps") else values
            if isinstance(value, tuple):
                changes[f.name] = tuple(
                    v.map_numbers(values, steps) if isinstance(v, Schedule) else convert(v)
                    for v in value
                )
            else:
                changes[f.name] = convert(value)
        return replace(self, **changes)  # type: ignore[type-var]


def _count(count: Any) -> tuple[Any, Any]:
    """The namespace and ``count`` as a 0-d integer array (a Python or NumPy integer becomes a
    NumPy array, as optax's schedules take plain integers)."""
    if not hasattr(count, "dtype"):
        if not isinstance(count, numbers.Integral) or isinstance(count, bool):
            raise TypeError(f"a schedule's step must be an integer, got {count!r}")
        count = np.asarray(count, dtype=np.int64)
    xp = namespace(count)
    if not xp.isdtype(count.dtype, "integral"):
        raise TypeError(f"a schedule's step must be an integer, got dtype {count.dtype}")
    return xp, count


def _fraction(xp: Any, done: Any, total: Any, like: Any) -> Any:
    """``done / total`` as a float of ``like``'s dtype, from integers ``0 <= done <= total``."""
    dtype = xp.asarray(like).dtype
    return xp.astype(done, dtype) / xp.astype(xp.asarray(total), dtype)


def _clip(xp: Any, x: Any, low: Any, high: Any) -> Any:
    """``min(max(x, low), high)`` on integer arrays (``clip`` wants one dtype for its bounds)."""
    return xp.minimum(
        xp.maximum(x, xp.astype(xp.asarray(low), x.dtype)), xp.astype(xp.asarray(high), x.dtype)
    )


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Constant(Schedule):
    value: Any

    def __call__(self, count: Any) -> Any:
        xp, _ = _count(count)
        return xp.asarray(self.value)

    def levels(self) -> list[Any]:
        return [self.value]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Linear(Schedule):
    init: Any
    end: Any
    steps: Any = _steps_field()
    begin: Any = _steps_field()

    def __call__(self, count: Any) -> Any:
        xp, count = _count(count)
        done = _clip(xp, count - xp.astype(xp.asarray(self.begin), count.dtype), 0, self.steps)
        return self.init + (self.end - self.init) * _fraction(xp, done, self.steps, self.init)

    def levels(self) -> list[Any]:
        return [self.init, self.end]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class CosineDecay(Schedule):
    init: Any
    steps: Any = _steps_field()
    alpha: Any = 0.0

    def __call__(self, count: Any) -> Any:
        xp, count = _count(count)
        done = _clip(xp, count, 0, self.steps)
        cosine = 0.5 * (1 + xp.cos(math.pi * _fraction(xp, done, self.steps, self.init)))
        return self.init * ((1 - self.alpha) * cosine + self.alpha)

    def levels(self) -> list[Any]:
        return [self.init, self.init * self.alpha]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class ExponentialDecay(Schedule):
    init: Any
    rate: Any
    steps: Any = _steps_field()
    begin: Any = _steps_field()
    end: Any = math.nan  # a bound (lower when decaying, upper when growing); nan for none
    staircase: bool = field(default=False, metadata={"static": True})

    def __call__(self, count: Any) -> Any:
        xp, count = _count(count)
        elapsed = xp.maximum(count - xp.astype(xp.asarray(self.begin), count.dtype), 0)
        dtype = xp.asarray(self.init).dtype
        if self.staircase:  # whole periods, counted in integers
            exponent = xp.astype(elapsed // xp.astype(xp.asarray(self.steps), elapsed.dtype), dtype)
        else:
            exponent = xp.astype(elapsed, dtype) / xp.astype(xp.asarray(self.steps), dtype)
        value = self.init * self.rate**exponent
        bound = xp.where(xp.isnan(self.end), value, self.end)
        return xp.where(self.rate < 1, xp.maximum(value, bound), xp.minimum(value, bound))

    def levels(self) -> list[Any]:
        end = self.end
        return [self.init] if isinstance(end, float) and math.isnan(end) else [self.init, end]


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class PiecewiseConstant(Schedule):
    boundaries: tuple[Any, ...] = _steps_field()
    values: tuple[Any, ...] = ()

    def __call__(self, count: Any) -> Any:
        xp, count = _count(count)
        value = xp.asarray(self.values[0])
        for boundary, v in zip(self.boundaries, self.values[1:], strict=True):
            value = xp.where(count >= xp.astype(xp.asarray(boundary), count.dtype), v, value)
        return value

    def levels(self) -> list[Any]:
        return list(self.values)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Join(Schedule):
    schedules: tuple[Schedule, ...]
    boundaries: tuple[Any, ...] = _steps_field()

    def __call__(self, count: Any) -> Any:
        xp, count = _count(count)
        value = self.schedules[0](count)
        for boundary, schedule in zip(self.boundaries, self.schedules[1:], strict=True):
            shift = xp.astype(xp.asarray(boundary), count.dtype)
            value = xp.where(count >= shift, schedule(count - shift), value)
        return value

    def levels(self) -> list[Any]:
        return [x for s in self.schedules for x in s.levels()]


# -- checks of the constructors' arguments -----------------------------------------------------


def _value(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}({name}=...) must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{owner}({name}=...) must be finite, got {value!r}")
    return float(value)


def _steps(owner: str, name: str, value: Any, *, positive: bool = False) -> int:
    """A step count: an integer in ``[0, 2**31 - 1]`` (``[1, ...]`` if ``positive``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{owner}({name}=...) must be an integer number of steps, got {value!r}"
            " (are the arguments in this function's order? see its docstring)"
        )
    low = 1 if positive else 0
    if not low <= int(value) <= MAX_STEP:
        raise ValueError(f"{owner}({name}=...) must be in [{low}, 2**31 - 1], got {value}")
    return int(value)


# -- constructors ------------------------------------------------------------------------------


def constant(value: float) -> Schedule:
    """``value`` at every step (``optax.constant_schedule``).

    Args:
        value: the value, a finite real number.

    Returns:
        The ``Schedule``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: ``value`` is not finite.

    Examples:
        >>> from optstate import schedules
        >>> float(schedules.constant(0.5)(10))
        0.5
    """
    return Constant(_value("constant", "value", value))


def linear(init: float, end: float, steps: int, begin: int = 0) -> Schedule:
    """From ``init`` to ``end`` linearly over ``steps`` steps, starting at step ``begin``; ``init``
    before, ``end`` after (``optax.linear_schedule(init, end, steps, begin)``, the same order).

    Args:
        init: the value until step ``begin``.
        end: the value from step ``begin + steps`` on.
        steps: the length of the ramp, a positive integer.
        begin: the step at which the ramp starts, an integer >= 0.

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> [float(schedules.linear(1.0, 0.0, 4, begin=2)(t)) for t in (0, 2, 3, 6, 9)]
        [1.0, 1.0, 0.75, 0.0, 0.0]

    Raises:
        TypeError: a value that is not a real number, or a step count that is not an integer.
        ValueError: ``steps < 1``, ``begin < 0``, or a non-finite value.
    """
    return Linear(
        _value("linear", "init", init),
        _value("linear", "end", end),
        _steps("linear", "steps", steps, positive=True),
        _steps("linear", "begin", begin),
    )


def cosine_decay(init: float, steps: int, alpha: float = 0.0) -> Schedule:
    r"""Half a cosine from ``init`` down to ``alpha * init`` over ``steps`` steps, then flat:
    :math:`v_t = v_0\,((1-\alpha)\,\tfrac12(1+\cos(\pi \min(t, T)/T)) + \alpha)`
    (``optax.cosine_decay_schedule(init, steps, alpha)``, the same order).

    Args:
        init: the value at step 0.
        steps: the length of the decay :math:`T`, a positive integer.
        alpha: the final value as a fraction of ``init``, :math:`\alpha`.

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> [round(float(schedules.cosine_decay(2.0, 10)(t)), 6) for t in (0, 5, 10, 20)]
        [2.0, 1.0, 0.0, 0.0]

    Raises:
        TypeError, ValueError: as ``linear``.

    Reference: Loshchilov and Hutter, *SGDR: Stochastic Gradient Descent with Warm Restarts*
    (ICLR 2017), https://arxiv.org/abs/1608.03983
    """
    return CosineDecay(
        _value("cosine_decay", "init", init),
        _steps("cosine_decay", "steps", steps, positive=True),
        _value("cosine_decay", "alpha", alpha),
    )


def warmup_cosine(
    peak: float, *, warmup_steps: int, decay_steps: int, init: float = 0.0, end: float = 0.0
) -> Schedule:
    """Linear warm-up from ``init`` to ``peak`` over ``warmup_steps``, then cosine decay to ``end``
    until step ``decay_steps`` (which counts the warm-up), as
    ``optax.warmup_cosine_decay_schedule(init, peak, warmup_steps, decay_steps, end)``. The
    arguments after ``peak`` are keyword-only: optax takes them in another order.

    Args:
        peak: the value at the end of the warm-up.
        warmup_steps: the length of the warm-up, a positive integer (keyword-only).
        decay_steps: the step at which the decay ends, warm-up included (keyword-only).
        init: the value at step 0 (keyword-only).
        end: the value from step ``decay_steps`` on (keyword-only).

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> lr = schedules.warmup_cosine(1.0, warmup_steps=2, decay_steps=4)
        >>> [round(float(lr(t)), 6) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]

    Raises:
        TypeError, ValueError: as ``linear``; ``ValueError`` unless
            ``0 < warmup_steps < decay_steps``.
    """
    warmup = _steps("warmup_cosine", "warmup_steps", warmup_steps, positive=True)
    total = _steps("warmup_cosine", "decay_steps", decay_steps, positive=True)
    if not warmup < total:
        raise ValueError(
            "warmup_cosine needs 0 < warmup_steps < decay_steps, "
            f"got warmup_steps={warmup_steps}, decay_steps={decay_steps}"
        )
    peak = _value("warmup_cosine", "peak", peak)
    end = _value("warmup_cosine", "end", end)
    decay = cosine_decay(peak, total - warmup, alpha=end / peak if peak else 0.0)
    return join([linear(init, peak, warmup), decay], [warmup])


def exponential_decay(
    init: float,
    *,
    rate: float,
    steps: int,
    begin: int = 0,
    staircase: bool = False,
    end: float | None = None,
) -> Schedule:
    """``init * rate ** ((t - begin) / steps)`` from step ``begin`` on (``init`` before), floored
    to whole periods with ``staircase``, and bounded by ``end`` if given
    (``optax.exponential_decay(init, steps, rate, begin, staircase, end)``). The arguments after
    ``init`` are keyword-only: optax takes ``steps`` before ``rate``.

    Args:
        init: the value until step ``begin``.
        rate: the factor per ``steps`` steps, positive (keyword-only).
        steps: the period of one factor of ``rate``, a positive integer (keyword-only).
        begin: the step at which the decay starts, an integer >= 0 (keyword-only).
        staircase: apply ``rate`` once per whole period (keyword-only).
        end: a bound, lower when ``rate < 1`` and upper when ``rate > 1`` (``None``: none;
            keyword-only).

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> lr = schedules.exponential_decay(1.0, rate=0.5, steps=10)
        >>> [float(lr(t)) for t in (0, 10, 20)]
        [1.0, 0.5, 0.25]

    Raises:
        TypeError, ValueError: as ``linear``; ``ValueError`` for ``rate <= 0``.
    """
    rate = _value("exponential_decay", "rate", rate)
    if rate <= 0:
        raise ValueError(f"exponential_decay(rate=...) must be positive, got {rate}")
    if not isinstance(staircase, bool):
        raise TypeError(
            f"exponential_decay(staircase=...) must be True or False, got {staircase!r}"
        )
    return ExponentialDecay(
        _value("exponential_decay", "init", init),
        rate,
        _steps("exponential_decay", "steps", steps, positive=True),
        _steps("exponential_decay", "begin", begin),
        math.nan if end is None else _value("exponential_decay", "end", end),
        staircase,
    )


def piecewise_constant(values: Sequence[float], boundaries: Sequence[int]) -> Schedule:
    """``values[0]`` before ``boundaries[0]``, ``values[i]`` from ``boundaries[i-1]`` on (as
    ``torch.optim.lr_scheduler.MultiStepLR`` or ``optax.piecewise_constant_schedule`` with the
    products of its scales as ``values``).

    Args:
        values: the values, one more than ``boundaries``.
        boundaries: the steps at which the next value starts, increasing integers >= 0.

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> lr = schedules.piecewise_constant([1.0, 0.1, 0.01], [10, 20])
        >>> [float(lr(t)) for t in (0, 9, 10, 25)]
        [1.0, 1.0, 0.1, 0.01]

    Raises:
        TypeError: values that are not real numbers, boundaries that are not integers.
        ValueError: not one more value than boundaries, or boundaries that decrease.
    """
    if isinstance(values, dict | str) or isinstance(boundaries, dict | str):
        raise TypeError(
            "piecewise_constant(values, boundaries) takes two lists, e.g. "
            "piecewise_constant([1.0, 0.1], [1000]); optax's form with a dict of scales is "
            "optax.piecewise_constant_schedule"
        )
    values = [_value("piecewise_constant", "values", v) for v in values]
    bounds = [_steps("piecewise_constant", "boundaries", b) for b in boundaries]
    if len(values) != len(bounds) + 1:
        raise ValueError(
            "piecewise_constant needs one more value than boundaries, "
            f"got {len(values)} values and {len(bounds)} boundaries"
        )
    if bounds != sorted(bounds):
        raise ValueError(f"piecewise_constant boundaries must increase, got {list(boundaries)}")
    return PiecewiseConstant(tuple(bounds), tuple(values))


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[0]`` until ``boundaries[0]``, then ``schedules[i]`` counted from
    ``boundaries[i-1]`` (``optax.join_schedules``).

    Args:
        schedules: the schedules, one more than ``boundaries``; each counts from its start.
        boundaries: the steps at which the next schedule starts, increasing integers >= 0.

    Returns:
        The ``Schedule``.

    Examples:
        >>> from optstate import schedules
        >>> lr = schedules.join([schedules.constant(0.5), schedules.linear(1.0, 0.0, 2)], [3])
        >>> [float(lr(t)) for t in range(6)]
        [0.5, 0.5, 0.5, 1.0, 0.5, 0.0]

    Raises:
        TypeError: an entry that is not a schedule, or a boundary that is not an integer.
        ValueError: not one more schedule than boundaries, or boundaries that decrease.
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            "join needs one more schedule than boundaries, "
            f"got {len(schedules)} schedules and {len(boundaries)} boundaries"
        )
    for s in schedules:
        if not isinstance(s, Schedule):
            raise TypeError(f"join takes schedules, got {s!r}")
    bounds = [_steps("join", "boundaries", b) for b in boundaries]
    if bounds != sorted(bounds):
        raise ValueError(f"join boundaries must increase, got {list(boundaries)}")
    return Join(tuple(schedules), tuple(bounds))
