"""Positions of a model: flattening, paths for messages, and pairing a gradient tree with a model.

A *position* is a leaf of the model's pytree, with ``Transpose`` nodes kept whole: the walk sees
``Transpose(W)`` as one position whose array is ``W``. Everything here is about structure; which
positions hold the same parameter is decided in ``_ties``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from ._arrays import is_torch
from ._errors import StructureError
from ._transpose import Transpose, is_transpose

PyTreeDef = Any


def flatten(tree: Any) -> tuple[list[Any], PyTreeDef]:
    return _flatten_safely(jax.tree_util.tree_flatten, tree)  # type: ignore[no-any-return]


# -- deep trees --------------------------------------------------------------------------------
# jax's tree functions recurse once per level of nesting, up to the interpreter's recursion limit.
# When they give up with a RecursionError while a Python callback takes part (``is_leaf``, or a
# node registered from Python such as ``Transpose``), jaxlib 0.10 leaves the thread's recursion
# depth counted as used, and every later call in that thread fails. So the nesting is measured
# first, without recursion, and a tree too deep for the caller's stack is flattened in a helper
# thread whose stack and recursion limit are sized for it.
MAX_DEPTH = 100_000
_STACK_PER_LEVEL = 2048  # bytes; jaxlib 0.10 uses 200 to 400 per level on x86-64 (measured)
_MARGIN = 50  # recursion levels kept free for jax's callbacks and the caller's own frames
_NO_CHILDREN = (np.ndarray, jax.Array, float, int, complex, str, bytes, np.generic)
_deep_lock = threading.Lock()


def nesting(tree: Any, stop_above: int | None = None) -> int:
    """How many levels of pytree nodes ``tree`` has (0 for a leaf), counted without recursion.
    Counting stops as soon as the depth exceeds ``stop_above``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        kind = type(node)
        children: Any
        if kind is dict:
            children = node.values()
        elif kind is list or kind is tuple:
            children = node
        elif kind is Transpose:
            children = [node.parent]
        elif node is None or _childless(node):
            continue
        else:  # any other registered node, ``Transpose`` included: one level of its children
            children = _one_level(node)
            if len(children) == 1 and children[0] is node:
                continue  # not a node: a leaf
        depth += 1
        if depth > deepest:
            deepest = depth
            if stop_above is not None and depth > stop_above:
                return depth
        stack.extend((c, depth) for c in children if not _childless(c))
    return deepest


def _childless(x: Any) -> bool:
    """``x`` is an array or a number: no pytree node. Decided once per type (a model's leaves
    are of a few types, and this runs for every leaf of every flattening)."""
    kind = type(x)
    known = _CHILDLESS.get(kind)
    if known is None:
        known = isinstance(x, _NO_CHILDREN) or is_torch(x)
        if known or sys.modules.get("torch") is not None:  # (torch.Tensor known from then on)
            _CHILDLESS[kind] = known
    return known


_CHILDLESS: dict[type, bool] = {}


def _one_level(node: Any) -> list[Any]:
    """A node's children (the node itself if it is a leaf)."""
    children: list[Any] = jax.tree_util.tree_flatten(node, is_leaf=lambda c: c is not node)[0]
    return children


def _frames_exceed(n: int) -> bool:
    """The calling thread's stack holds more than ``n`` frames."""
    try:
        sys._getframe(n)
    except ValueError:
        return False
    return True


def _flatten_safely(fn: Callable[..., Any], tree: Any) -> Any:
    """``fn(tree, is_leaf=is_transpose)`` for a jax flattening function ``fn``, at any depth."""
    limit = sys.getrecursionlimit()
    depth = nesting(tree, stop_above=limit)
    if depth <= 1 and not isinstance(tree, Transpose):
        # A leaf, or one node of arrays and numbers (a model's flat dict of tensors): no
        # ``Transpose`` inside, so jax's flattening needs no ``is_leaf`` call per leaf.
        return fn(tree)
    room = limit - depth - _MARGIN  # the caller's frames must leave this many levels free
    if room > 0 and not _frames_exceed(room):
        return fn(tree, is_leaf=is_transpose)
    if depth > limit:
        depth = nesting(tree)
    if depth > MAX_DEPTH:
        raise StructureError(
            f"the tree is nested {depth} levels deep; optstate handles up to {MAX_DEPTH} levels"
        )
    result: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            result.append((True, fn(tree, is_leaf=is_transpose)))
        except BaseException as err:  # handed to the calling thread
            result.append((False, err))

    with _deep_lock:  # the recursion limit and the new threads' stack size are process-wide
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, depth + 10 * _MARGIN))
        try:
            size = threading.stack_size(depth * _STACK_PER_LEVEL + (8 << 20))
            try:
                worker = threading.Thread(target=run, name="optstate-deep-tree")
                worker.start()
            finally:
                threading.stack_size(size)
            worker.join()
        finally:
            sys.setrecursionlimit(limit)
    ok, value = result[0]
    if ok:
        return value
    if isinstance(value, RecursionError):  # an interpreter whose C recursion limit is fixed
        raise StructureError(
            f"the tree is nested {depth} levels deep, deeper than jax's tree functions reach on "
            f"Python {sys.version_info.major}.{sys.version_info.minor}"
        ) from value
    raise value


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
    flat, _ = _flatten_safely(jax.tree_util.tree_flatten_with_path, tree)
    return [root + jax.tree_util.keystr(path) for path, _ in flat]


def path_string(tree: Any, pos: int, root: str = "model") -> str:
    """The name of position ``pos`` alone, as in ``path_strings``. On a deep tree this costs one
    walk rather than every position's path (positions times depth)."""
    if nesting(tree, stop_above=64) <= 64:
        return path_strings(tree, root)[pos]
    count = 0
    stack: list[tuple[Any, Any]] = [(tree, None)]  # (node, link), link = (key, parent's link)
    while stack:
        node, link = stack.pop()
        children, treedef = _children(node)
        if treedef is None:
            if count == pos:
                keys = []
                while link is not None:
                    key, link = link
                    keys.append(key)
                return root + jax.tree_util.keystr(tuple(reversed(keys)))
            count += 1
            continue
        stack.extend((child, (key[0], link)) for key, child in reversed(children))
    raise IndexError(f"the tree has {count} positions, not {pos + 1}")


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
    flat, _ = _flatten_safely(jax.tree_util.tree_flatten_with_path, tree)
    return [tuple(_plain(k) for k in path) for path, _ in flat]


def skeleton(treedef: PyTreeDef) -> Any:
    """A tree of ``treedef``'s structure with placeholder positions, for paths and selections."""
    return treedef.unflatten([0] * treedef.num_leaves)
