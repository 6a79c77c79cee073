"""Which positions of a model hold the same parameter.

Three kinds of tie, found without any annotation:

* the same array object at several positions;
* ``Transpose(p)`` at a position: the parameter is ``p``, seen transposed;
* views, of NumPy arrays and of torch tensors alike: a leaf that is ``W.T`` (or any axis
  permutation of ``W``: torch's ``W.t()``, ``W.permute(...)``, ``W.transpose(0, 1)``; or ``W``
  itself through another view object) shares ``W``'s memory and is the same parameter in another
  orientation. It is recognised from the memory layout: the same start address, element type and
  device, and permuted shape and strides.

Any other memory overlap between two leaves (a slice, a reshape, a partial overlap, a NumPy array
and a tensor over the same buffer) cannot be trained as one parameter and is refused. Only floating
and complex arrays are parameters: equal values are never a tie, and numbers, strings, functions
and integer arrays are never trained.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

from . import _arrays
from ._arrays import Perm
from ._errors import TieError
from ._walk import unwrap


class Slot(NamedTuple):
    """Where a position's array comes from: ``wrap(permute(base, perm), depth)``."""

    param: int  # index of the unique parameter
    perm: Perm  # the leaf is ``base.transpose(perm)``: NumPy and torch views only
    depth: int  # how many ``Transpose`` nodes wrap the leaf


class Param(NamedTuple):
    """One unique parameter: its positions, and the shape and dtype of its base orientation."""

    primary: int  # a position whose leaf is the base array itself
    positions: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: Any  # a NumPy dtype (hashable, compared by value)


# While ``optstate.jit`` traces a function: the traced values it gave to the positions of NumPy
# views (JAX has no views, so such a position holds the base's traced value, permuted), by id, as
# ``(view, base, perm)``. ``None`` outside ``optstate.jit``: it also tells ``setup`` where it is.
TRACED_VIEWS: ContextVar[dict[int, tuple[Any, Any, Perm]] | None] = ContextVar(
    "optstate_traced_views", default=None
)


def orientation(slot: Slot, ndim: int, depth: int | None = None) -> Perm:
    """The axis order, relative to the base, of the array ``depth`` Transpose layers out from
    the leaf of ``slot`` (all of them by default)."""
    layers = slot.depth if depth is None else depth
    return _arrays.reverse(slot.perm, ndim) if layers % 2 else slot.perm


class Groups:
    """Union-find over candidate objects (by index)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        self.parent[self.find(i)] = self.find(j)


def find_ties(
    leaves: list[Any], paths: Callable[[], list[str]]
) -> tuple[tuple[Slot | None, ...], tuple[Param, ...]]:
    """The tie plan of a flattened model: a slot per position and the unique parameters.

    Three passes: the distinct trainable arrays, in order of first position; the groups of
    arrays that are views of one memory; each group's base orientation and every position's
    permutation of it. ``paths`` gives the positions' names; it is only called to write an error
    message.
    """
    objects, where = _distinct_arrays(leaves)
    ordered = _view_groups(objects, where, paths)
    slots: list[Slot | None] = [None] * len(leaves)
    params: list[Param] = []
    for group in ordered:
        # The base orientation: the array that owns the memory, else a C-contiguous one.
        root = group[0] if len(group) == 1 else min(group, key=lambda k: root_rank(objects[k]))
        base = objects[root]
        p = len(params)
        positions = []
        for k in group:
            perm = None if k == root else _arrays.view_permutation(base, objects[k])
            if perm is False:  # cannot happen: permutations of permutations of the root's layout
                raise TieError(
                    f"inconsistent views of one array: {base.shape} and {objects[k].shape}"
                )
            for pos, depth, traced_perm in where[k]:
                slots[pos] = Slot(p, perm if traced_perm is None else traced_perm, depth)
                positions.append(pos)
        primary = next(pos for pos, _, traced_perm in where[root] if traced_perm is None)
        params.append(Param(primary, tuple(sorted(positions)), tuple(base.shape), base.dtype))
    return tuple(slots), tuple(params)


Where = list[list[tuple[int, int, Perm]]]  # per distinct array: (position, depth, traced view)


def _distinct_arrays(leaves: list[Any]) -> tuple[list[Any], Where]:
    """The distinct trainable arrays of ``leaves`` by identity, in order of first position, and
    where each one sits (a view traced by ``optstate.jit`` counts as its array, permuted)."""
    objects: list[Any] = []
    index: dict[int, int] = {}  # id(array) -> its index in ``objects``
    where: Where = []
    views = _traced_views(leaves)
    for pos, leaf in enumerate(leaves):
        x, depth = unwrap(leaf)
        if not _arrays.is_trainable(x):
            continue
        view = views.get(id(x)) if views else None
        traced_perm = None
        if view is not None and view[0] is x:
            x, traced_perm = view[1], view[2]
        k = index.get(id(x))
        if k is None:
            k = index[id(x)] = len(objects)
            objects.append(x)
            where.append([])
        where[k].append((pos, depth, traced_perm))
    return objects, where


def _view_groups(
    objects: list[Any], where: Where, paths: Callable[[], list[str]]
) -> list[list[int]]:
    """The arrays grouped by the memory they view (one group per parameter), in order of first
    position; a partial overlap that is not a permutation is refused."""
    groups = Groups(len(objects))
    joined = False
    for i, j in overlapping_pairs(objects):
        a, b = objects[i], objects[j]
        if not _arrays.shares_memory(a, b):
            continue  # interleaved but disjoint, e.g. two columns of one matrix
        if _arrays.view_permutation(a, b) is False:
            names = paths()
            raise TieError(
                f"{names[where[i][0][0]]} and {names[where[j][0][0]]} share memory, but neither is "
                "the other or its transpose (a slice, a reshape or a partial overlap cannot be "
                "trained as one parameter). Got shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}, byte strides {_arrays.strides(a)} and "
                f"{_arrays.strides(b)}, byte offsets {_arrays.byte_bounds(a)[0]} and "
                f"{_arrays.byte_bounds(b)[0]}. Pass a copy (`x.copy()`, `x.clone()`) for an "
                "independent parameter, or the same array (or "
                "`optstate.Transpose(x)`) for a tie."
            )
        groups.union(i, j)
        joined = True
    if not joined:  # no views: every array is a parameter, already in order of first positions
        return [[k] for k in range(len(objects))]
    members: dict[int, list[int]] = {}
    for k in range(len(objects)):
        members.setdefault(groups.find(k), []).append(k)
    return sorted(members.values(), key=lambda ks: where[ks[0]][0][0])


def _traced_views(leaves: list[Any]) -> dict[int, tuple[Any, Any, Perm]] | None:
    """``TRACED_VIEWS`` of the views whose base is also a leaf of ``leaves`` (a view whose base
    is elsewhere is an array of its own, as eagerly)."""
    views = TRACED_VIEWS.get()
    if not views:
        return None
    present = {id(unwrap(leaf)[0]) for leaf in leaves}
    return {i: v for i, v in views.items() if i in present and id(v[1]) in present}


def root_rank(x: Any) -> int:
    if not _arrays.has_layout(x):
        return 0
    return 0 if not _arrays.is_view(x) else 1 if _arrays.is_contiguous(x) else 2


def overlapping_pairs(objects: list[Any]) -> list[tuple[int, int]]:
    """Pairs of NumPy arrays or torch tensors whose byte ranges intersect in one address space,
    by a sweep over sorted start bytes."""
    spans = sorted(
        (_arrays.memory_space(x), *_arrays.byte_bounds(x), k)
        for k, x in enumerate(objects)
        if _arrays.has_memory(x)
    )
    pairs: list[tuple[int, int]] = []
    open_spans: list[tuple[str, int, int]] = []  # (space, end, k) of spans that may still overlap
    for space, lo, hi, k in spans:
        open_spans = [(s, end, j) for s, end, j in open_spans if s == space and end > lo]
        pairs.extend((j, k) if j < k else (k, j) for _, _, j in open_spans)
        open_spans.append((space, hi, k))
    return pairs
