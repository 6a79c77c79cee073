"""The array backends: which leaves are trainable, their namespaces, memory layouts and writes.

Everything that depends on the kind of array (NumPy, JAX; PyTorch later) is here, so the walk and
the rules stay backend-free. Rules reach an array's functions through its array-API namespace.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any, Literal

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np

Perm = tuple[int, ...] | None  # an axis permutation; None is the identity

_MAX_PERMUTED_AXES = 4  # views with more axes are tied only as the same layout or a full reversal


def namespace(*xs: Any) -> Any:
    """The array-API namespace of ``xs`` (``numpy``, ``jax.numpy``, ...)."""
    return array_api_compat.array_namespace(*xs)


def is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def is_jax(x: Any) -> bool:
    return isinstance(x, jax.Array)


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_trainable(x: Any) -> bool:
    """A floating or complex array. Python numbers, NumPy scalars and integer arrays are not."""
    return (is_numpy(x) or is_jax(x)) and _inexact(x.dtype)


@functools.cache
def _inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


def is_complex(x: Any) -> bool:
    return _complex(x.dtype)


@functools.cache
def _complex(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def hyper_array(value: float, like: Any) -> Any:
    """A 0-d float array holding a hyper-parameter, in the namespace of the model's arrays."""
    if like is not None and is_jax(like):
        return jnp.asarray(value, dtype=jax.dtypes.canonicalize_dtype(jnp.float64))
    return np.asarray(value, dtype=np.float64)


def counter(like: Any) -> Any:
    """A 0-d int32 zero in the namespace of the model's arrays: the state's step count."""
    if like is not None and is_jax(like):
        return jnp.zeros((), dtype=jnp.int32)
    return np.zeros((), dtype=np.int32)


def as_array(x: Any, like: Any) -> Any:
    """NumPy turns 0-d results into scalars; keep them 0-d arrays so they stay trainable."""
    if is_numpy(like) and not isinstance(x, np.ndarray):
        return np.asarray(x)
    return x


def coerce(g: Any, like: Any) -> Any:
    """A gradient as an array of the parameter's namespace and dtype (a ``float64`` gradient of a
    ``float32`` parameter is rounded to ``float32``)."""
    if is_numpy(like):
        if isinstance(g, np.ndarray) and g.dtype == like.dtype:
            return g
        return np.asarray(g, dtype=like.dtype)
    if is_jax(g) and g.dtype == like.dtype:
        return g
    return jnp.asarray(g, dtype=like.dtype)


def reduced_zeros(param: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """Zeros of ``shape``: ``param``'s shape with some axes reduced to length 1 (a factored
    statistic), on ``param``'s devices. A sharded JAX parameter's layout is kept on the axes that
    remain and dropped on the reduced ones."""
    xp = namespace(param)
    if is_tracer(param):
        return xp.zeros(shape, dtype=dtype)
    if not is_jax(param):
        return xp.zeros(shape, dtype=dtype, device=array_api_compat.device(param))
    sharding = param.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
        kept = [a if n == m else None for a, n, m in zip(spec, shape, param.shape, strict=True)]
        spec_kept = jax.sharding.PartitionSpec(*kept)  # type: ignore[no-untyped-call]
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec_kept)
    elif len(sharding.device_set) > 1:
        sharding = None  # another kind of sharding: left to the first step, like a fresh array
    return jnp.zeros(shape, dtype=dtype, device=sharding)


def cast(x: Any, dtype: Any) -> Any:
    """``x`` as ``dtype``, without a copy when it already is."""
    return x if x.dtype == dtype else namespace(x).astype(x, dtype)


def permute(x: Any, perm: Perm) -> Any:
    return x if perm is None else x.transpose(perm)


def inverse(perm: Perm) -> Perm:
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def reverse(perm: Perm, ndim: int) -> Perm:
    """The orientation of ``permute(x, perm).T``."""
    axes = tuple(range(ndim)) if perm is None else perm
    out = axes[::-1]
    return None if out == tuple(range(ndim)) else out


# -- NumPy memory ----------------------------------------------------------------------------


def byte_bounds(x: np.ndarray) -> tuple[int, int]:
    return np.lib.array_utils.byte_bounds(x)


def shares_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.shares_memory(a, b))


def _axes(x: np.ndarray) -> list[tuple[int, int | None]]:
    # A length-1 axis may carry any stride: it never moves through memory.
    return [(n, s if n != 1 else None) for n, s in zip(x.shape, x.strides, strict=True)]


def view_permutation(root: np.ndarray, view: np.ndarray) -> Perm | Literal[False]:
    """How ``view`` sits on ``root``'s memory: ``None`` if it is the same layout, a permutation
    ``perm`` if ``view`` is ``root.transpose(perm)``, ``False`` otherwise."""
    if (
        view.dtype != root.dtype
        or view.ndim != root.ndim
        or view.__array_interface__["data"][0] != root.__array_interface__["data"][0]
    ):
        return False
    want = _axes(view)
    have = _axes(root)
    if want == have:
        return None
    ndim = root.ndim
    candidates: Sequence[tuple[int, ...]]
    if ndim <= _MAX_PERMUTED_AXES:
        candidates = list(itertools.permutations(range(ndim)))
    else:
        candidates = [tuple(range(ndim))[::-1]]
    for perm in candidates:
        if [have[i] for i in perm] == want:
            return perm
    return False


def same_view(base: Any, x: Any, perm: Perm) -> bool:
    """``x`` is the NumPy view ``base.transpose(perm)`` (or the same layout, for ``None``)."""
    return is_numpy(base) and is_numpy(x) and view_permutation(base, x) == perm


def writable(x: Any) -> bool:
    return is_numpy(x) and bool(x.flags.writeable)


def write_(dst: np.ndarray, src: Any) -> None:
    np.copyto(dst, src, casting="same_kind")
