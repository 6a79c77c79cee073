"""Writing a step in place: the writes of a step made at once, and step counts moved for the
fused kernels.

``update_`` on mutable arrays (NumPy arrays, torch tensors) computes every new value first, by
the rules' own arithmetic, and ``commit_`` then makes all the writes of the step at once. So no
value is read after it was written, whatever arrays the gradients share with the parameters and
states, and a step that fails writes nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import _arrays

__all__ = ["Writes", "commit_", "count_", "values"]

Arrays = Sequence[Any]
Writes = list[tuple[Any, Any]]  # (an array to write, its new value), made at once by ``commit_``


def _torch(xs: Arrays) -> Any:
    """The torch module if ``xs`` are tensors, else ``None``."""
    return sys.modules["torch"] if xs and _arrays.is_torch(xs[0]) else None


def values(xs: Arrays) -> list[int]:
    """The numbers held by 0-d arrays (a state's step counts)."""
    return [int(x.item()) for x in xs]


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
