"""The boundary of ``optstate.jit``: arguments in, each unique array once; results out, each
traced value once at all its positions.

Inputs: the arguments' leaves de-duplicated by identity (a NumPy view folded into the array it
permutes), and the static *signature* that rebuilds the arguments inside the trace. Outputs: a
result packed as its unique values and the plan that puts each back at all its positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from . import _arrays
from ._arrays import Perm
from ._ties import Groups, overlapping_pairs, root_rank

__all__ = [
    "Signature",
    "Static",
    "dedupe",
    "leaf_paths",
    "pack",
    "parameter_names",
    "unique_specs",
]


# -- inputs ----------------------------------------------------------------------------------------


def parameter_names(fun: Callable[..., Any]) -> tuple[str, ...] | None:
    """The names of ``fun``'s positional parameters, if Python can tell them."""
    try:
        parameters = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


def _is_array(x: Any) -> bool:
    """A leaf that is traced: a JAX or NumPy array, or a NumPy scalar."""
    return isinstance(x, jax.Array | np.ndarray | np.generic)


def dedupe(
    leaves: list[Any], donated: list[bool], paths: Callable[[], list[str]]
) -> tuple[tuple[Any, ...], list[Any], list[bool]]:
    """Per leaf a code (the index of its unique array, ``(index, perm)`` for a NumPy view, or the
    ``Static`` leaf itself), the unique arrays and whether each is donated."""
    objects: list[Any] = []
    index: dict[int, int] = {}
    codes: list[Any] = []
    object_donated: list[bool] = []
    for pos, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            if not isinstance(x, jax.core.Tracer) and x.is_deleted():
                raise ValueError(
                    f"optstate.jit: {paths()[pos]} is an array that was deleted, most likely "
                    "donated to an earlier call (donate_argnums); pass the arrays that call "
                    "returned instead"
                )
        elif isinstance(x, _NUMPY):
            if not (x.dtype == np.bool_ or _arrays.is_numeric(x.dtype)):
                raise TypeError(
                    f"optstate.jit: {paths()[pos]} is a NumPy array of dtype {x.dtype}, which "
                    "jax.jit cannot trace; keep it out of the arguments or mark its argument "
                    "static"
                )
        elif _arrays.is_torch(x):
            raise TypeError(
                f"optstate.jit: {paths()[pos]} is a torch tensor, which jax.jit cannot trace; "
                "train a torch model with optstate.update eagerly, or convert the tensor "
                "(jnp.asarray(t.detach().numpy()))"
            )
        else:
            codes.append(Static(x))
            continue
        k = index.setdefault(id(x), len(objects))
        if k == len(objects):
            objects.append(x)
            object_donated.append(donated[pos])
        elif donated[pos]:
            object_donated[k] = True
        codes.append(k)

    # A NumPy view of another array of the arguments enters as that array, permuted.
    root_of = _numpy_views(objects)
    if not root_of:
        return tuple(codes), objects, object_donated
    uniques: list[Any] = []
    unique_donated: list[bool] = []
    renumber: dict[int, int] = {}
    for k, x in enumerate(objects):
        if k not in root_of:
            renumber[k] = len(uniques)
            uniques.append(x)
            unique_donated.append(object_donated[k])
    for k, (root, _) in root_of.items():
        unique_donated[renumber[root]] |= object_donated[k]
    renumbered: list[Any] = []
    for code in codes:
        if not isinstance(code, int):
            renumbered.append(code)
        elif code in root_of:
            root, perm = root_of[code]
            renumbered.append((renumber[root], perm))
        else:
            renumbered.append(renumber[code])
    return tuple(renumbered), uniques, unique_donated


_NUMPY = (np.ndarray, np.generic)


def _numpy_views(objects: list[Any]) -> dict[int, tuple[int, Perm]]:
    """For each NumPy array that is an axis permutation of another one of ``objects`` (sharing its
    memory): the array it is folded into, chosen as ``setup`` chooses a view's base, and how it
    permutes it. Other overlaps (slices, reshapes) stay separate arrays: jax.jit copies them."""
    if not any(isinstance(x, np.ndarray) and x.base is not None for x in objects):
        return {}
    candidates = [k for k, x in enumerate(objects) if isinstance(x, np.ndarray)]
    arrays = [objects[k] for k in candidates]
    groups = Groups(len(arrays))
    for i, j in overlapping_pairs(arrays):
        if _arrays.view_permutation(arrays[i], arrays[j]) is not False:
            groups.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(arrays)):
        members.setdefault(groups.find(i), []).append(i)
    out: dict[int, tuple[int, Perm]] = {}
    for group in members.values():
        if len(group) < 2:
            continue
        root = min(group, key=lambda i: root_rank(arrays[i]))
        for i in group:
            perm = _arrays.view_permutation(arrays[root], arrays[i])
            if i != root and perm is not False:
                out[candidates[i]] = (candidates[root], perm)
    return out


def leaf_paths(trees: Sequence[Any], names: Sequence[str]) -> list[str]:
    """``model['dec'].parent``-style names of every leaf of the arguments, for messages."""
    out: list[str] = []
    for tree, name in zip(trees, names, strict=True):
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        out.extend(name + jax.tree_util.keystr(path) for path, _ in flat)
    return out


class Static:
    """A leaf passed as it is: hashed and compared by its type and value."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Static) or type(other.value) is not type(self.value):
            return False
        return self.value is other.value or bool(self.value == other.value)


class Signature:
    """The static part of a call: what the compiled function is cached on, besides the shapes,
    dtypes and shardings of the unique arrays."""

    __slots__ = ("_hash", "codes", "donated", "keywords", "n_args", "statics", "treedef")

    def __init__(
        self,
        treedef: Any,
        codes: tuple[Any, ...],
        statics: tuple[tuple[Any, Static], ...],
        donated: tuple[bool, ...],
        keywords: tuple[str, ...],
        n_args: int,
    ) -> None:
        self.treedef = treedef
        self.codes = codes
        self.statics = statics
        self.donated = donated
        self.keywords = keywords
        self.n_args = n_args
        self._hash: int | None = None

    def _key(self) -> tuple[Any, ...]:
        return (self.treedef, self.codes, self.statics, self.donated, self.keywords, self.n_args)

    def check_hashable(self, paths: Callable[[], list[str]]) -> None:
        """Hash now, and say which static value cannot be."""
        try:
            self._hash = hash(self._key())
            return
        except TypeError:
            pass
        for where, static in self.statics:
            _hash_or_raise(static.value, f"static argument {where!r}")
        for pos, code in enumerate(self.codes):
            if isinstance(code, Static):
                _hash_or_raise(code.value, f"{paths()[pos]} (a leaf that is not an array, static)")
        raise AssertionError("unreachable: every static value hashed")  # pragma: no cover

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._key())
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, Signature)
            and hash(self) == hash(other)
            and self._key() == other._key()
        )

    def arguments(self, trees: tuple[Any, ...]) -> tuple[list[Any], dict[str, Any]]:
        """The positional and keyword arguments, the static ones put back in their places."""
        static_args = {w: s.value for w, s in self.statics if isinstance(w, int)}
        static_kwargs = {w: s.value for w, s in self.statics if isinstance(w, str)}
        dynamic = iter(trees[: len(trees) - len(self.keywords)])
        args = [static_args[i] if i in static_args else next(dynamic) for i in range(self.n_args)]
        kwargs = dict(zip(self.keywords, trees[len(trees) - len(self.keywords) :], strict=True))
        return args, {**kwargs, **static_kwargs}


def _hash_or_raise(value: Any, what: str) -> None:
    try:
        hash((type(value), value))
    except TypeError as err:
        raise ValueError(
            f"optstate.jit: {what} is {value!r} of type {type(value).__name__}, which is not "
            f"hashable ({err}); a static value is part of what the compiled function is cached "
            "on: pass a hashable one (a tuple rather than a list) or an array"
        ) from None


def unique_specs(
    shardings: Any,
    trees: Any,
    codes: Sequence[Any],
    n_unique: int,
    what: str,
    names: Sequence[str] | None,
) -> tuple[Any, ...]:
    """One sharding per unique array from a sharding prefix of ``trees``; ``None`` where none is
    given."""
    per_leaf = _per_leaf(shardings, trees, what)
    specs: list[Any] = [_UNSET] * n_unique
    first: list[int] = [0] * n_unique
    for pos, (code, spec) in enumerate(zip(codes, per_leaf, strict=True)):
        if isinstance(code, Static):
            continue
        u = code if isinstance(code, int) else code[0]
        if specs[u] is _UNSET:
            specs[u], first[u] = spec, pos
        elif specs[u] != spec:
            paths = (
                leaf_paths(trees, names) if names is not None else leaf_paths([trees], ["result"])
            )
            raise ValueError(
                f"optstate.jit: {paths[first[u]]} and {paths[pos]} hold one array, but {what} "
                f"gives them different shardings: {specs[u]} and {spec}"
            )
    return tuple(None if s is _UNSET else s for s in specs)


_UNSET = object()


def _per_leaf(shardings: Any, tree: Any, what: str) -> list[Any]:
    """The sharding of every leaf of ``tree``, from a prefix of it (``None`` is a leaf there)."""
    specs, prefix_ = jax.tree_util.tree_flatten(shardings, is_leaf=lambda s: s is None)
    prefix: Any = prefix_
    try:
        subtrees = prefix.flatten_up_to(tree)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"optstate.jit: {what} must be a prefix of the structure it describes ({err})"
        ) from None
    return [
        s for s, sub in zip(specs, subtrees, strict=True) for _ in jax.tree_util.tree_leaves(sub)
    ]


# -- outputs ---------------------------------------------------------------------------------------


class _OutPlan:
    """How a result is rebuilt from its unique arrays: its structure and, per leaf, the index of
    its array or the ``Static`` leaf. Compared by identity: ``jax.jit`` keeps it with its trace."""

    __slots__ = ("codes", "treedef")

    def __init__(self, treedef: Any, codes: tuple[Any, ...]) -> None:
        self.treedef = treedef
        self.codes = codes


@jax.tree_util.register_pytree_node_class
class _Packed:
    """The unique arrays of a result, with its ``_OutPlan`` as static structure."""

    __slots__ = ("plan", "values")

    def __init__(self, plan: _OutPlan, values: Sequence[Any]) -> None:
        self.plan = plan
        self.values = tuple(values)

    def tree_flatten(self) -> tuple[tuple[Any, ...], _OutPlan]:
        return self.values, self.plan

    @classmethod
    def tree_unflatten(cls, plan: _OutPlan, values: Sequence[Any]) -> _Packed:
        return cls(plan, values)

    def unpack(self) -> Any:
        """The result, the same array object at every leaf of one traced value."""
        values = self.values
        leaves = [values[c] if isinstance(c, int) else c.value for c in self.plan.codes]
        return self.plan.treedef.unflatten(leaves)


def pack(out: Any, out_shardings: Any) -> _Packed:
    """``out`` as its unique arrays and the plan to rebuild it (inside the trace)."""
    leaves, treedef = jax.tree_util.tree_flatten(out)
    index: dict[int, int] = {}
    values: list[Any] = []
    codes: list[Any] = []
    for x in leaves:
        if not _is_array(x):
            codes.append(Static(x))
            continue
        u = index.get(id(x))
        if u is None:
            u = index[id(x)] = len(values)
            values.append(x)
        codes.append(u)
    if out_shardings is not None:
        specs = unique_specs(out_shardings, out, codes, len(values), "out_shardings", None)
        values = [
            v if s is None else jax.lax.with_sharding_constraint(v, s)  # type: ignore[no-untyped-call]
            for v, s in zip(values, specs, strict=True)
        ]
    return _Packed(_OutPlan(treedef, tuple(codes)), values)
