"""Ties that were probably meant: ``setup``'s warning about separate arrays holding one weight.

Identity is what makes a tie, so a weight that reaches the model as a copy (``W.T`` written in JAX,
where it is a new array; an embedding copied into the output layer) is trained as a separate
parameter, silently. ``setup`` looks for such copies among its parameters: two arrays of two axes
or more (the weights such mistakes copy) with equal values, up to a permutation of their axes.
Constant arrays (a scale of ones) are equal without being copies and never count. Vectors
(biases, scales) are not compared: they are often equal by their initialisation, and on a model
of thousands of small leaves reading them all would cost about as much as ``setup`` itself.

The search is cheap: only arrays of one dtype and the same axis lengths are compared, first by a
fingerprint that a permutation of the axes does not change (the sum of their bit patterns, as
32-bit words, wrapping), then in full.

Inside ``jax.jit`` values are unknown and every position is a fresh traced value: there ``setup``
can only tell that a tie was probably lost when a ``Transpose`` stands alone while another
parameter has its parent's shape.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _arrays
from ._errors import CopyWarning
from ._ties import TRACED_VIEWS, Param, Slot

__all__ = ["CopyWarning"]


# Arrays at most this large are read on the host (NumPy, torch CPU tensors, JAX arrays on the CPU,
# where reading costs no copy); larger JAX arrays on an accelerator are summarised where they live.
_HOST_ELEMENTS = 1 << 16
# Small arrays of one group are summarised together, stacked, rather than one by one.
_STACKED_ELEMENTS = 4096
# Permutations of the axes tried for arrays of at most this many axes; beyond, the identity and
# the full reversal only (as for NumPy views in ``_arrays``).
_MAX_PERMUTED_AXES = 4
# How many pairs the warning names.
_SHOWN = 3


def warn_copies(
    bases: Sequence[Any],
    params: Sequence[Param],
    slots: Sequence[Slot | None],
    paths: Callable[[], list[str]],
    stacklevel: int,
) -> None:
    """Issue one ``CopyWarning`` naming the copies among the parameters ``bases``, if any."""
    if TRACED_VIEWS.get() is not None:  # inside optstate.jit: the ties came through
        return
    if any(_arrays.is_tracer(b) for b in bases):
        message = _lost_tie(params, slots, paths)
    else:
        message = _copy_message(_copies(bases), params, slots, paths)
    if message is not None:
        warnings.warn(message, CopyWarning, stacklevel=stacklevel + 1)


# -- equal values ------------------------------------------------------------------------------

Pair = tuple[int, int, tuple[int, ...]]  # (parameter, later parameter, axes of the first to match)


def _copies(bases: Sequence[Any]) -> list[Pair]:
    """Pairs of parameters whose arrays are equal up to a permutation of axes, not constant."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, x in enumerate(bases):
        if _arrays.has_dtype(x) and len(x.shape) >= 2:
            groups.setdefault((x.dtype, tuple(sorted(x.shape))), []).append(k)
    pairs: list[Pair] = []
    for (_, lengths), members in groups.items():
        if len(members) < 2 or math.prod(lengths) < 2:
            continue
        readable = [k for k in members if _readable(bases[k])]
        buckets: dict[int, list[int]] = {}
        summaries = _summaries([bases[k] for k in readable], math.prod(lengths))
        for k, (constant, fingerprint) in zip(readable, summaries, strict=True):
            if not constant:
                buckets.setdefault(fingerprint, []).append(k)
        for bucket in buckets.values():
            pairs.extend(_equal_pairs([bases[k] for k in bucket], bucket))
    return sorted(pairs)


def _readable(x: Any) -> bool:
    """Its values can be read: not a tracer, not spread over other processes, a torch tensor
    only on the CPU."""
    if _arrays.is_jax(x):
        return not _arrays.is_tracer(x) and bool(x.is_fully_addressable)
    if _arrays.is_torch(x):
        return bool(x.device.type == "cpu")
    return True


def _on_host(x: Any, size: int) -> bool:
    """Read on the host rather than summarised where it lives."""
    if size <= _HOST_ELEMENTS or not _arrays.is_jax(x):
        return True
    return all(bool(d.platform == "cpu") for d in x.sharding.device_set)


def _host(x: Any) -> np.ndarray:
    if _arrays.is_torch(x):
        return np.asarray(x.detach().resolve_conj().resolve_neg().numpy())
    return np.asarray(x)


def _words(dtype: Any) -> Any:
    """The unsigned type whose sum over an array's bit patterns is its fingerprint."""
    size = np.dtype(dtype).itemsize
    return np.uint8 if size == 1 else np.uint16 if size == 2 else np.uint32


def _summaries(xs: list[Any], size: int) -> list[tuple[bool, int]]:
    """Per array (all of one dtype and ``size`` elements): whether all its elements are equal,
    and its fingerprint."""
    out: list[tuple[bool, int] | None] = [None] * len(xs)
    small = list(range(len(xs))) if size <= _STACKED_ELEMENTS else []
    if len(small) > 1:
        try:
            dtype = _host(xs[small[0]]).dtype
            data = b"".join([_bytes(xs[i]) for i in small])
            rows = np.frombuffer(data, dtype).reshape(len(small), -1)
        except (TypeError, ValueError, RuntimeError):  # a dtype NumPy cannot hold, say
            rows = None
        if rows is not None:
            constant = (rows == rows[:, :1]).all(axis=1)
            words = rows.view(_words(rows.dtype)).sum(axis=1, dtype=np.uint64) & 0xFFFFFFFF
            for i, c, f in zip(small, constant, words, strict=True):
                out[i] = (bool(c), int(f))
    for i, x in enumerate(xs):
        if out[i] is None:
            try:
                out[i] = _host_summary(_host(x)) if _on_host(x, size) else _device_summary(x)
            except (TypeError, RuntimeError):  # a torch dtype NumPy cannot hold: not compared
                out[i] = (True, 0)
    return [(True, 0) if s is None else s for s in out]


def _bytes(x: Any) -> Any:
    """The elements of an array read on the host, in C order, as a buffer. A JAX array on one
    CPU device exposes its memory directly: the cheapest read there is (a few microseconds less
    per array than ``np.asarray``, which counts on a model of thousands of small leaves)."""
    if _arrays.is_jax(x):
        with contextlib.suppress(BufferError, TypeError, ValueError):
            return memoryview(x).cast("B")
    return np.ascontiguousarray(_host(x)).reshape(-1).view(np.uint8).data


def _host_summary(x: np.ndarray) -> tuple[bool, int]:
    flat = np.ascontiguousarray(x).reshape(-1)
    words = flat.view(_words(flat.dtype)).sum(dtype=np.uint64) & 0xFFFFFFFF
    return bool((flat == flat[0]).all()), int(words)


def _device_summary(x: jax.Array) -> tuple[bool, int]:
    constant, fingerprint = _summarise_on_device(x)
    return bool(constant), int(fingerprint)


@jax.jit
def _summarise_on_device(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``_host_summary`` computed where ``x`` lives: the same fingerprint, modulo 2**32."""
    flat = x.reshape(-1)
    parts = [jnp.real(flat), jnp.imag(flat)] if jnp.iscomplexobj(flat) else [flat]
    total = jnp.zeros((), jnp.uint32)
    for part in parts:
        words = jax.lax.bitcast_convert_type(part, _words(part.dtype))
        total = total + jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)
    return jnp.all(flat == flat[0]), total


def _permutations(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The axis orders ``p`` with ``a[p] == b``, the identity first."""
    n = len(a)
    candidates: Any = (
        itertools.permutations(range(n))
        if n <= _MAX_PERMUTED_AXES
        else [tuple(range(n)), tuple(range(n))[::-1]]
    )
    return [p for p in candidates if tuple(a[i] for i in p) == b]


def _equal_pairs(xs: list[Any], ks: list[int]) -> list[Pair]:
    """Within one fingerprint: each array against the first array of every class of equal ones
    found so far (so ``n`` copies of one array cost ``n - 1`` comparisons)."""
    firsts: list[int] = []
    pairs: list[Pair] = []
    for j in range(len(xs)):
        for i in firsts:
            perm = _matching(xs[i], xs[j])
            if perm is not None:
                pairs.append((ks[i], ks[j], perm))
                break
        else:
            firsts.append(j)
    return pairs


def _matching(a: Any, b: Any) -> tuple[int, ...] | None:
    """An axis order ``p`` such that ``a.transpose(p)`` equals ``b``, if there is one."""
    size = math.prod(a.shape)
    host = _on_host(a, size) and _on_host(b, size)
    a_values: Any = _host(a) if host else jnp.asarray(a)
    b_values: Any = _host(b) if host else jnp.asarray(b)
    for perm in _permutations(tuple(a.shape), tuple(b.shape)):
        if host:
            if np.array_equal(a_values.transpose(perm), b_values):
                return perm
        elif bool(jnp.array_equal(jnp.transpose(a_values, perm), b_values)):
            return perm
    return None


def _copy_message(
    pairs: list[Pair],
    params: Sequence[Param],
    slots: Sequence[Slot | None],
    paths: Callable[[], list[str]],
) -> str | None:
    if not pairs:
        return None
    names = paths()

    def name(k: int) -> str:  # the array itself: through a Transpose at its position
        pos = params[k].primary
        return names[pos] + ".parent" * slots[pos].depth  # type: ignore[union-attr]

    lines = []
    for k, j, perm in pairs[:_SHOWN]:
        first, second = name(k), name(j)
        if perm == tuple(range(len(perm))):
            how = f"{second} holds the same values as {first}"
            fix = f"put the same array at both positions ({first})"
        else:
            seen = "transposed" if perm == tuple(range(len(perm)))[::-1] else f"with axes {perm}"
            how = f"{second} holds the values of {first} {seen}"
            fix = f"put optstate.Transpose({first}) at {second}"
        lines.append(f"{how}; for one weight, {fix}")
    more = f" (and {len(pairs) - _SHOWN} more pairs)" if len(pairs) > _SHOWN else ""
    return (
        "separate arrays with equal values are trained as separate parameters: "
        + "; ".join(lines)
        + f"{more}. A copy made on purpose is silenced with "
        "warnings.simplefilter('ignore', optstate.CopyWarning)."
    )


# -- inside jax.jit ----------------------------------------------------------------------------


def _lost_tie(
    params: Sequence[Param], slots: Sequence[Slot | None], paths: Callable[[], list[str]]
) -> str | None:
    """Inside a plain ``jax.jit`` every position is a fresh traced value: a ``Transpose`` alone
    with a parameter of its parent's shape beside it is most likely a tie that jit took apart."""
    by_layout: dict[tuple[Any, ...], list[int]] = {}
    for k, p in enumerate(params):
        by_layout.setdefault((p.shape, str(p.dtype)), []).append(k)
    for k, p in enumerate(params):
        if len(p.positions) != 1 or not slots[p.positions[0]].depth:  # type: ignore[union-attr]
            continue
        others = [j for j in by_layout[(p.shape, str(p.dtype))] if j != k]
        if others:
            names = paths()
            transposed, other = names[p.positions[0]], names[params[others[0]].primary]
            return (
                f"setup is running inside jax.jit, where ties cannot be seen (every position is "
                f"a separate traced value): {transposed} is a Transpose whose parent sits at no "
                f"other position, while {other} has the parent's shape and dtype. If they are one "
                "weight, call setup outside jax.jit, or compile the function with optstate.jit, "
                "which keeps ties across the jit boundary."
            )
    return None
