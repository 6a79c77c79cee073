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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._arrays import Perm
from ._jit_boundary import (
    Signature,
    Static,
    dedupe,
    leaf_paths,
    pack,
    parameter_names,
    unique_specs,
)
from ._ties import TRACED_VIEWS

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
        donate_argnums: positions of arguments whose arrays the call may reuse for its outputs
            (as for ``jax.jit``); their arrays are deleted by the call, also where the same array
            is held by an argument not donated (it is one buffer).
        static_argnums: positions of arguments passed as they are (hashable values), as for
            ``jax.jit``.
        donate_argnames: ``donate_argnums`` by name.
        static_argnames: ``static_argnums`` by name.
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

    Examples:
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
        self._names = parameter_names(fun)
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
        codes, uniques, unique_donated = dedupe(
            leaves, leaf_donated, lambda: leaf_paths(trees, names)
        )
        statics = tuple((i, Static(args[i])) for i in sorted(static_nums)) + tuple(
            (k, Static(kwargs[k])) for k in sorted(kwargs) if k in self._static_names
        )
        signature = Signature(treedef, codes, statics, tuple(unique_donated), tuple(keywords), n)
        signature.check_hashable(lambda: leaf_paths(trees, names))

        specs: tuple[Any, ...] | None = None
        if self._in_shardings is not None:
            if keywords:
                raise ValueError(
                    "optstate.jit: in_shardings with keyword arguments is not supported (as for "
                    f"jax.jit); pass {', '.join(keywords)} by position"
                )
            specs = unique_specs(
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

    def _traced(self, signature: Signature, give: tuple[Any, ...], keep: tuple[Any, ...]) -> Any:
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
        return pack(out, self._out_shardings)
