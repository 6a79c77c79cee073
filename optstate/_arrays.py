"""The array backends: which leaves are trainable, their namespaces, memory layouts and writes.

Everything that depends on the kind of array (NumPy, JAX, PyTorch) is here, so the walk and the
rules stay backend-free. Rules reach an array's functions through its array-API namespace. PyTorch
is optional: it is never imported here, only recognised once the program has imported it.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Sequence
from typing import Any, Literal

import array_api_compat
import jax
import jax.numpy as jnp
import numpy as np

Perm = tuple[int, ...] | None  # an axis permutation; None is the identity


def namespace(*xs: Any) -> Any:
    """The array-API namespace of ``xs`` (``numpy``, ``jax.numpy``, ...)."""
    return array_api_compat.array_namespace(*xs)


def is_numpy(x: Any) -> bool:
    return isinstance(x, np.ndarray)


def is_jax(x: Any) -> bool:
    return isinstance(x, jax.Array)


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def is_torch(x: Any) -> bool:
    """A ``torch.Tensor`` (``nn.Parameter`` included); false whenever torch was never imported."""
    tensor = _TENSOR[0]
    if tensor is None:
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "Tensor"):  # (or torch is still being imported)
            return False
        tensor = _TENSOR[0] = torch.Tensor
    return isinstance(x, tensor)


_TENSOR: list[Any] = [None]  # torch.Tensor, once torch has been imported


def is_trainable(x: Any) -> bool:
    """A floating or complex array. Python numbers, NumPy scalars and integer arrays are not."""
    if is_jax(x) or is_numpy(x):
        return _inexact(x.dtype)
    return is_torch(x) and bool(x.is_floating_point() or x.is_complex())


@functools.cache
def _inexact(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.inexact))


@functools.cache
def is_numeric(dtype: Any) -> bool:
    """Integer, floating or complex: what a gradient may hold (not booleans, strings, objects or
    JAX's ``float0``)."""
    if type(dtype).__module__ == "torch":
        integer = str(dtype).startswith(("torch.int", "torch.uint"))
        return bool(dtype.is_floating_point or dtype.is_complex or integer)
    return bool(jnp.issubdtype(dtype, jnp.number))


def has_dtype(x: Any) -> bool:
    """A NumPy, JAX or torch array (not a list, a number or another object)."""
    return is_numpy(x) or is_jax(x) or is_torch(x)


def unusable(x: Any) -> str | None:
    """Why the array ``x`` cannot be trained as a parameter, or ``None`` if it can: what
    ``setup`` and ``update`` refuse with that reason, naming the position."""
    if isinstance(x, np.matrix):
        return (
            "an np.matrix, whose * is a matrix product (a rule's g * g would be g @ g); pass "
            "np.asarray(x), a plain ndarray over the same memory"
        )
    if is_torch(x) and x.is_meta:
        return (
            f"on the meta device ({x.dtype}{list(x.shape)}): a tensor with a shape but no "
            "values to read or write; move the model to a real device (module.to_empty(device=...) "
            "and initialise it) before setup"
        )
    return None


def is_torch_module(x: Any) -> bool:
    """A ``torch.nn.Module``; false whenever torch was never imported."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Module)


def detached(x: Any) -> Any:
    """A torch tensor outside autograd (same memory); anything else as it is."""
    return x.detach() if is_torch(x) else x


def is_complex(x: Any) -> bool:
    return bool(x.is_complex()) if is_torch(x) else _complex(x.dtype)


@functools.cache
def _complex(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.complexfloating))


def hyper_array(value: float, like: Any) -> Any:
    """A 0-d float array holding a hyper-parameter, in the namespace of the model's arrays."""
    if like is not None and is_jax(like):
        return jnp.asarray(value, dtype=jax.dtypes.canonicalize_dtype(jnp.float64))
    if is_torch(like):  # on the CPU: a 0-d CPU tensor combines with tensors on any device
        return sys.modules["torch"].tensor(value, dtype=sys.modules["torch"].float64)
    return np.asarray(value, dtype=np.float64)


def count_array(value: int, like: Any) -> Any:
    """A 0-d int32 array holding a step count of a schedule, in the namespace of ``like``."""
    if like is not None and is_jax(like):
        return jnp.asarray(value, dtype=jnp.int32)
    if is_torch(like):
        return sys.modules["torch"].tensor(value, dtype=sys.modules["torch"].int32)
    return np.asarray(value, dtype=np.int32)


def counter(like: Any) -> Any:
    """A 0-d int32 zero in the namespace of the model's arrays: the state's step count."""
    if like is not None and is_jax(like):
        return _beside(jnp.zeros((), dtype=jnp.int32), like)
    if is_torch(like):
        return sys.modules["torch"].zeros((), dtype=sys.modules["torch"].int32)
    return np.zeros((), dtype=np.int32)


def _beside(x: Any, like: Any) -> Any:
    """``x`` replicated on the devices ``like`` is committed to. A compiled step returns the count
    committed there; a count that was not committed before would make the second step compile
    again."""
    if is_tracer(like) or not like.committed:
        return x
    return _put(x, like, same_shape=False)


def _put(x: Any, like: Any, *, same_shape: bool) -> Any:
    """``x`` committed where ``like`` lives: with its sharding, or replicated on its devices."""
    sharding = like.sharding
    if same_shape:
        return jax.device_put(x, sharding)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec()  # type: ignore[no-untyped-call]
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    elif not isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return x
    return jax.device_put(x, sharding)


def unsettled(x: Any, committed: bool) -> bool:
    """``x`` is weakly typed, or not committed to a device while other inputs are."""
    return bool(getattr(x, "weak_type", False) or (committed and not getattr(x, "committed", 1)))


def settled(x: Any, like: Any, committed: bool) -> Any:
    """``x`` strongly typed, and, if ``committed``, committed where its parameter ``like`` lives
    (a compiled step with any committed input returns committed outputs, and an input that was
    not committed on the first step would make the second compile again): with ``like``'s
    sharding if it has ``like``'s shape, replicated on its devices otherwise."""
    x = strong(x)
    if not committed or not is_jax(x) or x.committed:
        return x
    return _put(x, like, same_shape=tuple(x.shape) == tuple(like.shape))


def strong(x: Any) -> Any:
    """A weakly typed JAX array (``jnp.asarray(1.0)``) as an ordinary one of its dtype. A compiled
    step never returns weak types, so weak inputs would make the second step compile again."""
    return jnp.asarray(x, dtype=x.dtype) if getattr(x, "weak_type", False) else x


def as_array(x: Any, like: Any) -> Any:
    """NumPy turns 0-d results into scalars; keep them 0-d arrays so they stay trainable. A new
    torch tensor requires a gradient if ``like`` did: a new leaf object over ``x``'s memory, so
    that a tensor a rule also keeps in its state does not start requiring one."""
    if is_numpy(like) and not isinstance(x, np.ndarray):
        return np.asarray(x)
    if is_torch(like) and like.requires_grad and not x.requires_grad:
        return x.detach().requires_grad_()
    return x


def coerce(g: Any, like: Any) -> Any:
    """A gradient as an array of the parameter's namespace and dtype (a ``float64`` gradient of a
    ``float32`` parameter is rounded to ``float32``)."""
    if is_torch(like):  # on the parameter's device too
        if (
            is_torch(g)
            and g.dtype == like.dtype
            and ((g.is_cpu and like.is_cpu) or g.device == like.device)
        ):
            return g
        g = g if is_torch(g) else np.asarray(g)
        return sys.modules["torch"].as_tensor(g, dtype=like.dtype, device=like.device)
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
    if perm is None:
        return x
    return x.permute(perm) if is_torch(x) else x.transpose(perm)


def inverse(perm: Perm) -> Perm:
    return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def reverse(perm: Perm, ndim: int) -> Perm:
    """The orientation of ``permute(x, perm).T``."""
    axes = tuple(range(ndim)) if perm is None else perm
    out = axes[::-1]
    return None if out == tuple(range(ndim)) else out


# -- memory: NumPy arrays and torch tensors ---------------------------------------------------
# Both describe their memory alike: a start address, a shape and strides (torch counts strides in
# elements; here they are in bytes, as NumPy's), so one piece of logic finds the views of either.
# Only these two kinds have memory that several leaves can share; JAX arrays never do.


def has_layout(x: Any) -> bool:
    """A NumPy array or a torch tensor: its memory layout can be read."""
    return is_numpy(x) or is_torch(x)


def has_memory(x: Any) -> bool:
    """``has_layout``, with at least one element (an empty array overlaps nothing)."""
    if is_numpy(x):
        return bool(x.size > 0)
    return is_torch(x) and bool(x.numel() > 0)


def memory_space(x: Any) -> str:
    """The address space of ``x``'s memory: NumPy arrays and CPU tensors share one."""
    return "cpu" if is_numpy(x) else str(x.device)


def strides(x: Any) -> tuple[int, ...]:
    """The strides in bytes."""
    if is_torch(x):
        size = x.element_size()
        return tuple(s * size for s in x.stride())
    return tuple(x.strides)


def _start(x: Any) -> int:
    return int(x.data_ptr()) if is_torch(x) else int(x.__array_interface__["data"][0])


def _reading(x: Any) -> tuple[bool, ...]:
    """How a torch tensor reads its memory beyond the layout: its lazy conjugate and negation
    bits (``W.conj()`` shares ``W``'s memory but is not ``W``)."""
    return (bool(x.is_conj()), bool(x.is_neg())) if is_torch(x) else ()


def byte_bounds(x: Any) -> tuple[int, int]:
    if is_numpy(x):
        return np.lib.array_utils.byte_bounds(x)
    start = _start(x)  # torch strides are never negative
    extent = sum((n - 1) * s for n, s in zip(x.shape, strides(x), strict=True))
    return start, start + extent + int(x.element_size())


class _Memory:
    """The NumPy array interface of a tensor's memory, to compute overlaps (never to read it)."""

    def __init__(self, x: Any) -> None:
        self.__array_interface__ = {
            "shape": tuple(x.shape),
            "strides": strides(x),
            "typestr": f"|V{x.element_size()}",
            "data": (_start(x), True),
            "version": 3,
        }


def shares_memory(a: Any, b: Any) -> bool:
    """``a`` and ``b`` have an element in common (exactly, not by byte ranges alone)."""
    if memory_space(a) != memory_space(b):
        return False
    raw_a, raw_b = (x if is_numpy(x) else np.asarray(_Memory(x)) for x in (a, b))
    return bool(np.shares_memory(raw_a, raw_b))


def is_view(x: Any) -> bool:
    """A NumPy array or torch tensor that looks into another one's memory."""
    if is_numpy(x):
        return x.base is not None
    return is_torch(x) and x._base is not None


def is_contiguous(x: Any) -> bool:
    return bool(x.is_contiguous()) if is_torch(x) else bool(x.flags.c_contiguous)


def _axes(x: Any) -> list[tuple[int, int | None]]:
    # A length-1 axis may carry any stride: it never moves through memory.
    return [(n, s if n != 1 else None) for n, s in zip(x.shape, strides(x), strict=True)]


def view_permutation(root: Any, view: Any) -> Perm | Literal[False]:
    """How ``view`` sits on ``root``'s memory (both NumPy arrays, or both torch tensors):
    ``None`` if it is the same layout, a permutation ``perm`` if ``view`` is
    ``root.transpose(perm)`` (torch: ``root.permute(perm)``), ``False`` otherwise."""
    if (
        is_torch(view) != is_torch(root)
        or view.dtype != root.dtype
        or view.ndim != root.ndim
        or memory_space(view) != memory_space(root)
        or _start(view) != _start(root)
        or _reading(view) != _reading(root)
    ):
        return False
    want = _axes(view)
    have = _axes(root)
    if want == have:
        return None
    # ``view`` is ``root.transpose(perm)`` when its axes are ``root``'s (length, stride) pairs
    # in the order ``perm``: match each of its axes to an unused axis of ``root`` with the same
    # pair, in any number of dimensions. Axes with equal pairs are interchangeable (length-1
    # axes, or broadcast ones), so taking the first unused one never misses a match; it also
    # gives the lexicographically first such permutation.
    unused: dict[tuple[int, int | None], list[int]] = {}
    for i, axis in enumerate(have):
        unused.setdefault(axis, []).append(i)
    perm = []
    for axis in want:
        free = unused.get(axis)
        if not free:
            return False
        perm.append(free.pop(0))
    return tuple(perm)


def same_view(base: Any, x: Any, perm: Perm) -> bool:
    """``x`` is the view ``permute(base, perm)`` of a NumPy array or torch tensor (or the same
    layout, for ``None``)."""
    return has_layout(base) and has_layout(x) and view_permutation(base, x) == perm


def writable(x: Any) -> bool:
    """Its memory may be written: a writeable NumPy array, a torch tensor (an inference tensor
    only in inference mode)."""
    if is_torch(x):
        return not x.is_inference() or bool(sys.modules["torch"].is_inference_mode_enabled())
    return is_numpy(x) and bool(x.flags.writeable)


def write_(dst: Any, src: Any) -> None:
    """``dst[...] = src`` in place; for a tensor outside autograd (a Parameter stays a leaf)."""
    if is_torch(dst):
        with sys.modules["torch"].no_grad():
            dst.copy_(src)
        return
    np.copyto(dst, src, casting="same_kind")


def no_grad(xs: Sequence[Any]) -> contextlib.AbstractContextManager[Any]:
    """``torch.no_grad()`` if any of ``xs`` is a torch tensor: a step is not part of any graph."""
    if any(is_torch(x) for x in xs):
        return sys.modules["torch"].no_grad()  # type: ignore[no-any-return]
    return contextlib.nullcontext()
