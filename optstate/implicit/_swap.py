"""Where implicit-style code keeps its parameters, and putting traced values there for a while.

``implicit.gradient`` differentiates a zero-argument loss closure: it must put a traced value at
every place the loss can read a parameter (the model's containers, the closure's variables, the
globals its code names) and put the original arrays back afterwards, also when the loss raises.
This module walks those places and does the swapping; ``implicit`` decides what is a parameter.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

from . import _arrays
from ._arrays import Perm
from ._walk import unwrap
from .transpose import is_transpose


class Hit(NamedTuple):
    """How an object sits on a parameter: it is ``wrap(permute(base, perm), depth)``."""

    param: int
    perm: Perm
    depth: int


# -- walking a model: pytree nodes, and the attributes of plain objects ------------------------

_OPAQUE = (
    type,
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    types.MethodType,
    functools.partial,
)


def is_array(x: Any) -> bool:
    return _arrays.is_numpy(x) or _arrays.is_jax(x)


def pytree_children(node: Any) -> tuple[list[tuple[str, Any, Any]], Any] | None:
    """A pytree node's children as ``(key string, key, child)`` and its one-level structure;
    ``None`` for anything JAX treats as a leaf."""
    if is_transpose(node) or is_array(node):
        return None
    keyed, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda c: c is not node)
    if len(keyed) == 1 and keyed[0][1] is node:
        return None
    children = [(jax.tree_util.keystr(path), path[0], child) for path, child in keyed]
    return children, treedef


def plain_object(node: Any) -> bool:
    """An instance of a user class that JAX does not flatten: walked through its attributes."""
    return (
        hasattr(node, "__dict__")
        and not isinstance(node, _OPAQUE)
        and not is_array(node)
        and not isinstance(node, jax.core.Tracer)
    )


def leaves(root: Any) -> list[tuple[str, Any, bool]]:
    """Every array or ``Transpose`` in ``root`` as ``(path, leaf, in_pytree)``, in walk order."""
    out: list[tuple[str, Any, bool]] = []
    seen: set[int] = set()  # plain objects, walked once (they may refer back to their owner)

    def visit(node: Any, path: str, in_pytree: bool) -> None:
        kids = pytree_children(node)
        if kids is not None:
            for key, _, child in kids[0]:
                visit(child, path + key, in_pytree)
        elif is_transpose(node) or is_array(node):
            out.append((path, node, in_pytree))
        elif plain_object(node) and id(node) not in seen:
            seen.add(id(node))
            for name, child in list(vars(node).items()):
                visit(child, f"{path}.{name}", False)

    visit(root, "model", True)
    return out


# -- what a loss function reaches, and substituting traced values there -----------------------


class Binding(NamedTuple):
    name: str
    value: Any
    set: Callable[[Any], None]


def code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return names


def reach(loss_fn: Callable[[], Any]) -> list[Binding]:
    """The variables ``loss_fn`` can read: its closure cells and the globals its code names,
    following the functions it reaches that live in the same module (its helpers)."""
    bindings: dict[tuple[int, str], Binding] = {}
    home: Any = None
    todo: list[Any] = [loss_fn]
    seen: set[int] = set()
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if isinstance(f, functools.partial):
            todo.append(f.func)
            continue
        if isinstance(f, types.MethodType):
            todo.append(f.__func__)
            continue
        if not isinstance(f, types.FunctionType):
            call = inspect.getattr_static(type(f), "__call__", None)  # a callable object
            if isinstance(call, types.FunctionType):
                todo.append(call)
            continue
        if home is None:
            home = f.__globals__
        elif f.__globals__ is not home:
            continue  # another module's function: its variables are its own business
        for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # a variable not assigned yet
                continue
            bindings[id(cell), name] = Binding(name, value, functools.partial(set_cell, cell))
            todo.append(value)
        for name in code_names(f.__code__):
            if name in home:
                value = home[name]
                setter = functools.partial(home.__setitem__, name)
                bindings[id(home), name] = Binding(name, value, setter)
                todo.append(value)
    # Objects the loss holds (a callable object, a bound method's self, partial's arguments):
    return [*held(loss_fn), *bindings.values()]


def held(f: Any) -> list[Binding]:
    """Objects held by ``f`` itself that its code reads: swapped in place, never rebound."""

    def fixed(name: str, value: Any) -> Binding:
        return Binding(name, value, functools.partial(cannot_rebind, name))

    if isinstance(f, functools.partial):
        args = [fixed(f"partial argument {i}", a) for i, a in enumerate(f.args)]
        kwargs = [fixed(f"partial argument {k}", v) for k, v in f.keywords.items()]
        return [*args, *kwargs, *held(f.func)]
    if isinstance(f, types.MethodType):
        return [fixed("self", f.__self__)]
    if not isinstance(f, types.FunctionType):
        return [fixed("the loss object", f)]
    return []


def set_cell(cell: Any, value: Any) -> None:
    cell.cell_contents = value


def cannot_rebind(name: str, value: Any) -> None:
    del value
    raise TypeError(
        f"gradient cannot substitute the parameter in {name}: it is immutable and held where it "
        "cannot be replaced; keep parameters in lists, dicts or objects with attributes"
    )


class Swapper:
    """Puts traced values where the parameters are, remembering how to put the originals back.

    Mutable containers are written in place; an immutable one (a tuple, a frozen pytree) is
    rebuilt, and the rebuilt one is written into its parent (or the variable holding it).
    """

    def __init__(self, ps: Any, values: Sequence[Any]) -> None:
        # ``ps`` is an ``implicit.Params``: it tells which objects are parameters (``_resolve``)
        self.ps = ps
        self.values = values
        self.views: dict[tuple[int, Perm], Any] = {}
        self.memo: dict[int, tuple[Any, Any]] = {}  # id(node) -> (node, what it became)
        self.undo: list[Callable[[], None]] = []

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()

    def rebind(self, binding: Binding) -> None:
        new = self.swap(binding.value, binding.name)
        if new is not binding.value:
            binding.set(new)
            self.undo.append(functools.partial(binding.set, binding.value))

    def swap(self, node: Any, path: str) -> Any:
        """``node`` with the parameters in it traced: ``node`` itself if changed in place."""
        done = self.memo.get(id(node))
        if done is not None and done[0] is node:
            return done[1]
        self.memo[id(node)] = (node, node)  # a cycle back to ``node`` sees it as it is
        new = self._swap(node, path)
        self.memo[id(node)] = (node, new)
        return new

    def _traced(self, hit: Hit) -> Any:
        key = (hit.param, hit.perm)
        if key not in self.views:
            self.views[key] = _arrays.permute(self.values[hit.param], hit.perm)
        return self.views[key]

    def _swap(self, node: Any, path: str) -> Any:
        if is_transpose(node) or is_array(node):
            return self._swap_array(node, path)
        kids = pytree_children(node)
        if kids is not None:
            return self._swap_pytree(node, path, *kids)
        if plain_object(node):
            for name, child in list(vars(node).items()):
                new = self.swap(child, f"{path}.{name}")
                if new is not child:
                    self._setattr(node, name, new, f"{path}.{name}")
        return node

    def _swap_array(self, node: Any, path: str) -> Any:
        hit = self.ps._resolve(node)
        if hit is None:
            k = self.ps._overlapped(unwrap(node)[0])
            if k is not None:
                raise TypeError(
                    f"{path} is a slice or reshape of the parameter at "
                    f"{self.ps._positions[k][0].path}; gradient cannot trace it. Compute it "
                    "from the parameter inside the loss"
                )
            return node
        value = self._traced(hit)
        if hit.depth == 0:
            return value
        inner = node
        while is_transpose(inner.parent):
            inner = inner.parent
        self.undo.append(functools.partial(setattr, inner, "parent", inner.parent))
        inner.parent = value  # the node itself: whoever holds it sees the traced value
        return node

    def _swap_pytree(
        self, node: Any, path: str, children: list[tuple[str, Any, Any]], treedef: Any
    ) -> Any:
        new = [self.swap(child, path + name) for name, _, child in children]
        changed = [
            i for i, (c, (_, _, old)) in enumerate(zip(new, children, strict=True)) if c is not old
        ]
        if not changed:
            return node
        if isinstance(node, dict | list):
            for i in changed:
                _, key, old = children[i]
                item = key.key if isinstance(node, dict) else key.idx
                node[item] = new[i]
                self.undo.append(functools.partial(node.__setitem__, item, old))
            return node
        attrs = [getattr(children[i][1], "name", None) for i in changed]
        if all(
            isinstance(a, str) and getattr(node, a, None) is children[i][2]
            for a, i in zip(attrs, changed, strict=True)
        ):
            mark = len(self.undo)
            try:
                for a, i in zip(attrs, changed, strict=True):
                    self._setattr(node, str(a), new[i], path)
                return node
            except TypeError:  # frozen: rebuild it instead
                while len(self.undo) > mark:
                    self.undo.pop()()
        return treedef.unflatten(new)

    def _setattr(self, node: Any, name: str, value: Any, path: str) -> None:
        old = getattr(node, name)
        try:
            setattr(node, name, value)
        except (AttributeError, TypeError) as err:
            raise TypeError(
                f"gradient cannot substitute the parameter at {path}: {type(node).__name__} "
                f"does not allow setting .{name} ({err}); keep parameters in lists, dicts or "
                "objects with settable attributes"
            ) from err
        self.undo.append(functools.partial(setattr, node, name, old))
