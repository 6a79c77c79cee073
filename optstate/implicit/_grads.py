"""``Grads``: gradients keyed by parameter identity, and the way to and from the structural
gradient that ``optstate.update`` takes (one gradient per position)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from .. import _arrays
from .._models import GradientForm, register
from .._positions import oriented
from .._ties import Slot, orientation
from .._walk import flatten, gather, path_strings, wrap
from ._params import Params, params


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

    ``Grads(params, values)`` makes one from totals computed elsewhere (PyTorch's ``.grad``):
    ``values`` holds one total per parameter, in the order and orientation of ``params``, each
    cast to its parameter's kind and dtype; a wrong count or shape is a ``ValueError``.

    Args:
        params: the ``Params`` the totals belong to.
        values: one total gradient per parameter, in the order and orientation of ``params``.

    Raises:
        ValueError: not one value per parameter, or a value of another shape than its parameter.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> from optstate import implicit
        >>> W = np.zeros((1, 2))
        >>> grads = implicit.Grads(implicit.params([W]), [np.array([[3.0, 4.0]])])
        >>> grads[W], grads[ost.Transpose(W)].shape, grads.get(W.copy()) is None
        (array([[3., 4.]]), (2, 1), True)
        >>> [g.shape for g in grads.values()], len(grads), W in grads
        ([(1, 2)], 1, True)
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
        """``grads[key]``, or ``default`` when ``key`` is neither a parameter nor an alias."""
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
        """The parameters, once each, in the order of ``params``."""
        return iter(self.params)

    def values(self) -> Iterator[Any]:
        """The totals, in the order of ``params``, each in its parameter's orientation."""
        return iter(self._values)

    def items(self) -> Iterator[tuple[Any, Any]]:
        """``(parameter, total)`` pairs, in the order of ``params``."""
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

        Args:
            model: the model ``params`` was taken of, its parameters still in place.

        Returns:
            A tree of the model's structure: a total at one position of each parameter,
            ``None`` elsewhere.

        Examples:
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

        Args:
            model: the model the gradient is of.
            grad_tree: its structural gradient, one partial gradient (or ``None``) per position.

        Returns:
            The ``Grads`` of ``params(model)``.

        Examples:
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
                read = oriented(Slot(*p.hit), base, per_position[i], i, model)
                if read is None:
                    continue
                axes, g = read
                g = _arrays.coerce(_arrays.permute(g, _arrays.inverse(axes)), base)
                total = g if total is None else total + g
            totals.append(_zeros_like(base) if total is None else total)
        return cls(ps, totals)


def _zeros_like(x: Any) -> Any:
    return np.zeros_like(x) if _arrays.is_numpy(x) else jax.numpy.zeros_like(x)


register(GradientForm("optstate.implicit.Grads", lambda g: isinstance(g, Grads), Grads.to_tree))
