"""Arithmetic on lists of arrays: the vocabulary of the rules' in-place forms.

``update_`` on mutable arrays (NumPy arrays, torch tensors) lets a rule put its new state and
parameters into the arrays they already have (``Rule.update_all_``): one call per operation for a
whole group of parameters, in the order of operations of ``torch.optim``'s ``foreach`` forms.
A form computes every new value first, into arrays of its own (the functions without a trailing
underscore make new arrays; those with one write into arrays the form itself made), and returns
the writes; ``commit_`` then makes all the writes of a step at once. So no value is read after
it was written, whatever arrays the gradients share with the parameters and states, and a step
that fails writes nothing.

These functions take lists of arrays of one namespace. On torch each is one multi-tensor kernel
(``torch._foreach_*``, what ``torch.optim``'s ``foreach`` implementations are built from); on
NumPy it is a loop. Scalars are Python numbers, one for the list or one per array.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from .. import _arrays

Arrays = Sequence[Any]
Scalars = float | Sequence[float]

# The dtypes an in-place form computes in: Python-number scalars meet them at their own
# precision, as the pure forms' 0-d arrays of the parameter's dtype do. 16-bit floats, whose pure
# forms compute their scalars in float32 first, and complex numbers take the pure form.
_FLOATS = ("float32", "float64")


def fits(states: Sequence[Any], params: Arrays, grads: Arrays) -> bool:
    """The parameters, gradients and rule states can be stepped in place: all NumPy arrays or all
    torch tensors, parameters and states writable, parameters and gradients float32 or float64,
    every state array that is not a count in its parameter's dtype; tensors dense (strided)."""
    if not params:
        return False
    torch = _arrays.is_torch(params[0])
    same = _arrays.is_torch if torch else _arrays.is_numpy
    strided = sys.modules["torch"].strided if torch else None
    for state, p, g in zip(states, params, grads, strict=True):
        if not (same(p) and same(g) and _arrays.writable(p)):
            return False
        if torch and not (p.layout == strided and g.layout == strided):
            return False
        if _dtype(p) not in _FLOATS or g.dtype != p.dtype:
            return False
        for x in jax.tree_util.tree_leaves(state):
            if not (same(x) and _arrays.writable(x)):
                return False
            if "int" not in _dtype(x) and x.dtype != p.dtype:  # a moment, not a count
                return False
    return True


def _dtype(x: Any) -> str:
    return str(x.dtype).removeprefix("torch.")


def _torch(xs: Arrays) -> Any:
    """The torch module if ``xs`` are tensors, else ``None``."""
    return sys.modules["torch"] if xs and _arrays.is_torch(xs[0]) else None


def _each(values: Scalars, n: int) -> list[float]:
    return [float(v) for v in values] if isinstance(values, Sequence) else [float(values)] * n


def values(xs: Arrays) -> list[int]:
    """The numbers held by 0-d arrays (a state's step counts)."""
    return [int(x.item()) for x in xs]


def counted(xs: Arrays) -> list[Any]:
    """New 0-d arrays ``x + 1`` (step counts)."""
    torch = _torch(xs)
    if torch is not None:  # a tensor operand: torch's path for a Python number is slower here
        return list(torch._foreach_add(list(xs), _ones(torch, xs, 1)))
    return [np.array(x + 1, dtype=x.dtype) for x in xs]


def count_(xs: Arrays, by: int) -> None:
    """``x += by`` for 0-d integer arrays (step counts)."""
    torch = _torch(xs)
    if torch is not None:
        torch._foreach_add_(list(xs), _ones(torch, xs, by))
        return
    for x in xs:
        x += by


def _ones(torch: Any, xs: Arrays, value: int) -> list[Any]:
    """``value`` as a 0-d tensor of the dtype and device of ``xs``'s first, once per array."""
    return [torch.full((), value, dtype=xs[0].dtype, device=xs[0].device)] * len(xs)


Writes = list[tuple[Any, Any]]  # (an array to write, its new value), made at once by ``commit_``


def commit_(writes: Writes) -> None:
    """Every ``target[...] = value`` of a step: one call (one ``torch._foreach_copy_`` for the
    tensors), after every new value has been computed. The values are new arrays of the targets'
    shapes and namespaces (dtypes are cast as ``same_kind``)."""
    tensors = [(t, v) for t, v in writes if _arrays.is_torch(t)]
    if tensors:
        sys.modules["torch"]._foreach_copy_([t for t, _ in tensors], [v for _, v in tensors])
    for target, value in writes:
        if not _arrays.is_torch(target):
            np.copyto(target, value, casting="same_kind")


def mul(xs: Arrays, value: float) -> list[Any]:
    """New arrays ``x * value``."""
    torch = _torch(xs)
    if torch is not None:
        return list(torch._foreach_mul(list(xs), value))
    return [_array(np.multiply(x, value)) for x in xs]


def add_scaled(xs: Arrays, ys: Arrays, alpha: float) -> list[Any]:
    """New arrays ``x + alpha * y``."""
    torch = _torch(xs)
    if torch is not None:
        return list(torch._foreach_add(list(xs), list(ys), alpha=alpha))
    return [_array(np.add(x, alpha * y)) for x, y in zip(xs, ys, strict=True)]


def lerp(xs: Arrays, ys: Arrays, weight: float) -> list[Any]:
    """New arrays ``x + weight * (y - x)``, i.e. ``(1 - weight) x + weight y``."""
    torch = _torch(xs)
    if torch is not None:
        return list(torch._foreach_lerp(list(xs), list(ys), weight))
    out = []
    for x, y in zip(xs, ys, strict=True):
        t = _array(np.subtract(y, x))
        t *= weight
        out.append(_array(np.add(x, t)))
    return out


def addcdiv(xs: Arrays, ys: Arrays, zs: Arrays, values: Scalars) -> list[Any]:
    """New arrays ``x + v * y / z``, with ``v`` one number or one per array."""
    torch = _torch(xs)
    each = _each(values, len(xs))
    if torch is not None:
        return list(torch._foreach_addcdiv(list(xs), list(ys), list(zs), each))
    out = []
    for x, y, z, v in zip(xs, ys, zs, each, strict=True):
        t = _array(np.divide(y, z))
        t *= v
        out.append(_array(np.add(x, t)))
    return out


def _array(x: Any) -> Any:
    """NumPy's 0-d results are scalars: arrays again."""
    return x if isinstance(x, np.ndarray) else np.asarray(x)


def add_(xs: Arrays, value: float) -> None:
    """``x += value``."""
    torch = _torch(xs)
    if torch is not None:
        torch._foreach_add_(list(xs), value)
        return
    for x in xs:
        x += value


def add_scaled_(xs: Arrays, ys: Arrays, alpha: float) -> None:
    """``x += alpha * y``."""
    torch = _torch(xs)
    if torch is not None:
        torch._foreach_add_(list(xs), list(ys), alpha=alpha)
        return
    for x, y in zip(xs, ys, strict=True):
        x += alpha * y


def addcmul_(xs: Arrays, ys: Arrays, zs: Arrays, value: float) -> None:
    """``x += value * y * z``."""
    torch = _torch(xs)
    if torch is not None:
        torch._foreach_addcmul_(list(xs), list(ys), list(zs), value)
        return
    for x, y, z in zip(xs, ys, zs, strict=True):
        t = np.multiply(y, z)
        t *= value
        x += t


def sqrt(xs: Arrays) -> list[Any]:
    """New arrays ``sqrt(x)``."""
    torch = _torch(xs)
    if torch is not None:
        return list(torch._foreach_sqrt(list(xs)))
    return [np.sqrt(x, out=np.empty_like(x)) for x in xs]  # arrays, also where 0-d


def div_(xs: Arrays, values: Scalars) -> None:
    """``x /= v``, with ``v`` one number or one per array."""
    torch = _torch(xs)
    each = _each(values, len(xs))
    if torch is not None:
        torch._foreach_div_(list(xs), each)
        return
    for x, v in zip(xs, each, strict=True):
        x /= v
