"""Tree structures in the metadata: a JSON description of a tree's nodes, enough to rebuild
dicts, lists, tuples, ``None``, ``Transpose`` and optstate's own named tuples and schedules, and to
name the first difference between two trees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from .._transpose import Transpose
from ..schedules import Schedule
from ._codec import CheckpointError, Json
from ._values import OpaqueError, decode, encode_or_repr, resolve, same, type_name


def describe(tree: Any) -> Json:
    """A JSON description of ``tree``'s nodes; its leaves are ``{"t": "leaf"}``."""
    if tree is None:
        return {"t": "none"}
    keyed, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda c: c is not tree)
    if len(keyed) == 1 and keyed[0][0] == () and keyed[0][1] is tree:
        return {"t": "leaf"}
    keys = [k[0] for k, _ in keyed]
    children = [describe(child) for _, child in keyed]
    cls = type(tree)
    desc: dict[str, Json]
    if cls is dict:
        desc = {"t": "dict", "keys": [encode_or_repr(k.key) for k in keys]}
    elif cls is list or cls is tuple:
        desc = {"t": cls.__name__}
    elif isinstance(tree, tuple) and hasattr(cls, "_fields"):
        desc = {"t": "namedtuple", "type": type_name(cls), "fields": list(cls._fields)}
    elif cls is Transpose:
        desc = {"t": "transpose"}
    elif dataclasses.is_dataclass(tree):
        data = [getattr(k, "name", str(k)) for k in keys]
        meta = {
            f.name: encode_or_repr(getattr(tree, f.name))
            for f in dataclasses.fields(tree)
            if f.name not in data
        }
        desc = {"t": "dataclass", "type": type_name(cls), "fields": data, "meta": meta}
    else:
        desc = {"t": "node", "type": type_name(cls)}
    desc["c"] = children
    return desc


def _node_text(desc: Json, qualified: bool = False) -> str:
    t = desc["t"]
    if t == "leaf":
        return "an array (a leaf)"
    if t == "none":
        return "None"
    if t == "dict":
        return f"a dict with keys {[_key_text(k) for k in desc['keys']]}"
    if t in ("list", "tuple"):
        return f"a {t} of {len(desc['c'])}"
    if t == "transpose":
        return "a Transpose"
    module, name = desc["type"]
    if not qualified:
        return f"a {name}"
    fields = f" with fields {desc['fields']}" if "fields" in desc else ""
    return f"a {module}.{name}{fields}"


def _key_text(key: Json) -> Any:
    try:
        return decode(key)
    except OpaqueError as err:
        return str(err)


def first_difference(a: Json, b: Json, path: str) -> str:
    """Where two descriptions first differ: ``model['dec']: the file has ..., like has ...``.
    Two classes that print alike (two ``Layer`` named tuples of different modules) are shown with
    their modules and fields."""
    head = {k: v for k, v in a.items() if k != "c"}
    other = {k: v for k, v in b.items() if k != "c"}
    if not same(head, other) or len(a.get("c", [])) != len(b.get("c", [])):
        ta, tb = _node_text(a), _node_text(b)
        if ta == tb:
            ta, tb = _node_text(a, qualified=True), _node_text(b, qualified=True)
        return f"{path}: the file has {ta}, like has {tb}"
    for i, (x, y) in enumerate(zip(a.get("c", []), b.get("c", []), strict=True)):
        if not same(x, y):
            return first_difference(x, y, path + _child_text(a, i))
    return path


def _child_text(desc: Json, i: int) -> str:
    if desc["t"] == "dict":
        return f"[{_key_text(desc['keys'][i])!r}]"
    if desc["t"] in ("namedtuple", "dataclass", "transpose", "node"):
        fields = desc.get("fields")
        return f".{fields[i]}" if fields else f"[{i}]"
    return f"[{i}]"


class _Hole:
    """The placeholder leaf of a rebuilt structure."""


_HOLE = _Hole()


def _build(desc: Json, path: str) -> Any:
    """A tree of ``desc``'s structure with ``_HOLE`` leaves; ``OpaqueError`` for a node that only
    ``like`` can provide (a class from another package)."""
    t = desc["t"]
    if t == "leaf":
        return _HOLE
    if t == "none":
        return None
    kids = desc["c"]
    children = [_build(c, path + _child_text(desc, i)) for i, c in enumerate(kids)]
    if t == "dict":
        return {decode(k): c for k, c in zip(desc["keys"], children, strict=True)}
    if t == "list":
        return children
    if t == "tuple":
        return tuple(children)
    if t == "transpose":
        return Transpose(*children)
    if t == "namedtuple":
        cls = resolve(desc["type"], tuple, path)
        return cls(*children)
    if t == "dataclass":
        cls = resolve(desc["type"], Schedule, path)
        node = object.__new__(cls)
        for name, child in zip(desc["fields"], children, strict=True):
            object.__setattr__(node, name, child)
        for name, value in desc["meta"].items():
            object.__setattr__(node, name, decode(value))
        return node
    raise OpaqueError(f"{path} is a {desc['type'][1]} (from {desc['type'][0]})")


def treedef(desc: Json, path: str, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """The structure that ``desc`` describes; ``OpaqueError`` if only ``like`` can give it."""
    return jax.tree_util.tree_structure(_build(desc, path), is_leaf=is_leaf)


def needs_like(err: OpaqueError) -> CheckpointError:
    return CheckpointError(
        f"{err}, which a checkpoint cannot rebuild without pickle: load it with "
        "like=(state, model), e.g. like=(optstate.setup(rule, model), model) for a freshly "
        "built model"
    )
