"""``optstate.jit``: ``jax.jit`` for functions over models with ties.

``jax.jit`` gives every leaf of its arguments its own traced value and every output leaf its own
array. On a tied model that undoes the tie at both ends: inside, ``setup`` sees separate
parameters; a tied weight cannot be donated (one buffer, donated twice); and the model that comes
back holds one copy of the weight per position. ``optstate.jit`` puts the arrays of the arguments
through ``jax.jit`` once each and rebuilds the arguments inside, every position of one array
holding the same traced value; on the way out, a traced value at several positions comes back as
one array at all of them.

How: the arguments are flattened and their arrays de-duplicated by identity (a NumPy view is
folded into the array it permutes). The unique arrays enter a ``jax.jit``-ed function as two
tuples, donated and kept, beside a static *signature*: the arguments' structure, which unique array
sits at each leaf (under which permutation, for a view), and the leaves that are not arrays. The
result leaves the same way, its structure and the unique value behind each leaf carried in the
tree structure of what the jitted function returns, so that ``jax.jit``'s own cache keeps each
trace's output plan with its executable.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _arrays
from ._arrays import Perm
from ._ties import TRACED_VIEWS, _Groups, _overlapping_pairs, _root_rank

__all__ = ["jit"]


def jit(
    fun: Callable[..., Any],
    *,
    donate_argnums: int | Sequence[int] = (),
    static_argnums: int | Sequence[int] = (),
    donate_argnames: str | Iterable[str] | None = None,
    static_argnames: str | Iterable[str] | None = None,
    **options: Any,
) -> Callable[..., Any]:
    """``jax.jit`` for functions over models with tied weights: each array enters once, and a
    tie comes back as one array.

    Every array found at several positions of the arguments (the same object, the parent of a
    ``Transpose``, a NumPy view such as ``W.T`` and its array; in one argument or across several)
    is passed to the compiled function once. Inside, every position of it holds the same traced
    value (``Transpose(value)`` where there was a ``Transpose``), so ``jax.grad`` gives one partial
    gradient per position, ``setup`` finds the ties and ``update`` sums them, exactly as eagerly.
    A traced value returned at several positions (what ``update`` returns for a tied weight) comes
    back as one array at all of them: after a jitted step the tie is one object, as after an eager
    one. Each unique array is donated at most once, so ``donate_argnums=(0, 1)`` over
    ``(state, model)`` works on a tied model and keeps one buffer per weight.

    As with ``equinox.filter_jit``, the arrays of the arguments (JAX and NumPy arrays, NumPy
    scalars) are traced and every other leaf (Python numbers and booleans, functions, strings) is
    static: part of what the compiled function is cached on, so it must be hashable. Outputs follow
    the same rule. The function is traced once per structure of its arguments, shapes and dtypes
    of their arrays and values of their static leaves; later calls run the cached executable.

    NumPy views reach the function as the permuted traced value of their array (JAX has no
    views); they come back as arrays of their own, which ``optstate.retie`` turns into views again.
    Inside a ``jax.lax.scan`` every carried leaf is a separate value: call
    ``optstate.retie(state, model)`` on what the scan returns to hand back one array per tie.

    Args:
        fun: the function to compile.
        donate_argnums, donate_argnames: arguments whose arrays the call may reuse for its
            outputs (as for ``jax.jit``); their arrays are deleted by the call, also where the
            same array is held by an argument not donated (it is one buffer).
        static_argnums, static_argnames: arguments passed as they are (hashable values), as for
            ``jax.jit``.
        **options: passed to ``jax.jit`` (``in_shardings``, ``out_shardings``, ``device``,
            ``backend``, ``keep_unused``, ``compiler_options``, ...). ``in_shardings`` is a prefix
            of the positional arguments that are not static, ``out_shardings`` of the result, as
            for ``jax.jit``; the positions of one array must be given one sharding.

    Returns:
        The compiled function, called like ``fun``.

    Raises:
        ValueError: at a call: a static argument or leaf that is not hashable; an array that an
            earlier call deleted (it was donated); ``in_shardings`` with keyword arguments, or
            shardings that do not fit the arguments or differ between the positions of an array.
        TypeError: at a call: a leaf that ``jax.jit`` cannot trace, such as a torch tensor or a
            NumPy array of strings.

    Example:
        >>> import jax, jax.numpy as jnp, optstate as ost
        >>> w = jnp.ones((3, 2))
        >>> model = {"enc": w, "dec": ost.Transpose(w)}
        >>> def step(state, model, x):
        ...     grads = jax.grad(lambda m: jnp.sum((x @ m["enc"] @ m["dec"]) ** 2))(model)
        ...     return ost.update(state, model, grads)
        >>> state = ost.setup(ost.Adam(1e-2), model)
        >>> state, model = ost.jit(step, donate_argnums=(0, 1))(state, model, jnp.ones((4, 3)))
        >>> model["dec"].parent is model["enc"], w.is_deleted()
        (True, True)
    """
    return _Jit(fun, donate_argnums, static_argnums, donate_argnames, static_argnames, options)


class _Jit:
    """What ``jit`` returns."""

    def __init__(
        self,
        fun: Callable[..., Any],
        donate_argnums: int | Sequence[int],
        static_argnums: int | Sequence[int],
        donate_argnames: str | Iterable[str] | None,
        static_argnames: str | Iterable[str] | None,
        options: dict[str, Any],
    ) -> None:
        if not callable(fun):
            raise TypeError(f"optstate.jit expects a function, got {type(fun).__name__}")
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._names = _parameter_names(fun)
        self._static_nums, self._static_names = self._argnums_and_names(
            static_argnums, static_argnames
        )
        self._donate_nums, self._donate_names = self._argnums_and_names(
            donate_argnums, donate_argnames
        )
        self._in_shardings = options.pop("in_shardings", None)
        self._out_shardings = options.pop("out_shardings", None)
        self._options = options
        self._compiled: dict[Any, Callable[..., Any]] = {}

    def _argnums_and_names(
        self, nums: int | Sequence[int], names: str | Iterable[str] | None
    ) -> tuple[tuple[int, ...], frozenset[str]]:
        """As ``jax.jit``: numbers alone also name the parameters at those positions; names alone
        also number them."""
        numbers = (nums,) if isinstance(nums, int) else tuple(nums)
        named = frozenset((names,) if isinstance(names, str) else names or ())
        positional = self._names or ()
        if names is None:
            named = frozenset(
                positional[i] for i in numbers if -len(positional) <= i < len(positional)
            )
        elif not numbers:
            numbers = tuple(i for i, name in enumerate(positional) if name in named)
        return numbers, named

    # -- the call --------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        n = len(args)
        static_nums = {i % n for i in self._static_nums if -n <= i < n}
        donate_nums = {i % n for i in self._donate_nums if -n <= i < n}
        dynamic = [i for i in range(n) if i not in static_nums]
        keywords = sorted(k for k in kwargs if k not in self._static_names)
        trees = [args[i] for i in dynamic] + [kwargs[k] for k in keywords]
        names = [self._arg_name(i) for i in dynamic] + keywords
        donated = [i in donate_nums for i in dynamic] + [k in self._donate_names for k in keywords]

        leaves, treedef_ = jax.tree_util.tree_flatten(tuple(trees))
        treedef: Any = treedef_
        counts = [d.num_leaves for d in treedef.children()]
        leaf_donated = [d for d, c in zip(donated, counts, strict=True) for _ in range(c)]
        codes, uniques, unique_donated = _dedupe(leaves, leaf_donated, lambda: _paths(trees, names))
        statics = tuple((i, _Static(args[i])) for i in sorted(static_nums)) + tuple(
            (k, _Static(kwargs[k])) for k in sorted(kwargs) if k in self._static_names
        )
        signature = _Signature(treedef, codes, statics, tuple(unique_donated), tuple(keywords), n)
        signature.check_hashable(lambda: _paths(trees, names))

        specs: tuple[Any, ...] | None = None
        if self._in_shardings is not None:
            if keywords:
                raise ValueError(
                    "optstate.jit: in_shardings with keyword arguments is not supported (as for "
                    f"jax.jit); pass {', '.join(keywords)} by position"
                )
            specs = _unique_specs(
                self._in_shardings, tuple(trees), codes, len(uniques), "in_shardings", names
            )
        give = tuple(x for x, d in zip(uniques, unique_donated, strict=True) if d)
        keep = tuple(x for x, d in zip(uniques, unique_donated, strict=True) if not d)
        packed = self._compiled_for(specs, unique_donated)(signature, give, keep)
        return packed.unpack()

    def _arg_name(self, i: int) -> str:
        if self._names is not None and i < len(self._names):
            return self._names[i]
        return f"args[{i}]"

    def _compiled_for(
        self, specs: tuple[Any, ...] | None, unique_donated: list[bool]
    ) -> Callable[..., Any]:
        """The ``jax.jit`` of ``_traced`` for these per-array input shardings."""
        key = None
        shardings: dict[str, Any] = {}
        if specs is not None:
            give = tuple(s for s, d in zip(specs, unique_donated, strict=True) if d)
            keep = tuple(s for s, d in zip(specs, unique_donated, strict=True) if not d)
            key = (give, keep)
            shardings["in_shardings"] = key
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = jax.jit(
                self._traced,
                static_argnums=0,
                donate_argnums=1,
                **shardings,
                **self._options,
            )
        return compiled

    # -- inside the trace -------------------------------------------------------------------------

    def _traced(self, signature: _Signature, give: tuple[Any, ...], keep: tuple[Any, ...]) -> Any:
        """``fun`` on the arguments rebuilt from the unique traced values, its result packed."""
        given, kept = iter(give), iter(keep)
        uniques = [next(given) if d else next(kept) for d in signature.donated]
        views: dict[tuple[int, Perm], Any] = {}
        traced_views: dict[int, tuple[Any, Any, Perm]] = {}
        leaves = []
        for code in signature.codes:
            if isinstance(code, int):
                leaves.append(uniques[code])
            elif isinstance(code, tuple):  # a NumPy view: the array's value, permuted
                u, perm = code
                view = views.get(code)
                if view is None:
                    view = views[code] = jnp.transpose(uniques[u], perm)
                    traced_views[id(view)] = (view, uniques[u], perm)
                leaves.append(view)
            else:
                leaves.append(code.value)
        trees = signature.treedef.unflatten(leaves)
        args, kwargs = signature.arguments(trees)
        token = TRACED_VIEWS.set(traced_views)
        try:
            out = self._fun(*args, **kwargs)
        finally:
            TRACED_VIEWS.reset(token)
        return _pack(out, self._out_shardings)


# -- inputs ----------------------------------------------------------------------------------------


def _parameter_names(fun: Callable[..., Any]) -> tuple[str, ...] | None:
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


def _dedupe(
    leaves: list[Any], donated: list[bool], paths: Callable[[], list[str]]
) -> tuple[tuple[Any, ...], list[Any], list[bool]]:
    """Per leaf a code (the index of its unique array, ``(index, perm)`` for a NumPy view, or the
    ``_Static`` leaf itself), the unique arrays and whether each is donated."""
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
            codes.append(_Static(x))
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
    groups = _Groups(len(arrays))
    for i, j in _overlapping_pairs(arrays):
        if _arrays.view_permutation(arrays[i], arrays[j]) is not False:
            groups.union(i, j)
    members: dict[int, list[int]] = {}
    for i in range(len(arrays)):
        members.setdefault(groups.find(i), []).append(i)
    out: dict[int, tuple[int, Perm]] = {}
    for group in members.values():
        if len(group) < 2:
            continue
        root = min(group, key=lambda i: _root_rank(arrays[i]))
        for i in group:
            perm = _arrays.view_permutation(arrays[root], arrays[i])
            if i != root and perm is not False:
                out[candidates[i]] = (candidates[root], perm)
    return out


def _paths(trees: Sequence[Any], names: Sequence[str]) -> list[str]:
    """``model['dec'].parent``-style names of every leaf of the arguments, for messages."""
    out: list[str] = []
    for tree, name in zip(trees, names, strict=True):
        flat, _ = jax.tree_util.tree_flatten_with_path(tree)
        out.extend(name + jax.tree_util.keystr(path) for path, _ in flat)
    return out


class _Static:
    """A leaf passed as it is: hashed and compared by its type and value."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return hash((type(self.value), self.value))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Static) or type(other.value) is not type(self.value):
            return False
        return self.value is other.value or bool(self.value == other.value)


class _Signature:
    """The static part of a call: what the compiled function is cached on, besides the shapes,
    dtypes and shardings of the unique arrays."""

    __slots__ = ("_hash", "codes", "donated", "keywords", "n_args", "statics", "treedef")

    def __init__(
        self,
        treedef: Any,
        codes: tuple[Any, ...],
        statics: tuple[tuple[Any, _Static], ...],
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
            if isinstance(code, _Static):
                _hash_or_raise(code.value, f"{paths()[pos]} (a leaf that is not an array, static)")
        raise AssertionError("unreachable: every static value hashed")  # pragma: no cover

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(self._key())
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Signature)
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


def _unique_specs(
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
        if isinstance(code, _Static):
            continue
        u = code if isinstance(code, int) else code[0]
        if specs[u] is _UNSET:
            specs[u], first[u] = spec, pos
        elif specs[u] != spec:
            paths = _paths(trees, names) if names is not None else _paths([trees], ["result"])
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
    its array or the ``_Static`` leaf. Compared by identity: ``jax.jit`` keeps it with its trace."""

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


def _pack(out: Any, out_shardings: Any) -> _Packed:
    """``out`` as its unique arrays and the plan to rebuild it (inside the trace)."""
    leaves, treedef = jax.tree_util.tree_flatten(out)
    index: dict[int, int] = {}
    values: list[Any] = []
    codes: list[Any] = []
    for x in leaves:
        if not _is_array(x):
            codes.append(_Static(x))
            continue
        u = index.get(id(x))
        if u is None:
            u = index[id(x)] = len(values)
            values.append(x)
        codes.append(u)
    if out_shardings is not None:
        specs = _unique_specs(out_shardings, out, codes, len(values), "out_shardings", None)
        values = [
            v if s is None else jax.lax.with_sharding_constraint(v, s)  # type: ignore[no-untyped-call]
            for v, s in zip(values, specs, strict=True)
        ]
    return _Packed(_OutPlan(treedef, tuple(codes)), values)
