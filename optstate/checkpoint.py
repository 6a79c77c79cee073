"""Checkpoints: ``save(path, state, model=None)`` and ``load(path, like=None)``.

A checkpoint is one NumPy ``.npz`` file (a zip archive of ``.npy`` arrays, readable with
``np.load(path, allow_pickle=False)``) with one extra member, ``optstate.json``, that describes
the rest: the format name and version, the tie plan (which positions hold which parameter, in
what orientation, with which rule, frozen or not), the structure of the model and of every rule
state and hyper-parameter tree, and for each array its shape, dtype and CRC-32. Nothing is
pickled. A tied parameter is stored once, under the path of its first position.

``save`` writes a temporary file beside ``path``, flushes it to disk and renames it over ``path``
(``os.replace``), so ``path`` always holds either the previous checkpoint or the new one, whole.
``load`` reads and checks everything before it returns, so an error never leaves a half-loaded
state. See docs/checkpoints.md for the guarantees and an orbax-checkpoint recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib
import json
import math
import os
import secrets
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

import jax
import ml_dtypes
import numpy as np

from . import _arrays
from ._state import Plan, State
from ._ties import Param, Slot
from ._update import _check_model, _check_structure, _place
from ._walk import flatten, path_strings, skeleton, unwrap
from .rules._base import Rule
from .schedules import Schedule
from .transpose import Transpose, is_transpose

__all__ = ["FORMAT", "VERSION", "CheckpointError", "CheckpointMismatchError", "load", "save"]

FORMAT = "optstate.checkpoint"
"""The format name stored in every checkpoint's metadata."""
VERSION = 1
"""The format version this optstate writes; it reads every version up to this one."""
META = "optstate.json"  # the metadata member of the archive

Json = Any  # a value of what ``json.loads`` returns


class CheckpointError(ValueError):
    """A file that cannot be loaded as an optstate checkpoint: not a checkpoint at all, truncated
    or corrupted bytes, or a format version newer than this optstate reads. Nothing is loaded."""


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit ``like``: another model structure, other ties, other
    parameter shapes or dtypes, or other rules. The message names the first path that differs."""


# -- JSON values: rule fields, dictionary keys, dataclass metadata, plain model leaves ---------


class _OpaqueError(Exception):
    """A value with no JSON form: it can be compared through its ``repr`` but not rebuilt."""


def _enc(v: Any) -> Json:
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else {"float": repr(float(v))}
    if isinstance(v, complex):
        return {"complex": [_enc(v.real), _enc(v.imag)]}
    if isinstance(v, np.generic) and v.dtype.kind in "biufc":
        return _enc(v.item())
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, list):
        return {"list": [_enc(x) for x in v]}
    if isinstance(v, Rule):
        return _rule_desc(v)
    if isinstance(v, np.dtype):
        return {"dtype": v.name}
    if isinstance(v, type) and (issubclass(v, np.generic) or hasattr(v, "dtype")):
        form = "jax" if v.__module__.startswith("jax") else "numpy"
        return {"dtype": np.dtype(getattr(v, "dtype", v)).name, "as": form}
    raise _OpaqueError(repr(v))


def _enc_or_repr(v: Any) -> Json:
    try:
        return _enc(v)
    except _OpaqueError:
        return {"repr": repr(v)}


def _dec(v: Json) -> Any:
    if not isinstance(v, dict):
        if isinstance(v, list):
            raise CheckpointError(f"malformed value in the metadata: {v!r}")
        return v
    if "float" in v:
        return float(v["float"])
    if "complex" in v:
        return complex(_dec(v["complex"][0]), _dec(v["complex"][1]))
    if "tuple" in v:
        return tuple(_dec(x) for x in v["tuple"])
    if "list" in v:
        return [_dec(x) for x in v["list"]]
    if "dtype" in v:
        dtype = _dtype(v["dtype"])
        form = v.get("as")
        if form == "jax":
            return getattr(jax.numpy, dtype.name)
        return dtype.type if form == "numpy" else dtype
    if "rule" in v:
        return _build_rule(v)
    raise _OpaqueError(str(v.get("repr", v)))


def _same(a: Json, b: Json) -> bool:
    """Equal descriptions, whatever object stood for a dtype (``jnp.bfloat16`` or its dtype)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - ({"as"} if "dtype" in a else set())
        return all(k in a and k in b and _same(a[k], b[k]) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        pass
    kind = getattr(ml_dtypes, str(name), None)  # bfloat16, float8_*, int4, ...
    if not (isinstance(kind, type) and issubclass(kind, np.generic)):
        raise CheckpointError(f"unknown dtype {name!r} in the metadata")
    return np.dtype(kind)


# -- classes that a checkpoint may name: optstate's own, and nothing else ---------------------


def _type_name(cls: type) -> list[str]:
    return [cls.__module__, cls.__qualname__]


def _resolve(name: Json, base: type, where: str) -> Any:
    """The optstate class ``name`` (``[module, qualname]``), a subclass of ``base``. Classes of
    other packages are never imported from a file: they need ``like``."""
    module, qualname = name
    if not (module == "optstate" or str(module).startswith("optstate.")):
        raise _OpaqueError(f"{where} is a {qualname} (from {module})")
    try:
        obj: Any = importlib.import_module(module)
        for part in str(qualname).split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise CheckpointError(
            f"{where}: the checkpoint names {module}.{qualname}, which this optstate does not "
            "have (a checkpoint from another version?)"
        ) from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise CheckpointError(f"{where}: {module}.{qualname} is not a {base.__name__}")
    return obj


def _rule_desc(rule: Rule) -> Json:
    if not dataclasses.is_dataclass(rule):
        return {"rule": _type_name(type(rule)), "fields": {"repr": repr(rule)}}
    fields = {f.name: _enc_or_repr(getattr(rule, f.name)) for f in dataclasses.fields(rule)}
    return {"rule": _type_name(type(rule)), "fields": fields}


def _build_rule(desc: Json) -> Rule:
    """A rule structure from its description, field by field (no ``__init__`` runs: a structure
    has its hyper-parameters set to ``None``, which some constructors would refuse)."""
    cls = _resolve(desc["rule"], Rule, "a rule")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(desc["fields"]) != names:
        raise CheckpointError(
            f"the checkpoint's {cls.__name__} has fields {sorted(desc['fields'])}, this "
            f"optstate's has {sorted(names)} (a checkpoint from another version?)"
        )
    rule = object.__new__(cls)
    for name, value in desc["fields"].items():
        object.__setattr__(rule, name, _dec(value))
    return rule  # type: ignore[no-any-return]


def _rule_text(desc: Json) -> str:
    """``Adam(mu_dtype=bfloat16)``: the class and its fields that are set, for messages."""
    if desc is None:
        return "no rule (None at setup)"
    name = desc["rule"][1]
    fields = desc["fields"]
    if "rules" in fields and isinstance(fields["rules"], dict) and "tuple" in fields["rules"]:
        return f"{name}({', '.join(_rule_text(r) for r in fields['rules']['tuple'])})"
    if "rule" in fields and isinstance(fields["rule"], dict) and "rule" in fields["rule"]:
        return f"{name}({_rule_text(fields['rule'])})"
    shown = []
    for key, value in fields.items():
        if value is not None:
            text = (
                value.get("dtype", value.get("repr", value)) if isinstance(value, dict) else value
            )
            shown.append(f"{key}={text}")
    return f"{name}({', '.join(shown)})"


# -- tree structures ---------------------------------------------------------------------------


def _describe(tree: Any) -> Json:
    """A JSON description of ``tree``'s nodes (its leaves are ``{"t": "leaf"}``), enough to
    rebuild dicts, lists, tuples, ``None`` and optstate's own named tuples and schedules, and to
    name the first difference between two trees."""
    if tree is None:
        return {"t": "none"}
    keyed, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda c: c is not tree)
    if len(keyed) == 1 and keyed[0][0] == () and keyed[0][1] is tree:
        return {"t": "leaf"}
    keys = [k[0] for k, _ in keyed]
    children = [_describe(child) for _, child in keyed]
    cls = type(tree)
    desc: dict[str, Json]
    if cls is dict:
        desc = {"t": "dict", "keys": [_enc_or_repr(k.key) for k in keys]}
    elif cls is list or cls is tuple:
        desc = {"t": cls.__name__}
    elif isinstance(tree, tuple) and hasattr(cls, "_fields"):
        desc = {"t": "namedtuple", "type": _type_name(cls), "fields": list(cls._fields)}
    elif cls is Transpose:
        desc = {"t": "transpose"}
    elif dataclasses.is_dataclass(tree):
        data = [getattr(k, "name", str(k)) for k in keys]
        meta = {
            f.name: _enc_or_repr(getattr(tree, f.name))
            for f in dataclasses.fields(tree)
            if f.name not in data
        }
        desc = {"t": "dataclass", "type": _type_name(cls), "fields": data, "meta": meta}
    else:
        desc = {"t": "node", "type": _type_name(cls)}
    desc["c"] = children
    return desc


def _node_text(desc: Json) -> str:
    t = desc["t"]
    if t == "leaf":
        return "an array (a leaf)"
    if t == "none":
        return "None"
    if t == "dict":
        return f"a dict with keys {[_dec_key_text(k) for k in desc['keys']]}"
    if t in ("list", "tuple"):
        return f"a {t} of {len(desc['c'])}"
    if t == "transpose":
        return "a Transpose"
    return f"a {desc['type'][1]}"


def _dec_key_text(key: Json) -> Any:
    try:
        return _dec(key)
    except _OpaqueError as err:
        return str(err)


def _first_difference(a: Json, b: Json, path: str) -> str:
    """Where two descriptions first differ: ``model['dec']: the file has ..., like has ...``."""
    head = {k: v for k, v in a.items() if k != "c"}
    other = {k: v for k, v in b.items() if k != "c"}
    if not _same(head, other) or len(a.get("c", [])) != len(b.get("c", [])):
        return f"{path}: the file has {_node_text(a)}, like has {_node_text(b)}"
    for i, (x, y) in enumerate(zip(a.get("c", []), b.get("c", []), strict=True)):
        if not _same(x, y):
            return _first_difference(x, y, path + _child_text(a, i))
    return path


def _child_text(desc: Json, i: int) -> str:
    if desc["t"] == "dict":
        return f"[{_dec_key_text(desc['keys'][i])!r}]"
    if desc["t"] in ("namedtuple", "dataclass", "transpose", "node"):
        fields = desc.get("fields")
        return f".{fields[i]}" if fields else f"[{i}]"
    return f"[{i}]"


class _Hole:
    """The placeholder leaf of a rebuilt structure."""


_HOLE = _Hole()


def _build(desc: Json, path: str) -> Any:
    """A tree of ``desc``'s structure with ``_HOLE`` leaves; ``_OpaqueError`` for a node that only
    ``like`` can provide (a class from another package)."""
    t = desc["t"]
    if t == "leaf":
        return _HOLE
    if t == "none":
        return None
    kids = desc["c"]
    children = [_build(c, path + _child_text(desc, i)) for i, c in enumerate(kids)]
    if t == "dict":
        return {_dec(k): c for k, c in zip(desc["keys"], children, strict=True)}
    if t == "list":
        return children
    if t == "tuple":
        return tuple(children)
    if t == "transpose":
        return Transpose(*children)
    if t == "namedtuple":
        cls = _resolve(desc["type"], tuple, path)
        return cls(*children)
    if t == "dataclass":
        cls = _resolve(desc["type"], Schedule, path)
        node = object.__new__(cls)
        for name, child in zip(desc["fields"], children, strict=True):
            object.__setattr__(node, name, child)
        for name, value in desc["meta"].items():
            object.__setattr__(node, name, _dec(value))
        return node
    raise _OpaqueError(f"{path} is a {desc['type'][1]} (from {desc['type'][0]})")


def _treedef(desc: Json, path: str, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    return jax.tree_util.tree_structure(_build(desc, path), is_leaf=is_leaf)


def _needs_like(err: _OpaqueError) -> CheckpointError:
    return CheckpointError(
        f"{err}, which a checkpoint cannot rebuild without pickle: load it with "
        "like=(state, model), e.g. like=(optstate.setup(rule, model), model) for a freshly "
        "built model"
    )


# -- the tie plan ------------------------------------------------------------------------------


def _plan_meta(plan: Plan) -> Json:
    skel = skeleton(plan.treedef)
    return {
        "tree": _describe(skel),
        "positions": path_strings(skel),
        "slots": [
            None if s is None else [s.param, None if s.perm is None else list(s.perm), s.depth]
            for s in plan.slots
        ],
        "params": [
            {
                "primary": p.primary,
                "positions": list(p.positions),
                "shape": list(p.shape),
                "dtype": np.dtype(p.dtype).name,
            }
            for p in plan.params
        ],
        "rules": [_rule_desc(r) for r in plan.rules],
        "param_rules": list(plan.param_rules),
        "frozen": list(plan.frozen),
    }


def _slots(meta: Json) -> tuple[Slot | None, ...]:
    return tuple(
        None if s is None else Slot(int(s[0]), None if s[1] is None else tuple(s[1]), int(s[2]))
        for s in meta["slots"]
    )


def _params(meta: Json) -> tuple[Param, ...]:
    return tuple(
        Param(int(p["primary"]), tuple(p["positions"]), tuple(p["shape"]), _dtype(p["dtype"]))
        for p in meta["params"]
    )


def _param_rule(meta: Json, k: int) -> Json:
    r = meta["param_rules"][k]
    return None if r < 0 else meta["rules"][r]


def _tie_text(meta: Json, pos: int) -> str:
    slot = meta["slots"][pos]
    if slot is None:
        return "is not a parameter"
    param = meta["params"][slot[0]]
    others = [meta["positions"][q] for q in param["positions"] if q != pos]
    how = []
    if slot[2]:
        how.append(f"through {slot[2]} Transpose layer(s)")
    if slot[1] is not None:
        how.append(f"as a NumPy view with axes {tuple(slot[1])}")
    where = f"tied to {', '.join(others)}" if others else "a parameter of its own"
    return f"is {where}{' ' + ' and '.join(how) if how else ''}"


def _tie_key(meta: Json, pos: int) -> Json:
    slot = meta["slots"][pos]
    if slot is None:
        return None
    return [meta["params"][slot[0]]["positions"], slot[1], slot[2]]


def _compare_plans(path: str, file: Json, like: Json) -> None:
    """Raise ``CheckpointMismatchError`` naming the first difference of model structure, ties,
    parameter shapes and dtypes, or rules (frozen flags and rule groups come from the file)."""
    if not _same(file["tree"], like["tree"]):
        have, want = file["positions"], like["positions"]
        missing = [p for p in have if p not in set(want)]
        extra = [p for p in want if p not in set(have)]
        detail = ""
        if missing:
            detail += f"; in the file but not in like: {', '.join(missing[:5])}"
        if extra:
            detail += f"; in like but not in the file: {', '.join(extra[:5])}"
        where = _first_difference(file["tree"], like["tree"], "model")
        raise CheckpointMismatchError(
            f"{path} holds a state for a model of another structure{detail}; first difference "
            f"at {where}"
        )
    names = file["positions"]
    for pos in range(len(names)):
        if not _same(_tie_key(file, pos), _tie_key(like, pos)):
            raise CheckpointMismatchError(
                f"{path} holds a state with other ties: in the file {names[pos]} "
                f"{_tie_text(file, pos)}; in like it {_tie_text(like, pos)}"
            )
    for k, (a, b) in enumerate(zip(file["params"], like["params"], strict=True)):
        if (a["shape"], a["dtype"]) != (b["shape"], b["dtype"]):
            raise CheckpointMismatchError(
                f"{path}: {names[a['primary']]} is {a['dtype']}{a['shape']} in the file, "
                f"{b['dtype']}{b['shape']} in like"
            )
        ra, rb = _param_rule(file, k), _param_rule(like, k)
        if not _same(ra, rb):
            raise CheckpointMismatchError(
                f"{path}: the state of {names[a['primary']]} is for {_rule_text(ra)} in the "
                f"file, for {_rule_text(rb)} in like (a state for a different rule)"
            )


# -- arrays ------------------------------------------------------------------------------------


def _native(dtype: np.dtype) -> bool:
    """A dtype that a ``.npy`` header can name (ml_dtypes' bfloat16 and float8 cannot)."""
    return dtype.kind in "biufc" and dtype.isbuiltin != 2


def _check_storable(x: Any, where: str) -> None:
    """Refuse, before anything is written, an array that cannot be stored."""
    if _arrays.is_jax(x):
        if x.is_deleted():
            raise ValueError(
                f"{where} has been deleted (donated to a jitted step?): save the state and model "
                "that the step returned"
            )
        if not x.is_fully_addressable:
            raise ValueError(
                f"{where} spans devices of several processes: optstate.save writes one file "
                "from one process; use orbax-checkpoint (see docs/checkpoints.md)"
            )
        dtype = np.dtype(x.dtype)
    elif isinstance(x, np.ndarray):
        dtype = x.dtype
    else:
        raise TypeError(f"{where} is a {type(x).__name__}, not a NumPy or JAX array")
    if not _native(dtype) and (dtype.kind != "V" or dtype.itemsize not in (1, 2, 4, 8)):
        raise TypeError(f"{where} has dtype {dtype}, which a checkpoint cannot store")


def _write_array(zf: zipfile.ZipFile, member: str, x: Any) -> Json:
    """Write one array (brought to the host now, one at a time) and return its record."""
    arr = np.asarray(x)
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    stored = arr if _native(arr.dtype) else arr.view(np.dtype(f"u{arr.dtype.itemsize}"))
    crc = zlib.crc32(stored.reshape(-1).view(np.uint8).data)
    with zf.open(member, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, stored, allow_pickle=False)
    return {
        "member": member,
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        "raw": stored is not arr,
        "crc32": crc,
    }


class _Entries:
    """The arrays to write, each under a readable member name (its tree path)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any, str]] = []
        self.names: set[str] = set()

    def add(self, where: str, x: Any) -> int:
        _check_storable(x, where)
        member = where + ".npy"
        if member in self.names:  # two paths that print alike: never overwrite one with another
            member = f"{where}#{len(self.items)}.npy"
        self.names.add(member)
        self.items.append((member, x, where))
        return len(self.items) - 1


def _tree_entries(tree: Any, where: str, entries: _Entries) -> Json:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        "tree": _describe(tree),
        "arrays": [entries.add(where + jax.tree_util.keystr(p), x) for p, x in flat],
    }


def _model_leaf(x: Any, where: str, entries: _Entries) -> Json:
    """A position that is not a parameter: an array, a plain value, or something only ``like``
    can give back."""
    if _arrays.is_jax(x) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(x)
        return {"key": entries.add(where, data), "impl": str(jax.random.key_impl(x))}
    if isinstance(x, np.generic) and x.dtype.kind in "biufc":
        return {"array": entries.add(where, np.asarray(x)), "scalar": True}
    if (_arrays.is_jax(x) or isinstance(x, np.ndarray)) and np.dtype(x.dtype).kind in "biufc":
        return {"array": entries.add(where, x)}
    if x is None or isinstance(x, bool | int | float | complex | str):
        return {"value": _enc(x)}
    return {"opaque": type(x).__qualname__}


# -- save --------------------------------------------------------------------------------------


def save(path: str | os.PathLike[str], state: State, model: Any = None) -> None:
    """Write ``state`` (and ``model``) to the checkpoint file ``path``, atomically.

    The file is a NumPy ``.npz`` archive plus an ``optstate.json`` member (see the module
    docstring); ``np.load(path, allow_pickle=False)`` opens it. Stored: every array of the state
    (rule states, hyper-parameters, step count) with its exact dtype (bfloat16 and other ml_dtypes
    as raw bytes with the dtype's name), the tie plan, the rule structures and frozen flags, and the
    model structure. With ``model``, one array per unique parameter (a tied weight once, whatever
    its number of positions), and the model's other leaves: arrays, plain Python values, JAX PRNG
    keys; leaves of any other kind (functions, objects) are recorded by type only and come back
    from ``like``.

    The file appears whole or not at all: it is written to a temporary file in the same
    directory, flushed to disk (``fsync``), renamed over ``path`` (``os.replace``), and the
    directory is flushed too. If anything fails, or the process is interrupted, the temporary
    file is removed and an existing ``path`` is untouched (after a hard crash a hidden
    ``.<name>.<random>.tmp`` file may be left behind; it is never read).

    Everything is checked before the file is opened: ``model`` must have the structure and ties
    ``state`` was set up for (call ``optstate.retie`` after your own jitted step), and every array
    must be readable from this process (not deleted by donation, not spread over several
    processes: for multi-host arrays use orbax-checkpoint). JAX arrays are copied to the host one
    at a time while the file is written.

    Example:
        >>> import os, tempfile, numpy as np, optstate as ost
        >>> w = np.ones((2, 3))
        >>> model = {"enc": w, "dec": w.T}
        >>> state = ost.setup(ost.Adam(0.1), model)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     ost.save(os.path.join(d, "ckpt.npz"), state, model)
        ...     state2, model2 = ost.load(os.path.join(d, "ckpt.npz"))
        >>> np.shares_memory(model2["enc"], model2["dec"]), state2.plan == state.plan
        (True, True)

    Raises:
        TypeError: ``state`` is not a ``State``, or it holds something that is not an array.
        StructureError, TieError, ValueError: ``model`` does not fit ``state`` (the message names
            the path), or an array cannot be read (deleted, on several processes).
        OSError: the directory does not exist or cannot be written.
    """
    path = os.fspath(path)
    if not isinstance(state, State):
        raise TypeError(f"save expects the State returned by optstate.setup, got {type(state)}")
    plan = state.plan
    entries = _Entries()
    meta: dict[str, Json] = {
        "format": FORMAT,
        "version": VERSION,
        "optstate": getattr(sys.modules.get("optstate"), "__version__", None),
        "plan": _plan_meta(plan),
        "state": {
            "states": [
                _tree_entries(s, f"state.states[{k}]", entries) for k, s in enumerate(state.states)
            ],
            "hyper": [
                _tree_entries(h, f"state.hyper[{r}]", entries) for r, h in enumerate(state.hyper)
            ],
            "step": entries.add("state.step", state.step),
        },
        "model": None,
    }
    if model is not None:
        leaves, treedef = flatten(model)
        _check_structure(plan, treedef, model)
        bases = [unwrap(leaves[p.primary])[0] for p in plan.params]
        _check_model(plan, leaves, bases, model)
        names = path_strings(model)
        meta["model"] = {
            "params": [entries.add(_param_path(plan, k, names), b) for k, b in enumerate(bases)],
            "leaves": [
                None if slot is not None else _model_leaf(leaf, names[pos], entries)
                for pos, (slot, leaf) in enumerate(zip(plan.slots, leaves, strict=True))
            ],
        }

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            meta["arrays"] = [_write_array(zf, member, x) for member, x, _ in entries.items]
            zf.writestr(META, json.dumps(meta, allow_nan=False))

    _atomic_write(path, write)


def _param_path(plan: Plan, k: int, names: list[str]) -> str:
    """The path under which parameter ``k`` is stored: its first position that holds it as it
    is, else the array inside its first position's ``Transpose`` (``model['dec'].parent``)."""
    param = plan.params[k]
    for pos in param.positions:
        slot = plan.slots[pos]
        if slot is not None and slot.depth == 0 and slot.perm is None:
            return names[pos]
    depth = plan.slots[param.primary].depth  # type: ignore[union-attr]
    return names[param.primary] + ".parent" * depth


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot save {path}: the directory {directory} does not exist")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable. Not every platform can open a directory (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


# -- load --------------------------------------------------------------------------------------

# Reading a damaged zip can fail in many ways (BadZipFile, zlib.error, EOFError, a KeyError for a
# garbled name, NotImplementedError for a garbled compression method or flag, ...): any exception
# while reading bytes means the file cannot be trusted.
_READ_ERRORS = (Exception,)


def _corrupt(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or corrupted ({type(err).__name__}: {err}); nothing was loaded. "
        "Load an earlier checkpoint."
    )


class _Reader:
    """An open checkpoint: its checked metadata, and its arrays read and checked one by one."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x93NUMPY"):
            raise CheckpointError(f"{path} is a single NumPy array (.npy), not a checkpoint")
        if not head.startswith(b"PK"):
            raise CheckpointError(
                f"{path} is not an optstate checkpoint: it is not a .npz (zip) file (it begins "
                f"with {head!r})"
            )
        # An open file of our own: np.load leaves its file open when the zip cannot be read.
        self.file = open(path, "rb")  # noqa: SIM115  (closed by close())
        try:
            self.npz = np.load(self.file, allow_pickle=False)
        except Exception as err:
            self.file.close()
            raise _corrupt(path, err) from err
        try:
            if META not in self.npz.zip.namelist():
                raise CheckpointError(
                    f"{path} is a .npz file but not an optstate checkpoint: it has no {META} "
                    f"(it holds {', '.join(self.npz.files[:5]) or 'nothing'})"
                )
            try:
                meta = json.loads(self.npz.zip.read(META).decode("utf-8"))
            except (*_READ_ERRORS, UnicodeDecodeError) as err:
                raise _corrupt(path, err) from err
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not an optstate checkpoint (format {FORMAT!r})")
            version = meta.get("version")
            if not isinstance(version, int) or version < 1:
                raise CheckpointError(f"{path} has no valid format version: {version!r}")
            if version > VERSION:
                raise CheckpointError(
                    f"{path} was written in checkpoint format version {version} (by optstate "
                    f"{meta.get('optstate')}); this optstate reads versions up to {VERSION}: "
                    "upgrade optstate to load it"
                )
        except BaseException:
            self.close()
            raise
        self.meta: Json = meta

    def close(self) -> None:
        self.npz.close()
        self.file.close()

    def array(self, index: int, where: str) -> np.ndarray:
        """Array number ``index``, checked against its record: shape, dtype and CRC-32."""
        ref = self.meta["arrays"][index]
        try:
            stored = self.npz[ref["member"].removesuffix(".npy")]
        except _READ_ERRORS as err:
            raise _corrupt(self.path, err) from err
        if not isinstance(stored, np.ndarray):
            raise _corrupt(self.path, TypeError(f"{ref['member']} is not an array"))
        crc = zlib.crc32(stored.reshape(-1).view(np.uint8).data)
        dtype = _dtype(ref["dtype"])
        if ref["raw"] and stored.dtype.itemsize == dtype.itemsize and stored.dtype.kind == "u":
            stored = stored.view(dtype)
        if stored.dtype != dtype or list(stored.shape) != ref["shape"] or crc != ref["crc32"]:
            raise _corrupt(
                self.path,
                ValueError(
                    f"{where} (member {ref['member']}) does not match its record: "
                    f"{stored.dtype}{list(stored.shape)} with CRC-32 {crc}, recorded "
                    f"{dtype}{ref['shape']} with CRC-32 {ref['crc32']}"
                ),
            )
        return stored


@contextlib.contextmanager
def _open(path: str) -> Iterator[_Reader]:
    reader = _Reader(path)
    try:
        yield reader
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        # A metadata field missing or of the wrong type: the zip and JSON are sound, so the file
        # was written by something else or edited.
        raise CheckpointError(
            f"{path} has malformed metadata ({type(err).__name__}: {err}); nothing was loaded"
        ) from err
    finally:
        reader.close()


class _Kind:
    """Where arrays without a counterpart in ``like`` go: NumPy, or JAX on the default device."""

    def __init__(self, like: Any) -> None:
        self.jax = _arrays.is_jax(like)


def _convert(arr: np.ndarray, like: Any, where: str) -> Any:
    """``arr`` as an array of ``like``'s kind: a JAX array with ``like``'s sharding, or NumPy."""
    if isinstance(like, _Kind):
        if not like.jax:
            return arr
        out = jax.device_put(arr)
    elif _arrays.is_jax(like):
        # An uncommitted array (made without naming a device) may be moved by jit to meet the
        # others; a copy placed with its sharding would be committed and could clash with them.
        out = jax.device_put(arr, like.sharding) if like.committed else jax.device_put(arr)
    else:
        return arr
    if out.dtype != arr.dtype:
        raise CheckpointMismatchError(
            f"{where} is {arr.dtype} in the checkpoint, which JAX turns into {out.dtype} here "
            "(enable jax_enable_x64 for 64-bit arrays)"
        )
    return out


def _load_tree(
    reader: _Reader, record: Json, like: Any, where: str, kind: _Kind, strict: bool
) -> Any:
    """A tree of the state from its record: the structure of ``like`` (with its arrays' kinds
    and shardings) when it is the same, else rebuilt from the file, which ``strict`` forbids
    when there is a ``like`` (rule states must agree, hyper-parameters may have changed)."""
    desc, indices = record["tree"], record["arrays"]
    like_leaves: list[Any] | None = None
    treedef: Any
    if like is not _MISSING and _same(desc, _describe(like)):
        like_leaves, treedef = jax.tree_util.tree_flatten(like)
    else:
        try:
            treedef = _treedef(desc, where)
        except _OpaqueError as err:
            if like is _MISSING:
                raise _needs_like(err) from None
            raise CheckpointMismatchError(
                f"{reader.path}: {_first_difference(desc, _describe(like), where)}"
            ) from None
        if strict and like is not _MISSING:
            raise CheckpointMismatchError(
                f"{reader.path}: {_first_difference(desc, _describe(like), where)}"
            )
    if treedef.num_leaves != len(indices):
        raise CheckpointError(f"{reader.path}: {where} does not have its recorded leaves")
    flat, _ = jax.tree_util.tree_flatten_with_path(treedef.unflatten([0] * len(indices)))
    leaves = []
    for i, (index, (p, _)) in enumerate(zip(indices, flat, strict=True)):
        name = where + jax.tree_util.keystr(p)
        arr = reader.array(index, name)
        target: Any = kind
        if like_leaves is not None:
            target = like_leaves[i]
            if tuple(arr.shape) != tuple(target.shape) or arr.dtype != target.dtype:
                raise CheckpointMismatchError(
                    f"{reader.path}: {name} is {arr.dtype}{list(arr.shape)} in the file, "
                    f"{target.dtype}{list(target.shape)} in like"
                )
        leaves.append(_convert(arr, target, name))
    return treedef.unflatten(leaves)


class _Missing:
    pass


_MISSING: Any = _Missing()


def _split_like(like: Any) -> tuple[State | None, Any]:
    if like is None:
        return None, _MISSING
    if isinstance(like, State):
        return like, _MISSING
    if isinstance(like, tuple | list) and len(like) == 2 and isinstance(like[0], State):
        return like[0], like[1]
    raise TypeError(
        "like must be a State (e.g. optstate.setup(rule, model)) or a pair (state, model), "
        f"got {type(like).__name__}"
    )


def load(path: str | os.PathLike[str], like: Any = None) -> Any:
    """Read a checkpoint written by ``save``: a ``State``, or ``(state, model)`` if the file
    holds a model.

    ``like`` is what the checkpoint should fit: a ``State`` (say ``optstate.setup(rule, model)``
    for a freshly built model) or a pair ``(state, model)``. The file must be for the same model
    structure, ties, parameter shapes and dtypes and rules, or ``CheckpointMismatchError`` names the
    first path that differs. The loaded arrays take the kind of their counterparts in ``like``:
    JAX arrays with the same sharding (so loading onto a mesh is ``like`` built on that mesh), or
    NumPy arrays. What changed during training comes from the file: the moments, the step count,
    the hyper-parameters (also a schedule that ``adjust`` put in place of a number), frozen flags
    and rules split by ``adjust``. A model's leaves that are not arrays or plain values (functions,
    objects) come from ``like``'s model.

    The model comes back with its ties as ``setup`` saw them: one array object at every position
    of a parameter, re-wrapped in ``Transpose`` where there was one, and as a NumPy view of the
    one array where there was a view.

    Without ``like``, everything comes back as NumPy arrays, and the structures are rebuilt from
    the file: dicts, lists, tuples, ``None``, ``Transpose``, optstate's rules, rule states and
    schedules. A model or rule of another package (an Equinox module, your own rule class) cannot
    be rebuilt without pickle: the error asks for ``like``. Classes of other packages are never
    imported on a file's say-so.

    Every array is checked (shape, dtype, CRC-32) and everything is built before ``load``
    returns: an error never leaves a half-loaded state, and ``like`` is only read, never changed.

    Raises:
        CheckpointError: not a checkpoint, truncated or corrupted, a newer format version, or a
            structure only ``like`` can give. ``CheckpointMismatchError`` (a subclass): the file
            does not fit ``like``.
        FileNotFoundError: no such file.
        TypeError: ``like`` is neither a ``State`` nor a ``(state, model)`` pair.
    """
    path = os.fspath(path)
    like_state, like_model = _split_like(like)
    with _open(path) as reader:
        meta = reader.meta
        file_plan = meta["plan"]
        plan = _load_plan(reader, file_plan, like_state)
        kind = _Kind(like_state.step if like_state is not None else None)
        states = []
        for k, record in enumerate(meta["state"]["states"]):
            like_tree = like_state.states[k] if like_state is not None else _MISSING
            states.append(
                _load_tree(reader, record, like_tree, f"state.states[{k}]", kind, strict=True)
            )
        hyper = []
        for r, record in enumerate(meta["state"]["hyper"]):
            like_tree = _MISSING
            if like_state is not None:  # the like rule of this rule's first parameter
                first = plan.groups[r][0]
                like_tree = like_state.hyper[like_state.plan.param_rules[first]]
            hyper.append(
                _load_tree(reader, record, like_tree, f"state.hyper[{r}]", kind, strict=False)
            )
        step_like = like_state.step if like_state is not None else kind
        step = _convert(reader.array(meta["state"]["step"], "state.step"), step_like, "state.step")
        if len(states) != len(plan.params) or len(hyper) != len(plan.rules):
            raise CheckpointError(f"{path}: the state does not match its own tie plan")
        state = State(states, hyper, step, plan)
        if meta["model"] is None:
            return state
        model = _load_model(reader, meta["model"], plan, like_model, kind)
        return state, model


def _load_plan(reader: _Reader, file_plan: Json, like_state: State | None) -> Plan:
    slots, params = _slots(file_plan), _params(file_plan)
    param_rules = tuple(int(r) for r in file_plan["param_rules"])
    frozen = tuple(bool(f) for f in file_plan["frozen"])
    if like_state is None:
        try:
            treedef = _treedef(file_plan["tree"], "model", is_transpose)
            rules = tuple(_build_rule(r) for r in file_plan["rules"])
        except _OpaqueError as err:
            raise _needs_like(err) from None
        return Plan(treedef, slots, params, rules, param_rules, frozen)
    like_plan = like_state.plan
    _compare_plans(reader.path, file_plan, _plan_meta(like_plan))
    # Rules come from like (the same structures, checked above), grouped as in the file.
    first = {r: k for k, r in reversed(list(enumerate(param_rules)))}  # each rule's 1st param
    if sorted(first) != list(range(-1 if -1 in first else 0, len(file_plan["rules"]))):
        raise CheckpointError(f"{reader.path}: a rule without parameters in the tie plan")
    rules = tuple(
        like_plan.rules[like_plan.param_rules[first[r]]] for r in range(len(file_plan["rules"]))
    )
    # Parameters as in the file too: their positions, shapes and dtypes are like's (checked
    # above), but the position taken as each one's primary may differ (a view of the same layout
    # that ``update`` has since replaced by the array itself).
    saved = (params, rules, param_rules, frozen)
    if saved == (like_plan.params, like_plan.rules, like_plan.param_rules, like_plan.frozen):
        return like_plan
    return like_plan.replace(params=params, rules=rules, param_rules=param_rules, frozen=frozen)


def _load_model(reader: _Reader, record: Json, plan: Plan, like_model: Any, kind: _Kind) -> Any:
    names = reader.meta["plan"]["positions"]
    like_leaves: list[Any] | None = None
    if like_model is not _MISSING:
        like_leaves, like_def = flatten(like_model)
        _check_structure(plan, like_def, like_model)
    treedef = plan.treedef
    bases = []
    for p, index in zip(plan.params, record["params"], strict=True):
        where = names[p.primary]
        arr = reader.array(index, where)
        if tuple(arr.shape) != p.shape or arr.dtype != p.dtype:
            raise CheckpointError(f"{reader.path}: {where} does not match the tie plan")
        target: Any = kind
        if like_leaves is not None:
            target = unwrap(like_leaves[p.primary])[0]
            if not _arrays.is_trainable(target):
                raise CheckpointMismatchError(
                    f"{reader.path}: like's model holds {type(target).__name__} at {where}, "
                    "where like's state (and the file) have a parameter"
                )
            if tuple(target.shape) != p.shape or target.dtype != p.dtype:
                raise CheckpointMismatchError(
                    f"{reader.path}: like's model holds {target.dtype}{list(target.shape)} at "
                    f"{where}, but like's state (and the file) {p.dtype}{list(p.shape)}"
                )
        bases.append(_convert(arr, target, where))
    leaves: list[Any] = []
    for pos, entry in enumerate(record["leaves"]):
        like_leaf = like_leaves[pos] if like_leaves is not None else _MISSING
        leaves.append(_model_value(reader, entry, like_leaf, names[pos], kind))
    new_leaves = _place(plan, leaves, bases, changed=[True] * len(bases))
    model = treedef.unflatten(new_leaves)
    try:
        _check_model(plan, new_leaves, bases, model)
    except ValueError as err:
        raise CheckpointError(f"{reader.path}: the model does not fit its tie plan: {err}") from err
    return model


def _model_value(reader: _Reader, entry: Json, like_leaf: Any, where: str, kind: _Kind) -> Any:
    if entry is None:  # a parameter's position: placed from the parameter's one array
        return None
    if "value" in entry:
        return _dec(entry["value"])
    if "key" in entry:
        data = reader.array(entry["key"], where)
        target = like_leaf if _arrays.is_jax(like_leaf) and like_leaf.shape == data.shape else None
        keys = jax.random.wrap_key_data(jax.numpy.asarray(data), impl=entry["impl"])
        return keys if target is None else jax.device_put(keys, target.sharding)
    if "array" in entry:
        arr = reader.array(entry["array"], where)
        if entry.get("scalar"):
            return arr[()]
        same_shape = hasattr(like_leaf, "shape") and tuple(like_leaf.shape) == arr.shape
        return _convert(arr, like_leaf if same_shape else kind, where)
    if like_leaf is _MISSING:
        raise CheckpointError(
            f"{where} held a {entry['opaque']}, which a checkpoint does not store: load with "
            "like=(state, model) to take it from a freshly built model"
        )
    return like_leaf
