"""Putting traced values where the loss reads the parameters, for one call, and back.

``implicit.gradient`` calls the loss with one traced value per parameter at every place the loss
can read it (the places ``_objects.Graph`` finds) and puts the original arrays back afterwards,
also when the loss raises. Mutable places are written in place; an immutable pytree (a tuple, a
frozen pytree) is rebuilt and written into its own place. A place that holds a parameter but can
be neither written nor rebuilt is refused, naming it: a partial gradient is never returned.

A jitted function whose Python function reads a parameter from its closure or globals is
replaced, for the call, by that Python function: under ``jit`` the traced value would be frozen
into jit's cache (and a value cached before would stand for the parameter, silently).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .. import _arrays
from .._arrays import Perm
from .._transpose import is_transpose
from .._walk import unwrap
from ._objects import Graph, Node, Place, Undo, is_array, is_compiled

if TYPE_CHECKING:
    from ._params import Hit


class Swapper:
    """Puts traced values where the parameters are, remembering how to put the originals back.

    ``resolve(x)`` tells how ``x`` sits on a parameter (``None``: it is no parameter);
    ``overlap(x)`` names the parameter whose memory a NumPy array ``x`` shares without being
    the parameter or a transpose view of it (a slice), if any.
    """

    def __init__(
        self,
        resolve: Callable[[Any], Hit | None],
        overlap: Callable[[Any], str | None],
        values: Sequence[Any],
        graph: Graph,
    ) -> None:
        self.resolve = resolve
        self.overlap = overlap
        self.values = values
        self.graph = graph
        self.views: dict[tuple[int, Perm], Any] = {}
        self.traced = {id(v) for v in values}  # the traced values and views put in place
        self.memo: dict[int, tuple[Any, Any]] = {}  # id(node) -> (node, what it became)
        self.reaching: dict[int, bool] = {}
        self.undo: list[Undo] = []

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()

    def swap(self, node: Any, path: str) -> Any:
        """``node`` with the parameters in it traced: ``node`` itself if changed in place."""
        done = self.memo.get(id(node))
        if done is not None and done[0] is node:
            return done[1]
        self.memo[id(node)] = (node, node)  # a cycle back to ``node`` sees it as it is
        new = self._swap(node, path)
        self.memo[id(node)] = (node, new)
        return new

    def _swap(self, node: Any, path: str) -> Any:
        if is_transpose(node) or is_array(node):
            return self._swap_array(node, path)
        if is_compiled(node):
            reads = self._reaches(node.__wrapped__)  # before its places are swapped
            inner = self.swap(node.__wrapped__, f"{path}<wrapped>")
            return inner if reads else node  # its Python function, while the loss runs
        found = self.graph.node(node, path)
        if found is None:
            return node
        new = [self.swap(place.value, place.path) for place in found.places]
        changed = [i for i, place in enumerate(found.places) if new[i] is not place.value]
        return self._write(node, found, new, changed) if changed else node

    def _write(self, node: Any, found: Node, new: list[Any], changed: list[int]) -> Any:
        """``node`` with the new values at its changed places: written in place where every
        one can be, else rebuilt (rolling back what was written)."""
        places = found.places
        if all(places[i].put is not None for i in changed):
            mark = len(self.undo)
            try:
                for i in changed:
                    put = places[i].put
                    assert put is not None
                    self.undo.append(put(new[i]))
                return node
            except TypeError:
                if found.rebuild is None:
                    raise
                while len(self.undo) > mark:
                    self.undo.pop()()
        if found.rebuild is not None:
            return found.rebuild(new)
        raise _cannot(next(places[i] for i in changed if places[i].put is None), found.fixed)

    def _traced(self, hit: Hit) -> Any:
        key = (hit.param, hit.perm)
        if key not in self.views:
            self.views[key] = view = _arrays.permute(self.values[hit.param], hit.perm)
            self.traced.add(id(view))
        return self.views[key]

    def _swap_array(self, node: Any, path: str) -> Any:
        hit = self.resolve(node)
        if hit is None:
            owner = self.overlap(unwrap(node)[0])
            if owner is not None:
                raise TypeError(
                    f"{path} is a slice or reshape of the parameter at {owner}; gradient cannot "
                    "trace it. Compute it from the parameter inside the loss"
                )
            return node
        value = self._traced(hit)
        if hit.depth == 0:
            return value
        inner = node
        while is_transpose(inner.parent):
            inner = inner.parent
        old = inner.parent
        self.undo.append(lambda: setattr(inner, "parent", old))
        inner.parent = value  # the node itself: whoever holds it sees the traced value
        return node

    def _reaches(self, start: Any) -> bool:
        """Whether a parameter (or a traced value already put in place) can be read from
        ``start``: its places, theirs, and so on."""
        if id(start) not in self.reaching:
            self.reaching[id(start)] = self._search(start)
        return self.reaching[id(start)]

    def _search(self, start: Any) -> bool:
        seen: set[int] = set()
        todo = [start]
        while todo:
            node = todo.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if is_transpose(node) or is_array(node):
                base = unwrap(node)[0]
                if id(base) in self.traced or self.resolve(node) is not None:
                    return True
                continue
            found = self.graph.node(node, "")
            if found is not None:
                todo.extend(place.value for place in found.places)
        return False


def _cannot(place: Place, why: str) -> TypeError:
    if is_compiled(place.value):
        return TypeError(
            f"gradient cannot run the jitted function at {place.path}: it reads a parameter "
            "from its closure or globals, and jit would freeze the value it reads into its "
            "cache (the gradient through it would be lost), but it is held where it cannot be "
            f"replaced by its Python function for the call ({why}). Pass the parameters to it "
            "as arguments (helper(model['w'], x)), or hold it in a variable, list, dict or "
            "attribute"
        )
    return TypeError(
        f"gradient cannot substitute the parameter at {place.path}: {why}. Keep parameters in "
        "lists, dicts, pytrees or objects with settable attributes, or register the class as a "
        "pytree"
    )
