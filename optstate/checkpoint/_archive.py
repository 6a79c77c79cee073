"""The archive: a zip of ``.npy`` members and the metadata member, written atomically, and read
so that a file cannot make ``load`` allocate more than its metadata records.

Reading checks, in this order and before any array is decompressed: the file's first bytes; the
zip's directory (no name twice, members stored or deflated and not overlapping, the metadata
member present and no larger than the metadata of that many arrays can be); the metadata (JSON,
format, version); its array records (every member recorded, every record's member present); and
each member's declared uncompressed size against its record (shape times item size, plus a
``.npy`` header), with the archive's total against the records' total. Reading an array then
checks its ``.npy`` header against its record before its data, reads exactly the record's bytes
into an array of the record's shape and dtype, and checks their CRC-32.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import secrets
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any

import numpy as np

from ._codec import (
    FORMAT,
    META,
    VERSION,
    CheckpointError,
    Json,
    Record,
    dtype_name,
    parse_record,
    record,
    stored_dtype,
)
from ._kinds import host

# A .npy member: 6 bytes of magic, 2 of version, 2 or 4 of header length, and the header, which
# NumPy reads up to 10,000 bytes long (``max_header_size``); optstate writes 128 for most arrays.
_MAX_HEADER = 10_000
_HEADER_BOUND = 12 + _MAX_HEADER
_CHUNK = 1 << 20  # bytes read at a time

# The metadata describes the model's structure, the tie plan, the rules and one record per array.
# Its size grows with the number of arrays and the length of their paths (their member names); a
# model's leaves that are not arrays (numbers, strings) take the rest of the base allowance.
_META_BASE = 1 << 20
_META_PER_ARRAY = 1024
_META_PER_NAME_BYTE = 8


def meta_bound(members: list[str]) -> int:
    """The largest metadata member that ``load`` reads for arrays stored under ``members``."""
    per_array = _META_PER_ARRAY * len(members)
    return _META_BASE + per_array + _META_PER_NAME_BYTE * sum(len(m) for m in members)


# -- writing ------------------------------------------------------------------------------------


def write_array(zf: zipfile.ZipFile, member: str, x: Any) -> Json:
    """Write one array (brought to the host now, one at a time) and return its record."""
    arr = host(x)
    stored = arr.view(stored_dtype(arr.dtype))
    crc = zlib.crc32(stored.reshape(-1).view(np.uint8).data)
    with zf.open(member, "w", force_zip64=True) as f:
        np.lib.format.write_array(f, stored, allow_pickle=False)
    return record(member, arr.shape, arr.dtype, crc)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temporary file beside ``path``, flushed to disk, then renamed over it."""
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


# -- reading ------------------------------------------------------------------------------------

# Reading a damaged zip can fail in many ways (BadZipFile, zlib.error, EOFError, a KeyError for a
# garbled name, NotImplementedError for a garbled compression method or flag, ...): any exception
# while reading bytes means the file cannot be trusted.
_READ_ERRORS = (Exception,)


def _corrupt(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} is truncated or corrupted ({type(err).__name__}: {err}); nothing was loaded. "
        "Load an earlier checkpoint."
    )


def _check_head(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"\x93NUMPY"):
        raise CheckpointError(f"{path} is a single NumPy array (.npy), not a checkpoint")
    if not head.startswith(b"PK"):
        raise CheckpointError(
            f"{path} is not an optstate checkpoint: it is not a .npz (zip) file (it begins "
            f"with {head!r})"
        )


class Reader:
    """An open checkpoint: its metadata and array records, checked against the archive's
    directory; its arrays read and checked one by one."""

    def __init__(self, path: str) -> None:
        self.path = path
        _check_head(path)
        self.file = open(path, "rb")  # noqa: SIM115  (closed by close())
        try:
            try:
                self.zip = zipfile.ZipFile(self.file)
            except _READ_ERRORS as err:
                raise _corrupt(path, err) from err
            self.members = self._directory()
            self.meta: Json = self._read_meta()
            self.records = self._check_records()
        except BaseException:
            self.file.close()
            raise

    def close(self) -> None:
        self.zip.close()
        self.file.close()

    def _directory(self) -> dict[str, zipfile.ZipInfo]:
        """The members by name: each named once, stored or deflated (as NumPy writes them; other
        methods reach far higher ratios), none overlapping another in the file (a zip that
        inflates one block under many names)."""
        members: dict[str, zipfile.ZipInfo] = {}
        for info in self.zip.infolist():
            if info.filename in members:
                raise CheckpointError(
                    f"{self.path} holds two members named {info.filename}: which one is the "
                    "checkpoint's cannot be told; nothing was loaded"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise CheckpointError(
                    f"{self.path}: member {info.filename} is compressed with method "
                    f"{info.compress_type}; a checkpoint's members are stored or deflated; "
                    "nothing was loaded"
                )
            members[info.filename] = info
        spans = sorted((i.header_offset, i.compress_size, i.filename) for i in members.values())
        for (start, size, name), (after, _, other) in itertools.pairwise(spans):
            if after < start + 30 + size:  # a local header takes 30 bytes and the name
                raise CheckpointError(
                    f"{self.path}: members {name} and {other} overlap in the file; nothing was "
                    "loaded"
                )
        if META not in members:
            held = [name.removesuffix(".npy") for name in members][:5]
            raise CheckpointError(
                f"{self.path} is a .npz file but not an optstate checkpoint: it has no {META} "
                f"(it holds {', '.join(held) or 'nothing'})"
            )
        return members

    def _read_meta(self) -> Json:
        info = self.members[META]
        arrays = [name for name in self.members if name != META]
        bound = meta_bound(arrays)
        if info.file_size > bound:
            raise CheckpointError(
                f"{self.path}: its metadata member {META} declares {info.file_size} bytes, more "
                f"than the metadata of {len(arrays)} arrays can take (at most {bound}); nothing "
                "was read"
            )
        try:
            with self.zip.open(info) as f:
                meta = json.loads(f.read(info.file_size).decode("utf-8"))
        except (*_READ_ERRORS, UnicodeDecodeError) as err:
            raise _corrupt(self.path, err) from err
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not an optstate checkpoint (format {FORMAT!r})")
        version = meta.get("version")
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"{self.path} has no valid format version: {version!r}")
        if version > VERSION:
            raise CheckpointError(
                f"{self.path} was written in checkpoint format version {version} (by optstate "
                f"{meta.get('optstate')}); this optstate reads versions up to {VERSION}: "
                "upgrade optstate to load it"
            )
        return meta

    def _check_records(self) -> list[Record]:
        """Every member recorded once, every record's member present, and no member declaring
        more (or less) than its record takes."""
        entries = self.meta["arrays"]
        if not isinstance(entries, list):
            raise TypeError(f"the array records are a {type(entries).__name__}, not a list")
        records = [parse_record(entry) for entry in entries]
        recorded = {r.member for r in records}
        if len(recorded) != len(records):
            raise CheckpointError(f"{self.path}: two array records name one member")
        unknown = [name for name in self.members if name != META and name not in recorded]
        if unknown:
            raise CheckpointError(
                f"{self.path} holds members that its metadata does not record: "
                f"{', '.join(unknown[:5])}; nothing was loaded"
            )
        for r in records:
            if r.member not in self.members:
                raise CheckpointError(
                    f"{self.path} has no member {r.member} ({r.member.removesuffix('.npy')}), "
                    "which its metadata records; nothing was loaded (a truncated or edited file?)"
                )
        self._check_sizes(records)
        return records

    def _check_sizes(self, records: list[Record]) -> None:
        """Each member's declared uncompressed size against its record, naming the first that
        does not fit, with the archive's total against the records' total."""
        declared = sum(info.file_size for info in self.members.values())
        allowed = self.members[META].file_size + sum(r.nbytes + _HEADER_BOUND for r in records)
        for r in records:
            size = self.members[r.member].file_size
            if not r.nbytes + 10 <= size <= r.nbytes + _HEADER_BOUND:
                raise CheckpointError(
                    f"{self.path}: member {r.member} declares {size} bytes uncompressed; its "
                    f"record, {r.text}, takes {r.nbytes} bytes (and a .npy header of at most "
                    f"{_HEADER_BOUND}). The archive declares {declared} bytes in all, its "
                    f"records account for at most {allowed}; nothing was read"
                )

    def record(self, index: int) -> Record:
        if type(index) is not int or not 0 <= index < len(self.records):
            raise IndexError(f"array record {index!r} of {len(self.records)}")
        return self.records[index]

    def array(self, index: int, where: str) -> np.ndarray:
        """Array number ``index``: its .npy header and size checked against its record, then
        exactly the record's bytes read into a new array, their CRC-32 checked."""
        r = self.record(index)
        with self._member(r) as f:
            arr = np.empty(r.shape, r.dtype)
            flat = arr.reshape(-1).view(np.uint8)
            try:
                _read_into(f, flat)
            except _READ_ERRORS as err:
                raise _corrupt(self.path, err) from err
        crc = zlib.crc32(flat.data)
        if crc != r.crc32:
            raise _corrupt(
                self.path,
                ValueError(
                    f"{where} (member {r.member}) does not match its record: its data has "
                    f"CRC-32 {crc}, its record {r.crc32}"
                ),
            )
        return arr

    @contextlib.contextmanager
    def _member(self, r: Record) -> Iterator[IO[bytes]]:
        """A member opened, its .npy header read and checked: the data comes next."""
        info = self.members[r.member]
        try:
            f = self.zip.open(info)
        except _READ_ERRORS as err:
            raise _corrupt(self.path, err) from err
        with f:
            try:
                header = self._header(f, r)
            except CheckpointError:
                raise
            except _READ_ERRORS as err:
                raise _corrupt(self.path, err) from err
            if header + r.nbytes != info.file_size:
                raise CheckpointError(
                    f"{self.path}: {r.member} declares {info.file_size} bytes uncompressed, but "
                    f"its .npy header ({header} bytes) and its record ({r.nbytes} bytes) take "
                    f"{header + r.nbytes}; nothing was loaded"
                )
            yield f

    def _header(self, f: IO[bytes], r: Record) -> int:
        """Read a member's .npy header, check it against the record, return its length."""
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, _MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, _MAX_HEADER)
        else:
            raise ValueError(f"{r.member} is a .npy file of version {version}")
        want = stored_dtype(r.dtype)
        if tuple(shape) != r.shape or dtype != want or fortran:
            order = " in Fortran order" if fortran else ""
            raise CheckpointError(
                f"{self.path}: {r.member}: its .npy header declares "
                f"{dtype_name(dtype)}{list(shape)}{order}, its record "
                f"{dtype_name(want)}{list(r.shape)}; nothing was loaded"
            )
        return f.tell()


def _read_into(f: IO[bytes], flat: np.ndarray) -> None:
    """Fill ``flat`` (bytes) from ``f``, a bounded chunk at a time."""
    pos, n = 0, flat.size
    while pos < n:
        chunk = f.read(min(_CHUNK, n - pos))
        if not chunk:
            raise EOFError(f"the member ends after {pos} of its {n} bytes of data")
        flat[pos : pos + len(chunk)] = np.frombuffer(chunk, np.uint8)
        pos += len(chunk)


@contextlib.contextmanager
def open_checkpoint(path: str) -> Iterator[Reader]:
    """An open ``Reader``; a metadata field missing or of the wrong type becomes a
    ``CheckpointError`` (the zip and JSON are sound: the file was written by something else or
    edited)."""
    try:
        reader = Reader(path)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise _malformed(path, err) from err
    try:
        yield reader
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise _malformed(path, err) from err
    finally:
        reader.close()


def _malformed(path: str, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path} has malformed metadata ({type(err).__name__}: {err}); nothing was loaded"
    )
