"""``save``: everything checked, the metadata built, then the arrays written one by one into a
temporary archive that is renamed over the path."""

from __future__ import annotations

import json
import os
import sys
import zipfile
from typing import IO, Any

import jax
import numpy as np

from .. import _arrays, _models
from .._positions import check_model, check_structure
from .._state import Plan, State
from .._walk import flatten, path_strings, unwrap
from ._archive import atomic_write, meta_bound, write_array
from ._codec import FORMAT, META, VERSION, Json, record
from ._kinds import check_storable, numpy_dtype
from ._plan import plan_meta
from ._trees import describe
from ._values import encode


class _Entries:
    """The arrays to write, each under a readable member name (its tree path)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []
        self.names: set[str] = set()

    def add(self, where: str, x: Any) -> int:
        check_storable(x, where)
        member = where + ".npy"
        if member in self.names:  # two paths that print alike: never overwrite one with another
            member = f"{where}#{len(self.items)}.npy"
        self.names.add(member)
        self.items.append((member, x))
        return len(self.items) - 1

    def tree(self, tree: Any, where: str) -> Json:
        """The record of a tree of arrays: its structure and the indices of its arrays."""
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        return {
            "tree": describe(tree),
            "arrays": [self.add(where + jax.tree_util.keystr(p), x) for p, x in flat],
        }


def _model_leaf(x: Any, where: str, entries: _Entries) -> Json:
    """A position that is not a parameter: an array, a plain value, or something only ``like``
    can give back."""
    if _arrays.is_jax(x) and jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(x)
        return {"key": entries.add(where, data), "impl": str(jax.random.key_impl(x))}
    if isinstance(x, np.generic) and x.dtype.kind in "biufc":
        return {"array": entries.add(where, np.asarray(x)), "scalar": True}
    if _arrays.is_torch(x):  # a tensor a file cannot hold is refused, not left to like
        return {"array": entries.add(where, x)}
    if _arrays.has_dtype(x) and np.dtype(x.dtype).kind in "biufc":
        return {"array": entries.add(where, x)}
    if x is None or isinstance(x, bool | int | float | complex | str):
        return {"value": encode(x)}
    return {"opaque": type(x).__qualname__}


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


def _model_meta(plan: Plan, model: Any, entries: _Entries) -> Json:
    """The model's record, once it is checked against the plan: one array per parameter, and its
    other leaves."""
    model = _models.positions(model)  # a module as its named parameters
    leaves, treedef = flatten(model)
    check_structure(plan, treedef, model)
    bases = [unwrap(leaves[p.primary])[0] for p in plan.params]
    check_model(plan, leaves, bases, model)
    names = path_strings(model)
    return {
        "params": [entries.add(_param_path(plan, k, names), b) for k, b in enumerate(bases)],
        "leaves": [
            None if slot is not None else _model_leaf(leaf, names[pos], entries)
            for pos, (slot, leaf) in enumerate(zip(plan.slots, leaves, strict=True))
        ],
    }


def _check_meta_size(meta: Json, entries: _Entries) -> None:
    """Refuse a metadata member larger than ``load`` reads for this many arrays (a file that could
    not be read back). The records' CRC-32s are not known yet: they count at their widest."""
    widest = 2**32 - 1
    records = [
        record(member, tuple(x.shape), numpy_dtype(x.dtype), widest)  # type: ignore[arg-type]
        for member, x in entries.items
    ]
    size = len(json.dumps({**meta, "arrays": records}, allow_nan=False))
    members = [member for member, _ in entries.items]
    bound = meta_bound(members)
    if size > bound:
        raise ValueError(
            f"the checkpoint's metadata would take {size} bytes, more than load reads beside "
            f"{len(members)} arrays ({bound} bytes, a bound that keeps a file from elsewhere "
            "from exhausting memory). The model's leaves that are not arrays (numbers, strings) "
            "take most of it: keep them outside the model, or hold them in arrays"
        )


def _meta(state: State, model: Any, entries: _Entries) -> dict[str, Json]:
    """The metadata, without the array records (written with the arrays)."""
    plan = state.plan
    return {
        "format": FORMAT,
        "version": VERSION,
        "optstate": getattr(sys.modules.get("optstate"), "__version__", None),
        "plan": plan_meta(plan),
        "state": {
            "states": [entries.tree(s, f"state.states[{k}]") for k, s in enumerate(state.states)],
            "hyper": [
                [entries.tree(h, f"state.hyper[{r}][{v}]") for v, h in enumerate(variants)]
                for r, variants in enumerate(state.hyper)
            ],
            "clocks": [entries.tree(c, f"state.clocks[{r}]") for r, c in enumerate(state.clocks)],
            "step": entries.add("state.step", state.step),
        },
        "model": None if model is None else _model_meta(plan, model, entries),
    }


def save(path: str | os.PathLike[str], state: State, model: Any = None) -> None:
    """Write ``state`` (and ``model``) to the checkpoint file ``path``, atomically.

    The file is a NumPy ``.npz`` archive plus an ``optstate.json`` member (see
    ``optstate.checkpoint``); ``np.load(path, allow_pickle=False)`` opens it. Stored: every array
    of the state (rule states, hyper-parameters, step count) with its exact dtype (bfloat16 and
    other ml_dtypes as raw bits with the dtype's name, big-endian arrays with their byte order),
    the tie plan, the rule structures and frozen flags, and the model structure. With ``model``,
    one array per unique parameter (a tied weight once, whatever its number of positions), and
    the model's other leaves: arrays, plain Python values, JAX PRNG keys; leaves of any other
    kind (functions, objects) are recorded by type only and come back from ``like``.

    NumPy arrays, JAX arrays and torch tensors are stored alike. A torch ``nn.Module`` is saved
    as its named-parameter dict (``optstate.interop.torch.parameters``), as ``setup`` reads it:
    its buffers are not part of it.

    The file appears whole or not at all: it is written to a temporary file in the same
    directory, flushed to disk (``fsync``), renamed over ``path`` (``os.replace``), and the
    directory is flushed too. If anything fails, or the process is interrupted, the temporary
    file is removed and an existing ``path`` is untouched (after a hard crash a hidden
    ``.<name>.<random>.tmp`` file may be left behind; it is never read).

    Everything is checked before the file is opened: ``model`` must have the structure and ties
    ``state`` was set up for (call ``optstate.retie`` after your own jitted step), every array
    must be readable from this process (not deleted by donation, not spread over several
    processes: for multi-host arrays use orbax-checkpoint) and of a dtype the file can name, and
    the metadata must be no larger than ``load`` reads. Arrays are copied to the host one at a
    time while the file is written.

    Args:
        path: the file to write (``.npz`` by convention); an existing file is replaced whole.
        state: the ``State`` to save.
        model: the model ``state`` was set up for (``None``: the state alone).

    Examples:
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
        TypeError: ``state`` is not a ``State``; it holds something that is not an array, or an
            array of a kind or dtype a checkpoint cannot store (a sparse or meta tensor).
        StructureError, TieError, ValueError: ``model`` does not fit ``state`` (the message names
            the path), an array cannot be read (deleted, on several processes), the metadata
            would be larger than ``load`` reads, or a tree is nested deeper than Python's
            recursion limit.
        OSError: the directory does not exist or cannot be written.
    """
    path = os.fspath(path)
    if not isinstance(state, State):
        raise TypeError(f"save expects the State returned by optstate.setup, got {type(state)}")
    entries = _Entries()
    try:
        meta = _meta(state, model, entries)
        _check_meta_size(meta, entries)
    except RecursionError:
        raise ValueError(
            "the state or model is nested too deeply for a checkpoint: its metadata describes "
            f"structures level by level, up to Python's recursion limit "
            f"({sys.getrecursionlimit()})"
        ) from None

    def write(f: IO[bytes]) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            meta["arrays"] = [write_array(zf, member, x) for member, x in entries.items]
            zf.writestr(META, json.dumps(meta, allow_nan=False))

    atomic_write(path, write)
