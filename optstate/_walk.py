"""Positions of a model: flattening, paths for messages, and pairing a gradient tree with a model.

A *position* is a leaf of the model's pytree, with ``Transpose`` nodes kept whole: the walk sees
``Transpose(W)`` as one position whose array is ``W``. Everything here is about structure; which
positions hold the same parameter is decided in ``_ties``.
"""

from __future__ import annotations

from typing import Any

import jax

from .transpose import Transpose, is_transpose

PyTreeDef = Any


def flatten(tree: Any) -> tuple[list[Any], PyTreeDef]:
    return jax.tree_util.tree_flatten(tree, is_leaf=is_transpose)


def unwrap(leaf: Any) -> tuple[Any, int]:
    """The array inside any number of ``Transpose`` layers, and the number of layers."""
    depth = 0
    while isinstance(leaf, Transpose):
        leaf, depth = leaf.parent, depth + 1
    return leaf, depth


def wrap(x: Any, depth: int) -> Any:
    for _ in range(depth):
        x = Transpose(x)
    return x


def path_strings(tree: Any, root: str = "model") -> list[str]:
    """``model['dec']['w']``-style names of every position, in flattening order. Only computed
    when a message needs them: they cost a walk over the whole tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_transpose)
    return [root + jax.tree_util.keystr(path) for path, _ in flat]


class StructureError(ValueError):
    """A tree does not have the structure it was expected to have."""


def _children(node: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """A node's ``(key, child)`` pairs and its one-level structure; no structure for a position."""
    if is_transpose(node):
        return [], None
    keyed, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda c: c is not node)
    if len(keyed) == 1 and keyed[0][1] is node:  # a leaf flattens to itself
        return [], None
    return keyed, treedef


def _describe(treedef: PyTreeDef) -> str:
    return str(treedef).removeprefix("PyTreeDef(").removesuffix(")")


def gather(treedef: PyTreeDef, model: Any, grads: Any) -> list[Any]:
    """One gradient entry per model position (``None`` where there is none).

    ``grads`` has the model's structure, except that ``None`` may stand for a whole branch. A
    position's entry is whatever ``grads`` holds there: an array, a ``Transpose``, or ``None``.
    """
    try:
        return list(treedef.flatten_up_to(grads))
    except (ValueError, TypeError):
        pass  # a ``None`` branch, or a real mismatch: the slow walk tells them apart
    out: list[Any] = []
    stack: list[tuple[Any, Any, str]] = [(model, grads, "")]
    while stack:
        m, g, path = stack.pop()
        if g is None:
            out.extend([None] * len(flatten(m)[0]))
            continue
        m_children, m_def = _children(m)
        if m_def is None:
            out.append(g)  # a position: the model holds a leaf (or a Transpose) here
            continue
        g_children, g_def = _children(g)
        if g_def != m_def:
            got = type(g).__name__ if g_def is None else _describe(g_def)
            raise StructureError(
                f"the gradient does not have the model's structure at grads{path}: "
                f"expected {_describe(m_def)}, got {got}"
            )
        pairs = zip(m_children, g_children, strict=True)
        stack.extend(
            (mc, gc, path + jax.tree_util.keystr(key))
            for (key, mc), (_, gc) in reversed(list(pairs))
        )
    return out


Key = str | int


def _plain(key: Any) -> Key:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(key, attr):
            value = getattr(key, attr)
            return value if isinstance(value, int | str) else str(value)
    return str(key)


def position_keys(tree: Any) -> list[tuple[Key, ...]]:
    """Every position's path as plain keys, ``('dec', 'w')`` or ``('layers', 0, 'kernel')``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_transpose)
    return [tuple(_plain(k) for k in path) for path, _ in flat]


def skeleton(treedef: PyTreeDef) -> Any:
    """A tree of ``treedef``'s structure with placeholder positions, for paths and selections."""
    return treedef.unflatten([0] * treedef.num_leaves)
