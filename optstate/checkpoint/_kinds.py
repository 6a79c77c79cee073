"""The kinds of array a checkpoint holds, NumPy, JAX and torch: what can be stored, the host
copy that is written, and a loaded NumPy array turned into the kind of its counterpart in
``like`` (a JAX array with its sharding, a tensor on its device).

torch is never imported here: a tensor exists only once the program has imported torch, so
``sys.modules`` has it whenever one is met.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import jax
import ml_dtypes
import numpy as np

from .. import _arrays
from ._codec import CheckpointMismatchError, dtype_name, npy_names, storable

_BITS = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch integers of each width
_TORCH_INTEGERS = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"}


@functools.cache
def _from_torch(dtype: Any) -> np.dtype | None:
    """The NumPy (or ml_dtypes) dtype of a torch dtype, ``None`` if it has none of the same
    width (the raw ``bits`` types, quantized and sub-byte types)."""
    name = str(dtype).removeprefix("torch.")
    if not (dtype.is_floating_point or dtype.is_complex or name in _TORCH_INTEGERS):
        return None
    kind = getattr(ml_dtypes, name, None)
    try:
        out = np.dtype(kind if isinstance(kind, type) else name)
    except TypeError:
        return None
    return out if out.itemsize == dtype.itemsize and storable(out) else None


def numpy_dtype(dtype: Any) -> np.dtype | None:
    """A dtype of any kind (NumPy, JAX, torch) as a NumPy dtype; ``None`` for a torch dtype
    without one."""
    if type(dtype).__module__ == "torch":
        mapped: np.dtype | None = _from_torch(dtype)
        return mapped
    as_numpy: np.dtype = np.dtype(dtype)
    return as_numpy


def dtype_text(dtype: Any) -> str:
    """A dtype as a record names it (``float32``, ``bfloat16``, ``>f8``), whatever its kind."""
    as_numpy = numpy_dtype(dtype)
    return str(dtype) if as_numpy is None else dtype_name(as_numpy)


def check_storable(x: Any, where: str) -> None:
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
    elif _arrays.is_torch(x):
        _check_tensor(x, where)
        return
    elif not isinstance(x, np.ndarray):
        raise TypeError(f"{where} is a {type(x).__name__}, not a NumPy, JAX or torch array")
    if not storable(np.dtype(x.dtype)):
        raise TypeError(f"{where} has dtype {x.dtype}, which a checkpoint cannot store")


def _check_tensor(x: Any, where: str) -> None:
    torch = sys.modules["torch"]
    problem = None
    if type(x) not in (torch.Tensor, torch.nn.Parameter):
        problem = f"is a {type(x).__name__}; a checkpoint stores plain tensors and Parameters"
    elif x.layout != torch.strided:
        problem = f"is a {x.layout} tensor; densify it first (.to_dense())"
    elif x.device.type == "meta":
        problem = "is on the meta device: it holds no values to store"
    elif _from_torch(x.dtype) is None:
        problem = f"has dtype {x.dtype}, which a checkpoint cannot store"
    if problem is not None:
        raise TypeError(f"{where} {problem}")


def host(x: Any) -> np.ndarray:
    """A C-contiguous NumPy array of ``x``'s values and exact dtype, on the host."""
    if _arrays.is_torch(x):
        return _tensor_to_numpy(x)
    arr = np.asarray(x)
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _tensor_to_numpy(x: Any) -> np.ndarray:
    t = x.detach().resolve_conj().resolve_neg().to("cpu").contiguous()
    dtype = _from_torch(t.dtype)
    assert dtype is not None  # check_storable came first
    if npy_names(dtype):
        return np.asarray(t.numpy())
    torch = sys.modules["torch"]
    return np.asarray(t.view(getattr(torch, _BITS[dtype.itemsize])).numpy()).view(dtype)


# -- loading: NumPy arrays into like's kind ---------------------------------------------------


class Kind:
    """Where arrays without a counterpart in ``like`` go: NumPy, JAX on the default device, or
    torch tensors on the CPU (where a torch state keeps its hyper-parameters and step)."""

    def __init__(self, like: Any) -> None:
        self.jax = _arrays.is_jax(like)
        self.torch = _arrays.is_torch(like)


def matches(shape: tuple[int, ...], dtype: np.dtype, target: Any) -> bool:
    """An array of ``shape`` and ``dtype`` can stand where ``like`` holds ``target``."""
    return tuple(target.shape) == shape and numpy_dtype(target.dtype) == dtype


def convert(arr: np.ndarray, like: Any, where: str) -> Any:
    """``arr`` as an array of ``like``'s kind: a JAX array with ``like``'s sharding, a tensor on
    ``like``'s device (with its ``requires_grad``), or NumPy. ``like`` may be a ``Kind``."""
    if isinstance(like, Kind):
        if like.torch:
            return _numpy_to_tensor(arr, None)
        if not like.jax:
            return arr
        out = jax.device_put(arr)
    elif _arrays.is_torch(like):
        return _numpy_to_tensor(arr, like)
    elif _arrays.is_jax(like):
        # An uncommitted array (made without naming a device) may be moved by jit to meet the
        # others; a copy placed with its sharding would be committed and could clash with them.
        out = jax.device_put(arr, like.sharding) if like.committed else jax.device_put(arr)
    else:
        return arr
    if out.dtype != arr.dtype:
        raise CheckpointMismatchError(
            f"{where} is {dtype_name(arr.dtype)} in the checkpoint, which JAX turns into "
            f"{out.dtype} here (enable jax_enable_x64 for 64-bit arrays)"
        )
    return out


def _numpy_to_tensor(arr: np.ndarray, like: Any) -> Any:
    """A tensor over ``arr``'s values on ``like``'s device, requiring a gradient where ``like``
    does (its dtype was checked by ``matches`` before reading); on the CPU without ``like``."""
    torch = sys.modules["torch"]
    if not arr.dtype.isnative:  # only without like: a tensor's dtype is never big-endian
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if npy_names(arr.dtype):
        t = torch.from_numpy(arr)
    else:  # ml_dtypes' types, by their bits
        kind = getattr(torch, arr.dtype.name, None)
        if not isinstance(kind, torch.dtype):
            raise CheckpointMismatchError(f"torch has no dtype {arr.dtype.name}")
        t = torch.from_numpy(arr.view(np.dtype(_BITS[arr.dtype.itemsize]))).view(kind)
    if like is None:
        return t
    t = t.to(device=like.device)
    return t.requires_grad_() if like.requires_grad else t
