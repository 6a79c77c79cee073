"""Where a model or a loss function keeps its arrays: the places inside any Python object.

Implicit-style code reaches its parameters through whatever Python offers: pytrees, containers
and their subclasses, attributes (in ``__dict__`` or in ``__slots__``), closures and default
arguments of functions held anywhere, partials, bound methods, jitted functions, the globals a
function names, class attributes and the attributes of the user's own modules. ``Graph.node``
lists the places inside one object, each with a way to write a new value there, so that the
bridge can both find the parameters (``leaves``) and put traced values where the loss reads
them (``_swap``).

What is not walked: the globals of library modules (the standard library, installed packages,
optstate itself), since they are large and hold no user parameters, and objects implemented in
C that expose nothing (their state is not reachable from Python).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import sysconfig
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, cast

import jax

from .. import _arrays
from .._transpose import is_transpose

LOSS = "loss_fn"  # the path of the loss function: its own variables are named bare
Undo = Callable[[], None]
Put = Callable[[Any], Undo]

# Values with nothing inside that could hold an array (checked first: they are most of a graph).
_ATOMS = (
    str,
    bytes,
    bytearray,
    int,
    float,
    complex,
    type(None),
    range,
    memoryview,
    types.ModuleType,
    types.CodeType,
    types.BuiltinFunctionType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MemberDescriptorType,
    types.GetSetDescriptorType,
)


class Place(NamedTuple):
    """One place inside an object: its path, what it holds, and how to write a new value there
    (``put`` returns how to undo the write; ``None``: the place cannot be written)."""

    path: str
    value: Any
    put: Put | None


class Node(NamedTuple):
    """The places inside one object. ``rebuild`` makes a new object from new values of all its
    places (for immutable pytrees); ``pytree``: JAX flattens it, so ``update`` reaches inside;
    ``fixed``: why a place without ``put`` cannot be written."""

    places: list[Place]
    rebuild: Callable[[list[Any]], Any] | None = None
    pytree: bool = False
    fixed: str = ""


def is_array(x: Any) -> bool:
    return _arrays.is_numpy(x) or _arrays.is_jax(x)


def is_compiled(x: Any) -> bool:
    """A jitted function (``jax.jit``, ``equinox.filter_jit``, ``nnx.jit``): it caches what it
    traced, so a value it reads from its closure is frozen into its cache."""
    kind = type(x)
    if isinstance(x, type) or not (callable(x) and hasattr(kind, "lower")):
        return False
    return hasattr(kind, "__wrapped__") or "__wrapped__" in (_instance_dict(x) or {})


@functools.cache
def _library_roots() -> tuple[Path, ...]:
    paths = sysconfig.get_paths()
    names = ("stdlib", "platstdlib", "purelib", "platlib")
    return tuple({Path(paths[n]).resolve() for n in names if n in paths})


@functools.lru_cache(maxsize=1024)
def is_library(module_name: str | None) -> bool:
    """Code of the standard library, of an installed package or of optstate: not the user's."""
    if not module_name:
        return False
    if module_name == "optstate" or module_name.startswith("optstate."):
        return True
    module = sys.modules.get(module_name)
    origin = getattr(getattr(module, "__spec__", None), "origin", None)
    if module_name in sys.builtin_module_names or origin in ("built-in", "frozen"):
        return True
    file = getattr(module, "__file__", None)
    if file is None:  # __main__ of a session, a module made at run time
        return False
    where = Path(file).resolve()
    return any(where.is_relative_to(root) for root in _library_roots())


def code_names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object (and the code nested in it) uses."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_names(const)
    return names


# -- writing a place ---------------------------------------------------------------------------


def _set_item(container: Any, key: Any, old: Any, setitem: Callable[..., None]) -> Put:
    """Writes ``container[key]``, which holds ``old``, with ``setitem``, the base class's own
    (``dict.__setitem__``: a subclass's hooks are not run)."""

    def put(value: Any) -> Undo:
        setitem(container, key, value)
        return functools.partial(setitem, container, key, old)

    return put


def _set_attr(obj: Any, name: str, old: Any, path: str, frozen_too: bool = True) -> Put:
    """Sets an attribute whose stored value is ``old`` (as stored: for a class, the
    staticmethod, not the function it gives); ``frozen_too``: also of a frozen dataclass, as its
    own ``__init__`` does (for a pytree, which can be rebuilt instead, a refusal is a
    ``TypeError``)."""

    def put(value: Any) -> Undo:
        try:
            setattr(obj, name, value)
            return functools.partial(setattr, obj, name, old)
        except dataclasses.FrozenInstanceError as err:
            if not frozen_too:
                raise TypeError(str(err)) from err
            object.__setattr__(obj, name, value)
            return functools.partial(object.__setattr__, obj, name, old)
        except Exception as err:  # AttributeError, TypeError, a library's own refusal
            raise TypeError(
                f"gradient cannot substitute the parameter at {path}: {type(obj).__name__} "
                f"does not allow setting .{name} ({type(err).__name__}: {err}); keep "
                "parameters in lists, dicts, pytrees or objects with settable attributes, or "
                "differentiate explicitly (jax.grad of a function of the model)"
            ) from err

    return put


def _set_cell(cell: types.CellType) -> Put:
    def put(value: Any) -> Undo:
        old = cell.cell_contents
        cell.cell_contents = value
        return functools.partial(setattr, cell, "cell_contents", old)

    return put


def _set_default(f: types.FunctionType, index: int) -> Put:
    def put(value: Any) -> Undo:
        old = f.__defaults__
        assert old is not None
        f.__defaults__ = (*old[:index], value, *old[index + 1 :])
        return functools.partial(setattr, f, "__defaults__", old)

    return put


def _set_partial(p: functools.partial[Any], field: str, key: Any = None) -> Put:
    """Writes a partial's function or one of its positional arguments (``__setstate__``, the
    way pickle rebuilds a partial; its keyword arguments are a dict, written in place)."""

    def put(value: Any) -> Undo:
        old = p.__reduce__()[2]
        func, args = p.func, p.args
        if field == "func":
            func = value
        else:
            args = (*args[:key], value, *args[key + 1 :])
        restate = cast(Any, p).__setstate__  # how pickle rebuilds a partial
        restate((func, args, p.keywords, vars(p) or None))
        return functools.partial(restate, old)

    return put


# -- the places inside an object ---------------------------------------------------------------


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


def _instance_dict(obj: Any) -> dict[str, Any] | None:
    try:
        found = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None
    return found if isinstance(found, dict) else None


def _slots(obj: Any) -> Iterator[tuple[str, Any]]:
    """The ``__slots__`` attributes of ``obj`` that hold a value, by their (mangled) names."""
    for klass in type(obj).__mro__:
        declared = vars(klass).get("__slots__", ())
        for name in (declared,) if isinstance(declared, str) else declared:
            if name.startswith("__") and not name.endswith("__"):
                name = f"_{klass.__name__.lstrip('_')}{name}"
            slot = vars(klass).get(name)
            if isinstance(slot, types.MemberDescriptorType):
                try:
                    yield name, slot.__get__(obj, klass)
                except AttributeError:  # declared but not set
                    continue


class Graph:
    """How to walk objects. ``code``: also what functions can read besides their closures and
    defaults (the globals they name, the attributes of user modules, the attributes of user
    classes), as a loss function reads them; ``home``: the globals of the loss's own module,
    walked even when it is a library's (a doctest runs in one)."""

    def __init__(self, code: bool, home: dict[str, Any] | None = None, skip: tuple = ()) -> None:
        self.code = code
        self.home = home
        self.skip = skip  # types never walked (the bridge's own Params and Grads)

    def node(self, node: Any, path: str) -> Node | None:
        """The places inside ``node``; ``None`` for an array, an atom or an opaque object."""
        if isinstance(node, (*_ATOMS, *self.skip)) or is_array(node):
            return None
        if isinstance(node, jax.core.Tracer) or is_transpose(node):
            return None
        if isinstance(node, types.FunctionType):
            return Node(list(self._function(node, path)))
        if is_compiled(node):
            return Node([Place(f"{path}<wrapped>", node.__wrapped__, None)], fixed="jitted")
        if isinstance(node, type):
            return self._class(node, path)
        kids = pytree_children(node)
        if kids is not None:
            return _pytree(node, path, *kids)
        return _callable_places(node, path) or self._object(node, path)

    def _function(self, f: types.FunctionType, path: str) -> Iterator[Place]:
        if not self.code and is_library(f.__globals__.get("__name__")):
            return  # a model's parameters are in the user's own closures, not jax.nn.relu's
        names = code_names(f.__code__) if self.code else set()
        for name, cell in zip(f.__code__.co_freevars, f.__closure__ or (), strict=True):
            try:
                value = cell.cell_contents
            except ValueError:  # a variable not assigned yet
                continue
            yield Place(_inner(path, "closure", name), value, _set_cell(cell))
            yield from self._module(value, names)
        defaults = f.__defaults__ or ()
        first = f.__code__.co_argcount - len(defaults)  # the defaults are of the last arguments
        for i, value in enumerate(defaults):
            name = f.__code__.co_varnames[first + i]
            yield Place(_inner(path, "default", name), value, _set_default(f, i))
        for name, value in (f.__kwdefaults__ or {}).items():
            put = _set_item(f.__kwdefaults__, name, value, dict.__setitem__)
            yield Place(_inner(path, "default", name), value, put)
        for name, value in vars(f).items():  # __wrapped__, and attributes set on the function
            yield Place(f"{path}.{name}", value, _set_attr(f, name, value, f"{path}.{name}"))
        g = f.__globals__
        if self.code and (g is self.home or not is_library(g.get("__name__"))):
            for name in sorted(names & g.keys()):
                yield Place(
                    _inner(path, "global", name),
                    g[name],
                    _set_item(g, name, g[name], dict.__setitem__),
                )
                yield from self._module(g[name], names)

    def _module(self, value: Any, names: set[str]) -> Iterator[Place]:
        """The attributes a function names of a user module it holds (``module.W``)."""
        if not (isinstance(value, types.ModuleType) and not is_library(value.__name__)):
            return
        for name in sorted(names & vars(value).keys()):
            where = f"{value.__name__}.{name}"
            held = vars(value)[name]
            yield Place(where, held, _set_attr(value, name, held, where))

    def _class(self, cls: type, path: str) -> Node | None:
        if not self.code or is_library(cls.__module__):
            return None
        return Node(
            [
                Place(f"{path}.{name}", value, _set_attr(cls, name, value, f"{path}.{name}"))
                for name, value in vars(cls).items()
                if name not in ("__dict__", "__weakref__")
            ]
        )

    def _object(self, obj: Any, path: str) -> Node | None:
        """A plain object: its attributes, and its class's when it is the user's."""
        attrs = dict(_slots(obj))
        attrs.update(_instance_dict(obj) or {})
        places = [
            Place(f"{path}.{n}", v, _set_attr(obj, n, v, f"{path}.{n}")) for n, v in attrs.items()
        ]
        if self.code:  # class attributes, and the methods that may read globals
            mine = [k for k in type(obj).__mro__ if not is_library(k.__module__)]
            places += [Place(k.__qualname__, k, None) for k in mine]
        if isinstance(obj, dict | list):  # a subclass JAX does not flatten: its items too
            setitem = dict.__setitem__ if isinstance(obj, dict) else list.__setitem__
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            places += [Place(f"{path}[{k!r}]", v, _set_item(obj, k, v, setitem)) for k, v in items]
        elif isinstance(obj, tuple):
            places += [Place(f"{path}[{i}]", v, None) for i, v in enumerate(obj)]
            return Node(places, fixed=f"{type(obj).__name__} is a tuple that JAX does not flatten")
        return Node(places) if places else None


def _pytree(node: Any, path: str, children: list[tuple[str, Any, Any]], treedef: Any) -> Node:
    """A pytree node: dicts and lists are written in place; a node whose children are its
    attributes is written in place when it allows it; any other is rebuilt."""
    places = []
    for name, key, child in children:
        put: Put | None = None
        if isinstance(node, dict):
            put = _set_item(node, key.key, child, dict.__setitem__)
        elif isinstance(node, list):
            put = _set_item(node, key.idx, child, list.__setitem__)
        elif isinstance(getattr(key, "name", None), str) and getattr(node, key.name) is child:
            put = _set_attr(node, key.name, child, path + name, frozen_too=False)
        places.append(Place(path + name, child, put))
    return Node(places, treedef.unflatten, pytree=True)


def _callable_places(node: Any, path: str) -> Node | None:
    """A bound method, partial, staticmethod, classmethod or property: what it calls. The
    first, third and fourth are immutable and rebuilt (a bound method of a rebuilt object)."""
    if isinstance(node, types.MethodType):
        places = [Place(f"{path}<self>", node.__self__, None), Place(path, node.__func__, None)]
        return Node(places, lambda new: types.MethodType(new[1], new[0]))
    if isinstance(node, functools.partial):
        arguments = [
            Place(f"{path}<argument {i}>", a, _set_partial(node, "args", i))
            for i, a in enumerate(node.args)
        ]
        return Node(
            [
                Place(f"{path}<function>", node.func, _set_partial(node, "func")),
                *arguments,
                Place(f"{path}<keywords>", node.keywords, None),  # a dict, changed in place
            ]
        )
    if isinstance(node, staticmethod | classmethod):
        return Node([Place(path, node.__func__, None)], lambda new: type(node)(new[0]))
    if isinstance(node, property):
        functions = [Place(path, f, None) for f in (node.fget, node.fset, node.fdel)]
        return Node(functions, lambda new: cast(Any, type(node))(*new, node.__doc__))
    return None


def _inner(path: str, kind: str, name: str) -> str:
    """The path of a function's variable: bare for the loss's own (``model['w']``), else
    ``net.enc<closure w>``."""
    return name if path == LOSS else f"{path}<{kind} {name}>"


def leaves(root: Any) -> list[tuple[str, Any, bool]]:
    """Every array or ``Transpose`` in ``root`` as ``(path, leaf, in_pytree)``, in walk order;
    ``in_pytree``: reached through pytree nodes only, so that ``update`` sees it."""
    out: list[tuple[str, Any, bool]] = []
    seen: set[int] = set()  # objects other than pytrees, walked once (they may refer back)
    graph = Graph(code=False)

    def visit(node: Any, path: str, in_pytree: bool) -> None:
        if is_transpose(node) or is_array(node):
            out.append((path, node, in_pytree))
            return
        found = graph.node(node, path)
        if found is None:
            return
        if not found.pytree:
            if id(node) in seen:
                return
            seen.add(id(node))
        for place in found.places:
            visit(place.value, place.path, in_pytree and found.pytree)

    visit(root, "model", True)
    return out
