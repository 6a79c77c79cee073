"""The ground floor of the checkpoint format: its name and version, its errors, and how one array
is recorded. A record names the array's member, shape, dtype and CRC-32; the dtype's name keeps
the byte order (``>f8``), and a dtype that a ``.npy`` header cannot name (ml_dtypes' ``bfloat16``,
the ``float8`` types) is stored as its raw bits, unsigned integers of its width.
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from .._errors import CheckpointError, CheckpointMismatchError

__all__ = ["FORMAT", "META", "VERSION", "CheckpointError", "CheckpointMismatchError"]

FORMAT = "optstate.checkpoint"
"""The format name stored in every checkpoint's metadata."""
VERSION = 2
"""The format version this optstate writes; it reads every version up to this one. Version 2
records each rule group's variants of hyper-parameters and its schedules' clocks; a version 1 file
reads as one variant per group, with clocks at the state's step count (how version 1 evaluated
schedules)."""
META = "optstate.json"  # the metadata member of the archive

Json = Any  # a value of what ``json.loads`` returns


def npy_names(dtype: np.dtype) -> bool:
    """A dtype that a ``.npy`` header can name (ml_dtypes' types cannot)."""
    return dtype.kind in "biufc" and dtype.isbuiltin != 2


def _extension(dtype: np.dtype) -> bool:
    """One of ml_dtypes' types (``bfloat16``, ``float8_e4m3fn``, ``int4``, ...)."""
    return dtype.isbuiltin == 2 and getattr(ml_dtypes, dtype.name, None) is dtype.type


def dtype_name(dtype: np.dtype) -> str:
    """The name a record gives ``dtype``: NumPy's name (``float32``, ``bfloat16``) for a
    little-endian or byte-order-free dtype, the type string (``>f8``) for a big-endian one, so that
    the name reads back as the same dtype on any machine (see ``parse_dtype``)."""
    if dtype.kind in "iufc" and (
        dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big")
    ):
        return str(dtype.newbyteorder(">").str)
    return str(dtype.name)


def parse_dtype(name: Json) -> np.dtype:
    """The dtype that a record's name stands for: a boolean, integer, floating or complex dtype
    of NumPy (a name without a byte order is little-endian) or one of ml_dtypes' types. Anything
    else (objects, strings, structures) is refused: an array of it is never read from a file."""
    dtype: np.dtype | None = None
    if isinstance(name, str):
        try:
            dtype = np.dtype(name)
        except (TypeError, ValueError):
            kind = getattr(ml_dtypes, name, None)
            if isinstance(kind, type) and issubclass(kind, np.generic):
                dtype = np.dtype(kind)
    if dtype is not None and _extension(dtype):
        return dtype
    if dtype is not None and npy_names(dtype) and not dtype.fields and not dtype.shape:
        return dtype.newbyteorder("<") if dtype.byteorder == "=" else dtype
    raise CheckpointError(f"unknown dtype {name!r} in the metadata")


def storable(dtype: np.dtype) -> bool:
    """A dtype whose record reads back as the very same dtype."""
    if not (npy_names(dtype) or _extension(dtype)):
        return False
    try:
        return parse_dtype(dtype_name(dtype)) == dtype
    except CheckpointError:
        return False


def stored_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of the ``.npy`` member that holds an array of ``dtype``."""
    return dtype if npy_names(dtype) else np.dtype(f"<u{dtype.itemsize}")


class Record(NamedTuple):
    """What the metadata says about one stored array."""

    member: str  # its name in the archive, ``<tree path>.npy``
    shape: tuple[int, ...]
    dtype: np.dtype
    crc32: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def text(self) -> str:
        return f"{dtype_name(self.dtype)}{list(self.shape)}"


def record(member: str, shape: tuple[int, ...], dtype: np.dtype, crc32: int) -> Json:
    """The metadata's record of an array written as ``member``."""
    return {
        "member": member,
        "shape": list(shape),
        "dtype": dtype_name(dtype),
        "raw": not npy_names(dtype),  # read by optstate 0.1's loader
        "crc32": crc32,
    }


def parse_record(entry: Json) -> Record:
    """A record from the metadata, its fields checked for type."""
    member, shape, crc = entry["member"], entry["shape"], entry["crc32"]
    if (
        not isinstance(member, str)
        or not isinstance(shape, list)
        or not all(type(n) is int and n >= 0 for n in shape)
        or type(crc) is not int
    ):
        raise CheckpointError(f"malformed array record in the metadata: {entry!r}"[:300])
    return Record(member, tuple(shape), parse_dtype(entry["dtype"]), crc)
