"""``params``: a model's unique trainable arrays, and where each one lives.

A parameter is one array, whatever aliases the model holds of it (``Transpose(W)``, a NumPy
view such as ``W.T``): ties are found as ``setup`` finds them. ``Params`` remembers every
position of every parameter, so that ``gradient`` can check the model still holds them and
``Grads.to_tree`` can put a total at one of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from .. import _arrays
from .._arrays import Perm
from .._errors import StaleParamsError
from .._ties import find_ties
from .._transpose import is_transpose
from .._walk import unwrap
from ._objects import is_array, leaves


class Hit(NamedTuple):
    """How an object sits on a parameter: it is ``wrap(permute(base, perm), depth)``."""

    param: int
    perm: Perm
    depth: int


class Position(NamedTuple):
    """One place of a parameter in the model given to ``params``."""

    path: str  # model['enc']['w'], model.layer.w
    in_pytree: bool  # reached through pytree nodes only, so ``update`` sees it
    hit: Hit


def describe(x: Any) -> str:
    if is_transpose(x):
        return f"Transpose({describe(x.parent)})"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        kind = "NumPy" if _arrays.is_numpy(x) else "JAX" if _arrays.is_jax(x) else type(x).__name__
        return f"{kind} {x.dtype}{list(x.shape)}"
    return f"{type(x).__name__} {x!r}"


# -- Params ------------------------------------------------------------------------------------


class Params:
    """The unique trainable arrays of a model, in order, with the positions where each one lives.

    Made by ``params(model)``. Iterating gives each parameter's array once, in the order of its
    first position (for a parameter seen both as ``W`` and as a view, the array owning the
    memory). ``x in ps`` is by identity and follows aliases: ``W``, ``Transpose(W)`` and a NumPy
    view of ``W`` (``W.T``) are all in ``ps`` when ``W`` is; an equal copy is not, and neither is
    JAX's ``W.T``, which is a new array.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> from optstate import implicit
        >>> W = np.ones((2, 3))
        >>> ps = implicit.params({"w": W, "t": W.T, "w2": W, "copy": W.copy()})
        >>> len(ps), W.T in ps, ost.Transpose(W) in ps, W.copy() in ps
        (2, True, True, False)
        >>> ps
        Params(float64[2, 3] at model['copy']; float64[2, 3] at model['t'], model['w'], model['w2'])
    """

    __slots__ = ("_bases", "_index", "_keep", "_numpy", "_positions", "_root")

    def __init__(
        self,
        root: Any,
        bases: Sequence[Any],
        positions: Sequence[Sequence[Position]],
        index: dict[int, Hit],
        keep: Sequence[Any],
    ) -> None:
        self._root = root
        self._bases = tuple(bases)
        self._positions = tuple(tuple(p) for p in positions)
        self._index = index  # id(array at a position) -> how it sits on its parameter
        self._keep = tuple(keep)  # those arrays, kept alive so that their ids stay theirs
        self._numpy = [  # NumPy parameters' byte ranges, to recognise new views of them
            (*_arrays.byte_bounds(b), k)
            for k, b in enumerate(self._bases)
            if _arrays.is_numpy(b) and b.size > 0
        ]

    def __len__(self) -> int:
        return len(self._bases)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._bases)

    def __contains__(self, x: object) -> bool:
        return self._resolve(x) is not None

    def where(self, x: Any) -> tuple[str, ...]:
        """The positions where the parameter ``x`` lives, found through any alias of it.

        Args:
            x: a parameter, or an alias of one (``Transpose(W)``, a NumPy view ``W.T``).

        Returns:
            The paths of all the parameter's positions, as ``model['dec']['w']`` or
            ``model.enc<closure w>`` (a closure's variable), in walk order.

        Raises:
            KeyError: ``x`` is neither a parameter nor an alias of one.

        Examples:
            >>> import numpy as np, optstate as ost
            >>> from optstate import implicit
            >>> W = np.ones((2, 3))
            >>> implicit.params({"enc": W, "dec": ost.Transpose(W)}).where(W.T)
            ("model['dec']", "model['enc']")
        """
        return tuple(p.path for p in self._positions[self._lookup(x).param])

    def __repr__(self) -> str:
        parts = [
            f"{b.dtype}{list(b.shape)} at {', '.join(p.path for p in ps)}"
            for b, ps in zip(self._bases[:8], self._positions, strict=False)
        ]
        more = f"; ... ({len(self) - 8} more)" if len(self) > 8 else ""
        return f"Params({'; '.join(parts)}{more})"

    # -- identity -----------------------------------------------------------------------------

    def _resolve(self, x: Any) -> Hit | None:
        """How ``x`` sits on a parameter (itself, a ``Transpose`` of it, a NumPy view), or None."""
        obj, depth = unwrap(x)
        hit = self._index.get(id(obj))
        if hit is not None:
            return hit._replace(depth=depth)
        k = self._overlapped(obj)
        if k is None:
            return None
        perm = _arrays.view_permutation(self._bases[k], obj)
        return None if perm is False else Hit(k, perm, depth)

    def _overlapped(self, obj: Any) -> int | None:
        """The NumPy parameter whose memory ``obj`` overlaps, if any."""
        if not (_arrays.is_numpy(obj) and obj.size > 0 and self._numpy):
            return None
        lo, hi = _arrays.byte_bounds(obj)
        for start, end, k in self._numpy:
            if start < hi and lo < end and _arrays.shares_memory(self._bases[k], obj):
                return k
        return None

    def _overlap(self, obj: Any) -> str | None:
        """The first position of the NumPy parameter whose memory ``obj`` overlaps, if any."""
        k = self._overlapped(obj)
        return None if k is None else self._positions[k][0].path

    def _lookup(self, x: Any) -> Hit:
        hit = self._resolve(x)
        if hit is not None:
            return hit
        obj = unwrap(x)[0]
        k = self._overlapped(obj)
        if k is not None:
            why = (
                f"it shares memory with the parameter at {self._positions[k][0].path} but is a "
                "slice or reshape of it, not the array or a transpose view"
            )
        elif not is_array(obj):
            why = "parameters are arrays, looked up by identity"
        else:
            why = (
                "it is neither a parameter nor an alias of one (Transpose(p), a NumPy view of p). "
                "Lookups go by identity: an equal copy is not the parameter, and in JAX p.T is a "
                "new array (look up p or Transpose(p))"
            )
        raise KeyError(f"{describe(x)} is not one of the {len(self)} parameters: {why}")

    def _check(self, model: Any, doing: str) -> dict[str, tuple[Any, bool]]:
        """Every recorded position of ``model`` still holds its parameter. Returns the walk."""
        now = {path: (leaf, in_pytree) for path, leaf, in_pytree in leaves(model)}
        for k, positions in enumerate(self._positions):
            for p in positions:
                found = now.get(p.path)
                if found is not None and self._resolve(found[0]) == p.hit:
                    continue
                held = (
                    "nothing (the position is gone)"
                    if found is None
                    else f"another array, {describe(found[0])}"
                )
                raise StaleParamsError(
                    f"{doing}: {p.path} held the parameter {describe(self._bases[k])} when "
                    f"params(model) was taken, but now holds {held}. An array replaced after "
                    "params is not followed (that would train the old array); take "
                    "implicit.params(model) again after changing the model, e.g. after every "
                    "update"
                )
        return now


def params(model: Any) -> Params:
    """The unique trainable arrays of ``model``: an ordered identity set that knows their positions.

    ``model`` is any mix of dicts, lists, tuples (and their subclasses), pytrees (registered
    classes, dataclasses), objects, whose attributes are walked (in ``__dict__`` and in
    ``__slots__``), and functions, whose closure variables and default arguments are walked (a
    layer written as a closure, ``net.enc = dense(W, b)``). Trainable arrays are floating and
    complex NumPy and JAX arrays. Ties are found as ``setup`` finds them: the same object at
    several positions, ``Transpose(W)``, and NumPy views (``W.T``) are one parameter, so
    ``params([x, Transpose(x)])`` holds one array. Several separate things go in one list:
    ``params([W, b])``.

    Args:
        model: the model, or a list of the things holding its parameters.

    Returns:
        The ``Params``: the parameters in the order of their first positions.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> from optstate import implicit
        >>> x = np.array([[1.0], [2.0]])
        >>> ps = implicit.params([x, ost.Transpose(x), x.T])
        >>> len(ps), next(iter(ps)) is x
        (1, True)

    Raises:
        TieError: two arrays overlap in memory in a way that is not a tie (a slice, a reshape).
    """
    found_leaves = leaves(model)
    slots, found = find_ties(
        [leaf for _, leaf, _ in found_leaves], lambda: [p for p, _, _ in found_leaves]
    )
    bases = [unwrap(found_leaves[p.primary][1])[0] for p in found]
    positions: list[list[Position]] = [[] for _ in found]
    index: dict[int, Hit] = {}
    keep = []
    for (path, leaf, in_pytree), slot in zip(found_leaves, slots, strict=True):
        if slot is None:
            continue
        obj = unwrap(leaf)[0]
        index[id(obj)] = Hit(slot.param, slot.perm, 0)
        keep.append(obj)
        positions[slot.param].append(
            Position(path, in_pytree, Hit(slot.param, slot.perm, slot.depth))
        )
    return Params(model, bases, positions, index, keep)
