"""The lazy transpose: a pytree node that stands for ``parent.T`` without copying it.

A model that reuses a weight transposed (an autoencoder's decoder, tied output embeddings) holds
``Transpose(W)`` at the second position. The node's single child is ``W`` itself, so ``setup`` sees
the tie, ``jax.grad`` returns a ``Transpose`` holding the gradient in ``W``'s orientation, and
``update`` re-wraps the one new array.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

__all__ = ["Transpose"]


@jax.tree_util.register_pytree_with_keys_class
class Transpose:
    """``Transpose(p)`` behaves as ``p.T`` and keeps ``p`` itself as its only child.

    It supports what a layer does with a weight: ``x @ t``, ``t @ x``, ``t.T`` (which is ``p``),
    ``t.shape``, ``t.dtype``, ``t.ndim``, ``t.size``, ``np.asarray(t)`` and ``jnp.asarray(t)``.
    For an array of more than two axes, as for ``p.T``, the axes are reversed.

    Args:
        parent: the array (NumPy, JAX or torch) whose transpose this position holds.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.arange(6.0).reshape(2, 3)
        >>> t = ost.Transpose(w)
        >>> t.shape, t.T is w
        ((3, 2), True)
        >>> bool((np.ones((4, 3)) @ t == np.ones((4, 3)) @ w.T).all())
        True
    """

    __slots__ = ("parent",)
    # NumPy must not turn the node into an array before Python tries ``Transpose.__rmatmul__``:
    # under ``jax.grad`` the parent is a tracer that cannot become a NumPy array.
    __array_ufunc__ = None

    def __init__(self, parent: Any) -> None:
        # No checks: JAX rebuilds nodes with placeholder children while it transforms functions.
        self.parent = parent

    # -- pytree protocol -------------------------------------------------------------------
    def tree_flatten_with_keys(self) -> tuple[tuple[tuple[Any, Any]], None]:
        return ((jax.tree_util.GetAttrKey("parent"), self.parent),), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: Any) -> Transpose:
        del aux
        return cls(*children)

    # -- what ``p.T`` offers -----------------------------------------------------------------
    @property
    def T(self) -> Any:  # noqa: N802  (the array attribute's name)
        return self.parent

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.parent.shape))

    @property
    def dtype(self) -> Any:
        return self.parent.dtype

    @property
    def ndim(self) -> int:
        return int(self.parent.ndim)

    @property
    def size(self) -> int:
        return int(self.parent.size)

    def __len__(self) -> int:
        return self.shape[0]

    def __matmul__(self, other: Any) -> Any:
        return self.parent.T @ other

    def __rmatmul__(self, other: Any) -> Any:
        return other @ self.parent.T

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out: np.ndarray = np.asarray(self.parent, dtype=dtype).T
        return out.copy() if copy else out

    def __jax_array__(self) -> jax.Array:
        return jax.numpy.asarray(self.parent).T

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.parent.shape)) if hasattr(self.parent, "shape") else "?"
        return f"Transpose({type(self.parent).__name__}[{shape}])"


def is_transpose(x: Any) -> bool:
    """True for a ``Transpose`` node: the walk treats it as one position."""
    return isinstance(x, Transpose)
