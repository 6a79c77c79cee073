"""The implicit-parameters bridge: ``params``, ``gradient`` and ``Grads``, for training code written
in the implicit style, and the way from there to optstate's explicit structural gradients.

Implicit-style code has a zero-argument loss closure over a model, a collection of the model's
parameter arrays, and gradients keyed by the arrays themselves (Flux's ``params(m)`` and
``gradient(() -> loss(m(x), y), ps)``; PyTorch's ``parameters()`` and ``.grad``)::

    ps = implicit.params(model)                       # the unique arrays, aliases resolved
    grads = implicit.gradient(lambda: loss(model, x), ps)
    grads[W]                                          # W's total gradient over all its uses
    state, model = ost.update(state, model, grads.to_tree(model))   # counted once per parameter

The conventions, and why:

* **One parameter per array.** ``W``, ``Transpose(W)`` and a NumPy view such as ``W.T`` are one
  parameter, found as ``setup`` finds ties. ``params([W, Transpose(W)])`` has one element, and
  ``Transpose(W) in ps`` is true.
* **Totals.** Every place the loss can reach ``W`` gets one traced value during ``gradient`` (in
  the place's orientation), so JAX adds up all uses: ``grads[W]`` is the total gradient.
  Looking it up through an alias gives the same total in the alias's orientation
  (``grads[Transpose(W)]`` is ``grads[W].T``).
* **Untouched parameters get zeros**, as ``jax.grad`` gives them, so that the bridge and the
  explicit ``jax.grad`` path feed ``update`` the same numbers. A loss that reaches *no* parameter
  is an error: it is a closure that does not see the model it trains.
* **Arrays are followed by identity, at the positions recorded by ``params``.** An array replaced
  afterwards (``model["w"] = new``) is an error naming the position, never a silent miss: take
  ``params(model)`` again after changing the model (after every pure ``update``).

Where ``gradient`` substitutes traced values: at every position of the model given to ``params``
and, because implicit code closes over variables, in the variables the loss function reaches: its
closure cells and the globals its code names (following the functions of the same module that it
calls), walked through dicts, lists, tuples, pytrees and the attributes of plain objects. Mutable
containers are changed in place and immutable ones rebuilt; everything is restored when the loss
returns or raises (meanwhile those variables hold traced values: do not read them from another
thread). A parameter the loss reads some other way (through a function of another module
holding its own reference) is not seen.

Example:
    >>> import jax.numpy as jnp, optstate as ost
    >>> from optstate import implicit
    >>> w = jnp.array([[1.0, 2.0]])
    >>> model = {"enc": w, "dec": ost.Transpose(w)}
    >>> ps = implicit.params(model)
    >>> len(ps), ps.where(w)
    (1, ("model['dec']", "model['enc']"))
    >>> grads = implicit.gradient(lambda: jnp.sum(model["enc"] @ model["dec"]), ps)
    >>> grads[w]                     # d/dw sum(w @ w.T) = 2w: both uses
    Array([[2., 4.]], dtype=float32)
    >>> grads[model["dec"]]          # the same total, in the Transpose's orientation
    Array([[2.],
           [4.]], dtype=float32)
    >>> tree = grads.to_tree(model)  # the total at one position, None at the others
    >>> tree["dec"] is None
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from . import _arrays
from ._substitute import Hit, Swapper, is_array, leaves, reach
from ._ties import Slot, find_ties, orientation
from ._update import _oriented
from ._walk import flatten, gather, path_strings, unwrap, wrap
from .transpose import is_transpose

__all__ = ["Grads", "Params", "StaleParamsError", "gradient", "params", "value_and_gradient"]


class StaleParamsError(ValueError):
    """A parameter recorded by ``params`` is no longer at one of its positions in the model."""


class _Position(NamedTuple):
    path: str  # model['enc']['w'], model.layer.w
    in_pytree: bool  # reached through pytree nodes only, so ``update`` sees it
    hit: Hit


def _describe(x: Any) -> str:
    if is_transpose(x):
        return f"Transpose({_describe(x.parent)})"
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

    Example:
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
        positions: Sequence[Sequence[_Position]],
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
        """The positions (``model['dec']['w']``) where the parameter ``x`` (or its alias) lives."""
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
        raise KeyError(f"{_describe(x)} is not one of the {len(self)} parameters: {why}")

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
                    else f"another array, {_describe(found[0])}"
                )
                raise StaleParamsError(
                    f"{doing}: {p.path} held the parameter {_describe(self._bases[k])} when "
                    f"params(model) was taken, but now holds {held}. An array replaced after "
                    "params is not followed (that would train the old array); take "
                    "implicit.params(model) again after changing the model, e.g. after every "
                    "update"
                )
        return now


def params(model: Any) -> Params:
    """The unique trainable arrays of ``model``: an ordered identity set that knows their positions.

    ``model`` is any mix of dicts, lists, tuples, pytrees (registered classes, dataclasses) and
    plain objects, whose attributes are walked. Trainable arrays are floating and complex NumPy
    and JAX arrays. Ties are found as ``setup`` finds them: the same object at several positions,
    ``Transpose(W)``, and NumPy views (``W.T``) are one parameter, so ``params([x, Transpose(x)])``
    holds one array. Several separate things go in one list: ``params([W, b])``.

    Example:
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
    positions: list[list[_Position]] = [[] for _ in found]
    index: dict[int, Hit] = {}
    keep = []
    for (path, leaf, in_pytree), slot in zip(found_leaves, slots, strict=True):
        if slot is None:
            continue
        obj = unwrap(leaf)[0]
        index[id(obj)] = Hit(slot.param, slot.perm, 0)
        keep.append(obj)
        positions[slot.param].append(
            _Position(path, in_pytree, Hit(slot.param, slot.perm, slot.depth))
        )
    return Params(model, bases, positions, index, keep)


# -- Grads -------------------------------------------------------------------------------------


class Grads:
    """Gradients keyed by parameter identity: ``grads[W]`` is ``W``'s total over all its uses.

    Made by ``gradient`` (or ``Grads.from_tree``). Each value has its parameter's kind and dtype
    (a NumPy array for a NumPy parameter, so ``W -= lr * grads[W]`` works in place). Looking up
    an alias, ``Transpose(W)`` or a NumPy view ``W.T``, gives the same total in the alias's
    orientation. Iteration, ``keys()``, ``values()`` and ``items()`` go over the ``Params``, once
    per parameter. A parameter the loss did not use has zeros. A key that is not a parameter nor
    an alias of one raises ``KeyError``.

    ``to_tree(model)`` turns the totals into the structural gradient that ``optstate.update``
    takes, with each total at **one** position, so that it is counted once.
    """

    __slots__ = ("_values", "params")

    def __init__(self, params: Params, values: Sequence[Any]) -> None:
        """``values``: one total gradient per parameter, in the order and orientation of
        ``params``; each is cast to its parameter's kind and dtype."""
        if len(values) != len(params):
            raise ValueError(f"{len(params)} parameters but {len(values)} gradients")
        for g, base, positions in zip(values, params._bases, params._positions, strict=True):
            if tuple(np.shape(g)) != tuple(base.shape):
                raise ValueError(
                    f"the gradient for the parameter at {positions[0].path} has shape "
                    f"{tuple(np.shape(g))}, expected {tuple(base.shape)} (values go in the order "
                    "of params, each in its parameter's orientation)"
                )
        self.params = params
        self._values = tuple(
            _arrays.coerce(g, b) for g, b in zip(values, params._bases, strict=True)
        )

    def __getitem__(self, key: Any) -> Any:
        hit = self.params._lookup(key)
        g = self._values[hit.param]
        return _arrays.permute(g, orientation(Slot(*hit), g.ndim))

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        return key in self.params

    def __iter__(self) -> Iterator[Any]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def keys(self) -> Iterator[Any]:
        return iter(self.params)

    def values(self) -> Iterator[Any]:
        return iter(self._values)

    def items(self) -> Iterator[tuple[Any, Any]]:
        return zip(self.params, self._values, strict=True)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{g.dtype}{list(g.shape)}" for g in self._values[:8])
        more = ", ..." if len(self) > 8 else ""
        return f"Grads({shapes}{more})"

    def to_tree(self, model: Any) -> Any:
        """The structural gradient for ``update(state, model, tree)``: each parameter's total at
        one of its positions (the array itself where the model holds it, else the first), in that
        position's form (a ``Transpose`` node at a ``Transpose``, the view's orientation at a NumPy
        view), and ``None`` everywhere else. ``update`` adds up a parameter's positions, so a
        total given at every position would be counted once per position.

        Example:
            >>> import numpy as np, optstate as ost
            >>> from optstate import implicit
            >>> W = np.ones((2, 3))
            >>> model = {"dec": ost.Transpose(W), "enc": W}
            >>> grads = implicit.Grads(implicit.params(model), [np.full((2, 3), 5.0)])
            >>> tree = grads.to_tree(model)
            >>> tree["dec"] is None, tree["enc"][0]
            (True, array([5., 5., 5.]))
            >>> state, new = ost.update(ost.setup(ost.Descent(0.1), model), model, tree)
            >>> new["enc"][0]                      # 1 - 0.1 * 5: counted once
            array([0.5, 0.5, 0.5])

        Raises:
            StaleParamsError: a position recorded by ``params`` no longer holds its parameter.
            TypeError: a parameter lives inside a plain object, which ``update`` cannot reach.
        """
        self.params._check(model, "to_tree")
        hidden = [p for ps in self.params._positions for p in ps if not p.in_pytree]
        if hidden:
            raise TypeError(
                f"to_tree: the parameter at {hidden[0].path} lives inside an object that JAX "
                "does not flatten, so optstate.update can neither see nor update it. Register "
                "its class as a pytree (jax.tree_util.register_dataclass, "
                "register_pytree_node_class) or hold the arrays in dicts and lists"
            )
        leaves, treedef = flatten(model)
        at = {name: i for i, name in enumerate(path_strings(model))}
        tree: list[Any] = [None] * len(leaves)
        for g, positions in zip(self._values, self.params._positions, strict=True):
            pos = next((p for p in positions if p.hit[1:] == (None, 0)), positions[0])
            tree[at[pos.path]] = wrap(_arrays.permute(g, pos.hit.perm), pos.hit.depth)
        return treedef.unflatten(tree)

    @classmethod
    def from_tree(cls, model: Any, grad_tree: Any) -> Grads:
        """The per-parameter totals of a structural gradient (what ``jax.grad(loss)(model)``
        returns), for code that reads gradients by parameter.

        Each parameter's positions are brought to its orientation and summed, with the rules of
        ``update``: ``None`` for no gradient (a leaf or a branch), a ``Transpose`` or a dense
        transposed array at a ``Transpose`` position, the view's orientation at a NumPy view.
        A parameter without any gradient gets zeros.

        Example:
            >>> import numpy as np, optstate as ost
            >>> from optstate import implicit
            >>> W = np.zeros((1, 2))
            >>> model = {"enc": W, "dec": ost.Transpose(W)}
            >>> grads = implicit.Grads.from_tree(
            ...     model, {"enc": np.array([[1.0, 2.0]]), "dec": np.array([[10.0], [20.0]])}
            ... )
            >>> grads[W]
            array([[11., 22.]])

        Raises:
            StructureError: ``grad_tree`` does not have the model's structure.
            ValueError, TypeError: a gradient's shape or type does not fit its position.
        """
        ps = params(model)
        _, treedef = flatten(model)
        per_position = gather(treedef, model, grad_tree)
        at = {name: i for i, name in enumerate(path_strings(model))}
        totals: list[Any] = []
        for base, positions in zip(ps._bases, ps._positions, strict=True):
            total = None
            for p in positions:
                i = at.get(p.path) if p.in_pytree else None
                if i is None or per_position[i] is None:
                    continue
                oriented = _oriented(Slot(*p.hit), base, per_position[i], i, model)
                if oriented is None:
                    continue
                axes, g = oriented
                g = _arrays.coerce(_arrays.permute(g, _arrays.inverse(axes)), base)
                total = g if total is None else total + g
            totals.append(_zeros_like(base) if total is None else total)
        return cls(ps, totals)


def _zeros_like(x: Any) -> Any:
    return np.zeros_like(x) if _arrays.is_numpy(x) else jax.numpy.zeros_like(x)


# -- gradient ----------------------------------------------------------------------------------


def gradient(loss_fn: Callable[[], Any], ps: Params) -> Grads:
    """The gradient of the zero-argument ``loss_fn`` with respect to the parameters in ``ps``.

    For the call, every place where ``loss_fn`` can reach a parameter holds one traced JAX value
    (``Transpose(traced)`` at a ``Transpose``, the traced value transposed at a NumPy view): the
    positions recorded by ``params``, and the variables the loss closes over or names as globals.
    JAX then adds up every use, so ``grads[W]`` is ``W``'s total gradient. The originals are put
    back when the loss returns or raises. The loss must compute with ``jax.numpy`` (NumPy cannot
    take traced values) and return a real scalar. Call it outside ``jax.jit``.

    Example:
        >>> import jax.numpy as jnp, numpy as np
        >>> from optstate import implicit
        >>> W = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
        >>> layers = [{"w": W}, {"w": W.T}]           # W used twice: once as a NumPy view
        >>> x = np.ones((1, 2), np.float32)
        >>> ps = implicit.params(layers)
        >>> grads = implicit.gradient(lambda: jnp.sum(x @ layers[0]["w"] @ layers[1]["w"]), ps)
        >>> grads[W]            # d/dW |W.T 1|^2 = 2 (1)(W.T 1).T, as a NumPy array like W
        array([[ 8., 12.],
               [ 8., 12.]], dtype=float32)

    Raises:
        StaleParamsError: an array recorded by ``params`` was replaced in the model since.
        ValueError: the loss does not depend on any of the parameters.
        TypeError: the loss does not return a real scalar, or a parameter sits where it cannot
            be substituted (an attribute that cannot be set).
    """
    return value_and_gradient(loss_fn, ps)[1]


def value_and_gradient(loss_fn: Callable[[], Any], ps: Params) -> tuple[Any, Grads]:
    """``(loss_fn(), gradient(loss_fn, ps))`` from one evaluation of the loss.

    Example:
        >>> import jax.numpy as jnp
        >>> from optstate import implicit
        >>> model = {"w": jnp.array([3.0])}
        >>> value, grads = implicit.value_and_gradient(
        ...     lambda: jnp.sum(model["w"] ** 2), implicit.params(model)
        ... )
        >>> float(value), grads[model["w"]]
        (9.0, Array([6.], dtype=float32))
    """
    if not isinstance(ps, Params):
        raise TypeError(
            f"gradient(loss_fn, ps) takes the Params of implicit.params(model), got "
            f"{type(ps).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function of no arguments, got {type(loss_fn).__name__}")
    ps._check(ps._root, "gradient")
    bindings = reach(loss_fn)
    reached = [False]

    def traced(values: list[Any]) -> Any:
        swapper = Swapper(ps, values)
        try:
            swapper.swap(ps._root, "model")
            for binding in bindings:
                swapper.rebind(binding)
            out = loss_fn()
        finally:
            swapper.restore()
        _check_loss(out)
        reached[0] = isinstance(out, jax.core.Tracer)
        return out

    value, pullback = jax.vjp(traced, list(ps._bases))
    if not reached[0]:
        raise ValueError(
            f"the loss does not depend on any of the {len(ps)} parameters: it does not reach "
            "them through the model given to params, nor through variables bound to them. Was "
            "the model replaced after params was taken (take params of the model the loss "
            "uses), or does the loss read the arrays through another module's functions?"
        )
    (raw,) = pullback(jax.numpy.ones((), value.dtype))
    totals = [_arrays.coerce(g, b) for g, b in zip(raw, ps._bases, strict=True)]
    return value, Grads(ps, totals)


def _check_loss(out: Any) -> None:
    shape = getattr(out, "shape", None)
    if shape is None and isinstance(out, int | float):
        shape = ()
    dtype = getattr(out, "dtype", None)
    if shape != () or (
        dtype is not None and jax.numpy.issubdtype(dtype, jax.numpy.complexfloating)
    ):
        raise TypeError(
            f"loss_fn must return a real scalar (the loss), got {_describe(out)}; "
            "return auxiliary values through a variable the closure writes to"
        )
