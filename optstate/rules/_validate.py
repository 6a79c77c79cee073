"""Declaring a rule's fields: which are hyper-parameters, their ranges, and the checks on them.

A rule is a frozen dataclass. Its fields are hyper-parameters unless marked ``static``:

* ``lr: float = hyper(1e-3, min=0)``: a hyper-parameter in ``[0, inf)``. A plain
  ``lr: float = 1e-3`` is a hyper-parameter with no range. A tuple default
  (``betas = hyper((0.9, 0.999), min=0, below=1)``) declares a tuple of that length, its range
  applying to each element.
* ``mu_dtype: Any = static(None, check=floating_dtype)``: part of the rule's structure (a flag, a
  dtype, an integer period), fixed at construction, with an optional check.

``Rule.__post_init__`` runs these checks when a rule is made, and ``adjust`` runs the same ones on
the values it is given, so a rule never holds a value its declaration refuses. A hyper-parameter may
be a real number, a 0-d real array (checked when its value is known, not under ``jit``) or a
schedule (whose numbers are checked where the schedule says which they are).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np

from ..schedules import Schedule

__all__ = [
    "Hyper",
    "Member",
    "Static",
    "flag",
    "floating_dtype",
    "hyper",
    "member",
    "nonnegative",
    "one_of",
    "positive_int",
    "static",
]

_KEY = "optstate"


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The declaration of a hyper-parameter field: its bounds (``min <= x``, ``above < x``,
    ``x <= max``, ``x < below``) and whether ``None`` is allowed (per element of a tuple)."""

    min: float | None = None
    above: float | None = None
    max: float | None = None
    below: float | None = None
    optional: bool = False
    elements: tuple[Hyper, ...] | None = None  # for a tuple: each element's own declaration

    def describe(self) -> str:
        low = "(-inf" if self.min is None and self.above is None else None
        if low is None:
            low = f"[{self.min:g}" if self.min is not None else f"({self.above:g}"
        if self.max is not None:
            high = f"{self.max:g}]"
        elif self.below is not None:
            high = f"{self.below:g})"
        else:
            high = "inf)"
        return f"in {low}, {high}"

    def holds(self, x: float) -> bool:
        if math.isnan(x):
            return False
        return (
            (self.min is None or x >= self.min)
            and (self.above is None or x > self.above)
            and (self.max is None or x <= self.max)
            and (self.below is None or x < self.below)
        )


@dataclasses.dataclass(frozen=True)
class Static:
    """The declaration of a static field: not a hyper-parameter; ``check(value)`` raises a
    ``TypeError`` or ``ValueError`` saying what the value must be."""

    check: Callable[[Any], None] | None = None


@dataclasses.dataclass(frozen=True)
class Member:
    """The declaration of a field that holds another rule (a wrapper's), or with ``many`` a tuple
    of rules (a chain's)."""

    many: bool = False


def member(*, many: bool = False) -> Any:
    """A field holding the rule a wrapper wraps (``SkipNonFinite(rule)``), or with ``many`` the
    tuple of rules of a chain."""
    return dataclasses.field(metadata={_KEY: Member(many)})


def hyper(
    default: Any = dataclasses.MISSING,
    *,
    min: float | None = None,
    above: float | None = None,
    max: float | None = None,
    below: float | None = None,
    optional: bool = False,
    elements: tuple[Hyper, ...] | None = None,
) -> Any:
    """A hyper-parameter field with its range, for a rule's dataclass body. For a tuple the range
    applies to each element, or ``elements`` gives each element its own (``Hyper(above=0)``)."""
    declared = Hyper(min, above, max, below, optional, elements)
    return dataclasses.field(default=default, metadata={_KEY: declared})


def static(
    default: Any = dataclasses.MISSING, *, check: Callable[[Any], None] | None = None
) -> Any:
    """A static field (not a hyper-parameter), with an optional check of its value."""
    return dataclasses.field(default=default, metadata={_KEY: Static(check)})


def declaration(field: dataclasses.Field[Any]) -> Hyper | Static | Member:
    """What a field was declared as; an undeclared field is a hyper-parameter with no range."""
    declared = field.metadata.get(_KEY)
    return declared if isinstance(declared, Hyper | Static | Member) else Hyper()


# -- the checks --------------------------------------------------------------------------------


def check_hyper(owner: str, name: str, declared: Hyper, value: Any, default: Any) -> None:
    """``value`` fits the declaration of hyper-parameter ``name`` of the rule ``owner``, or a
    ``TypeError`` (the wrong kind of value) or ``ValueError`` (out of range) says why."""
    where = f"{owner}({name}=...)"
    if isinstance(default, tuple):
        if not (isinstance(value, tuple) and len(value) == len(default)):
            raise TypeError(
                f"{where} must be a tuple of {len(default)} numbers or schedules, like the "
                f"default {default!r}; got {value!r}"
            )
        each = declared.elements or (declared,) * len(value)
        for i, (v, d) in enumerate(zip(value, each, strict=True)):
            if v is None and not d.optional:
                raise TypeError(
                    f"{where} must be a tuple of {len(default)} real numbers or schedules; "
                    f"element {i} is None"
                )
            _check_one(f"{where}[{i}]", d, v)
        return
    _check_one(where, declared, value)


def _check_one(where: str, declared: Hyper, value: Any) -> None:
    if value is None:
        if declared.optional:
            return
        raise TypeError(f"{where} must be a real number or a schedule, got None")
    if isinstance(value, Schedule):
        for x in value.levels():
            _check_range(f"{where} (a value of its schedule)", declared, x)
        return
    number = _real(value)
    if number is _NOT_REAL:
        raise TypeError(f"{where} must be a real number or a schedule, got {_show(value)}")
    if number is not None:  # None: a traced value, known only when the step runs
        _check_range(where, declared, number)


def _check_range(where: str, declared: Hyper, x: Any) -> None:
    number = _real(x)
    if isinstance(number, float) and not declared.holds(number):
        raise ValueError(f"{where} must be {declared.describe()}, got {number:g}")


_NOT_REAL: Any = object()


def _real(value: Any) -> float | Any | None:
    """``value`` as a Python float; ``None`` for a traced 0-d array; ``_NOT_REAL`` otherwise."""
    if isinstance(value, bool | np.bool_):
        return _NOT_REAL
    if isinstance(value, numbers.Real):
        return float(value)
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None or tuple(shape) != ():
        return _NOT_REAL
    if not _real_numeric(dtype):
        return _NOT_REAL
    try:
        return float(value)
    except Exception:  # a tracer: its value is not known yet
        return None


def _real_numeric(dtype: Any) -> bool:
    if type(dtype).__module__ == "torch":
        return not (dtype.is_complex or str(dtype) == "torch.bool")
    try:
        kind = np.dtype(dtype).kind
    except TypeError:
        return False
    return kind in "fiu" or (kind == "V" and "float" in str(dtype))  # ml_dtypes' floats


def _show(value: Any) -> str:
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (
            f"a {type(value).__name__} of dtype {value.dtype} and shape {tuple(value.shape)} "
            "(a 0-d real array is accepted)"
        )
    return repr(value)


# -- checks of static fields: each raises TypeError or ValueError with the reason ----------------


def floating_dtype(value: Any) -> None:
    """A ``mu_dtype`` check: ``None`` or a real floating dtype (NumPy, JAX, ml_dtypes or torch)."""
    if value is None:
        return
    if type(value).__module__ == "torch":
        ok = bool(value.is_floating_point)
    else:
        try:
            dtype = np.dtype(value)
        except TypeError:
            ok = False
        else:
            ok = dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)
    if not ok:
        raise TypeError(f"must be a real floating dtype (or None), got {value!r}")


def flag(value: Any) -> None:
    """A check for a boolean option."""
    if not isinstance(value, bool):
        raise TypeError(f"must be True or False, got {value!r}")


def nonnegative(value: Any) -> None:
    """A check for a static real number that must be at least zero."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"must be a real number, got {value!r}")
    if not float(value) >= 0:
        raise ValueError(f"must be >= 0, got {value!r}")


def positive_int(value: Any) -> None:
    """A check for a count such as ``AccumGrad(n)``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"must be a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"must be a positive integer, got {value!r}")


def one_of(*allowed: Any) -> Callable[[Any], None]:
    """A check for an option with a few allowed values."""

    def check(value: Any) -> None:
        if not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")

    return check
