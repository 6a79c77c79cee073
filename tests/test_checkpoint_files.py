"""Checkpoint files: ``save`` writes atomically and checks before writing; ``load`` refuses files
that are not (sound) checkpoints with a ``CheckpointError`` and loads nothing from them.

References: the bytes of a file cut short or flipped, the zip structure as Python's ``zipfile``
reads it, and the previous checkpoint's own arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checkpoint_cases import (
    assert_same_arrays,
    jax_model,
    numpy_grads,
    saved,
    small_checkpoint,
    tied_numpy_model,
    unchanged,
)

import optstate as ost
from optstate.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


# -- atomic writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, error):
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    path = saved(tmp_path, state, model)
    before = path.read_bytes()
    state2, model2 = ost.update(state, model, numpy_grads(model, 1))

    real = np.lib.format.write_array
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 4:  # halfway through the archive
            raise error
        real(*args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing)
    with pytest.raises(type(error)):
        ost.save(path, state2, model2)
    monkeypatch.undo()
    assert len(calls) == 4
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]  # the temporary file is gone
    loaded_state, loaded_model = ost.load(path)
    assert_same_arrays(loaded_state, state)
    assert_same_arrays(loaded_model, model)


CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import optstate as ost

    real = np.lib.format.write_array
    calls = []

    def slow(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            print("mid-write", flush=True)
            time.sleep(60)

    np.lib.format.write_array = slow
    model = {"w": np.full((64, 64), 2.0), "v": np.full(8, 2.0)}
    ost.save(sys.argv[1], ost.setup(ost.Momentum(0.1), model), model)
    """
)


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(tmp_path):
    model = {"w": np.full((64, 64), 1.0), "v": np.full(8, 1.0)}
    state = ost.setup(ost.Momentum(0.1), model)
    path = saved(tmp_path, state, model)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    watchdog = threading.Timer(60, child.kill)  # never wait forever on a child that hangs
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line == "mid-write\n", child.stderr.read()
        partial = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
        assert len(partial) == 1
        assert (tmp_path / partial[0]).stat().st_size > 0
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        watchdog.cancel()
    loaded_state, loaded_model = ost.load(path)
    assert_same_arrays(loaded_model, model)
    assert_same_arrays(loaded_state, state)


def test_save_checks_everything_before_touching_the_file(tmp_path):
    model = tied_numpy_model()
    state = ost.setup(ost.Adam(1e-2), model)
    path = saved(tmp_path, state, model)
    before = path.read_bytes()
    broken = {**model, "again": [ost.Transpose(model["enc"]["w"].copy()), model["enc"]["w"]]}
    with pytest.raises(ost.TieError, match=r"model\['again'\]\[0\].*retie"):
        ost.save(path, state, broken)
    other = {**model, "enc": {"w": model["enc"]["w"], "b": np.zeros(4, np.float32)}}
    with pytest.raises(ValueError, match=r"model\['enc'\]\['b'\] changed since setup"):
        ost.save(path, state, other)

    jstate = ost.setup(ost.Adam(1e-2), jax_model())
    jstate.states[0].mu.delete()  # what donation does to the old state
    with pytest.raises(ValueError, match=r"state\.states\[0\]\.mu has been deleted"):
        ost.save(path, jstate)
    with pytest.raises(TypeError, match="expects the State"):
        ost.save(path, {"not": "a state"})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ost.save(tmp_path / "missing" / "ckpt.npz", state, model)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]


def test_save_refuses_a_file_that_load_would_refuse(tmp_path):
    """``load`` reads no more metadata than the arrays it describes can need, and describes trees
    level by level: ``save`` refuses, before writing, a model whose metadata would be larger (its
    20,000 string leaves, which are not arrays, take about 1.8 MB beside four arrays: w, lr, the
    schedules' clock and the step), or one
    nested deeper than Python's recursion limit."""
    chatty = {"w": np.ones(3), "notes": ["a note that is not an array"] * 20_000}
    state = ost.setup(ost.Descent(0.1), chatty)
    with pytest.raises(
        ValueError, match=r"metadata would take \d+ bytes, more than load reads beside 4 arrays"
    ):
        ost.save(tmp_path / "chatty.npz", state, chatty)
    deep: Any = np.ones(2)
    for _ in range(sys.getrecursionlimit() + 10):
        deep = [deep]
    state = ost.setup(ost.Descent(0.1), deep)
    with pytest.raises(ValueError, match=r"nested too deeply for a checkpoint"):
        ost.save(tmp_path / "deep.npz", state, deep)
    assert os.listdir(tmp_path) == []


# -- files that are not (good) checkpoints -----------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> tuple[Path, ost.State, Any]:
    return small_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_refused(small, keep):
    path, _, _ = small
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"ckpt\.npz (is truncated or corrupted|is not an)"):
        ost.load(path)


def test_no_corrupted_byte_goes_unnoticed(small):
    """Flip one byte at a time over the file (every 7th): every load either fails with a
    CheckpointError or gives back exactly what was saved (a flip in a zip timestamp changes
    nothing that is loaded)."""
    path, state, model = small
    data = path.read_bytes()
    with zipfile.ZipFile(path) as zf:  # where each member's bytes (arrays, metadata) lie
        spans = []
        for info in zf.infolist():
            head = data[info.header_offset : info.header_offset + 30]
            start = info.header_offset + 30 + int.from_bytes(head[26:28], "little")
            start += int.from_bytes(head[28:30], "little")
            spans.append(range(start, start + info.compress_size))
    for offset in range(0, len(data), 7):
        bad = bytearray(data)
        bad[offset] ^= 0x5A
        path.write_bytes(bytes(bad))
        try:
            loaded_state, loaded_model = ost.load(path)
        except CheckpointError:
            continue
        assert not any(offset in span for span in spans), offset  # content is always checked
        assert_same_arrays(loaded_state, state)
        assert_same_arrays(loaded_model, model)


def test_a_flipped_array_bit_is_refused_and_like_is_untouched(small):
    path, _, model = small
    data = bytearray(path.read_bytes())
    at = bytes(data).index(model["enc"]["w"].tobytes())  # the tied weight's stored values
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))
    like_state, like_model = ost.setup(ost.Adam(1e-2), model), model
    copies = unchanged((like_state, like_model))
    with pytest.raises(CheckpointError, match=r"truncated or corrupted \(.*model\['again'\]\[1\]"):
        ost.load(path, like=(like_state, like_model))
    assert_same_arrays((like_state, like_model), copies)


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not an optstate checkpoint"):
        ost.load(text)
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(CheckpointError, match=r"array\.npy is a single NumPy array"):
        ost.load(npy)
    npz = tmp_path / "plain.npz"
    np.savez(npz, w=np.ones(3))
    with pytest.raises(CheckpointError, match=r"plain\.npz is a \.npz file but not .*holds w"):
        ost.load(npz)
    with pytest.raises(FileNotFoundError):
        ost.load(tmp_path / "absent.npz")


def rewrite_metadata(path: Path, change: Any) -> None:
    """Rewrite the checkpoint with its metadata changed (what a future optstate might write)."""
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    meta = json.loads(members["optstate.json"])
    change(meta)
    members["optstate.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_a_newer_format_version_is_refused(small):
    path, _, _ = small
    newer = ost.checkpoint.VERSION + 1
    rewrite_metadata(path, lambda meta: meta.update(version=newer, optstate="9.0"))
    with pytest.raises(
        CheckpointError,
        match=rf"format version {newer} \(by optstate 9\.0\).* up to {newer - 1}",
    ):
        ost.load(path)
    rewrite_metadata(path, lambda meta: meta.update(format="something.else"))
    with pytest.raises(CheckpointError, match="not an optstate checkpoint"):
        ost.load(path)


def test_malformed_metadata_is_refused(small):
    path, _, _ = small
    rewrite_metadata(path, lambda meta: meta["plan"].pop("slots"))
    with pytest.raises(CheckpointError, match=r"malformed metadata \(KeyError: 'slots'\)"):
        ost.load(path)


# -- files made to exhaust memory: every member checked against its record before it is read ----
# A zip member may be deflated: a few MiB of file can declare GiBs of array. ``load`` compares what
# the archive declares (each zip entry's uncompressed size, each .npy header) with the metadata's
# records before it decompresses anything, so such a file is refused at the cost of its headers.

BIG = 2**28  # float64 values: 2 GiB once inflated
MiB = 2**20


def tied_3x4(tmp_path: Path) -> Path:
    """The issue's case: a valid checkpoint of a 3x4 float64 weight tied to its transpose."""
    w = np.arange(12.0).reshape(3, 4)
    model = {"enc": w, "dec": ost.Transpose(w)}
    return saved(tmp_path, ost.setup(ost.Adam(1e-2), model), model)


def members_of(path: Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    out = io.BytesIO()
    header = {"descr": descr, "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue()


@dataclass
class Entry:
    """A zip member as it lies in the file: its name, how it is stored, and what it declares."""

    name: str
    data: bytes  # the bytes in the file (deflated, raw, for ``deflated``)
    size: int  # the declared uncompressed size
    crc: int
    deflated: bool = False
    extent: int | None = None  # the declared compressed size, if not ``len(data)``

    @classmethod
    def stored(cls, name: str, data: bytes) -> Entry:
        return cls(name, data, len(data), zlib.crc32(data))


def write_zip(path: Path, entries: list[Entry]) -> None:
    """A zip archive written by hand (local headers, central directory, end record), so that a
    member can hold a deflated stream made without inflating it, and names may repeat."""
    out = bytearray()
    central = bytearray()
    for e in entries:
        name = e.name.encode()
        method = 8 if e.deflated else 0
        extent = len(e.data) if e.extent is None else e.extent
        fields = struct.pack("<HHHHHIII", 20, 0, method, 0, 0x21, e.crc, extent, e.size)
        offset = len(out)
        out += b"PK\x03\x04" + fields + struct.pack("<HH", len(name), 0) + name + e.data
        central += b"PK\x01\x02" + struct.pack("<H", 20) + fields
        central += struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset)
        central += name
    end = struct.pack("<HHHHIIH", 0, 0, len(entries), len(entries), len(central), len(out), 0)
    path.write_bytes(bytes(out + central + b"PK\x05\x06" + end))


@functools.cache
def inflating_npy() -> Entry:
    """A .npy member declaring ``BIG`` float64 zeros, deflated to about 2 MiB: the zeros are
    compressed one MiB at a time after a full flush, so the same block repeats."""
    header = npy_header("<f8", (BIG,))
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = z.compress(header) + z.flush(zlib.Z_FULL_FLUSH)
    zeros = bytes(MiB)
    block = z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH)
    assert z.compress(zeros) + z.flush(zlib.Z_FULL_FLUSH) == block  # the history was reset
    n = BIG * 8 // MiB
    data = head + block * n + z.flush()
    crc = zlib.crc32(header)
    for _ in range(n):
        crc = zlib.crc32(zeros, crc)
    assert zlib.decompressobj(-15).decompress(head + block) == header + zeros
    return Entry("", data, len(header) + BIG * 8, crc, deflated=True)


def with_member(path: Path, member: str, entry: Entry) -> None:
    """Rewrite the checkpoint at ``path`` with ``member`` replaced by ``entry``."""
    entries = [
        dataclasses.replace(entry, name=n) if n == member else Entry.stored(n, data)
        for n, data in members_of(path)
    ]
    write_zip(path, entries)


LOAD_AND_MEASURE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import optstate as ost

    def status(field):  # kB
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))

    like = None
    if sys.argv[2] == "like":
        w = np.zeros((3, 4))
        model = {"enc": w, "dec": ost.Transpose(w)}
        like = (ost.setup(ost.Adam(1e-2), model), model)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident size starts again from here
    before = status("VmRSS")
    start = time.perf_counter()
    try:
        ost.load(sys.argv[1], like=like)
        outcome = "loaded"
    except ost.checkpoint.CheckpointError as err:
        outcome = f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    grew = (status("VmHWM") - before) * 1024
    print(json.dumps({"outcome": outcome, "grew": grew, "seconds": seconds}))
    """
)


def load_in_child(path: Path, like: bool = False) -> dict[str, Any]:
    """Load ``path`` in a fresh process; what happened, and by how much its peak resident memory
    grew during ``load`` (bytes)."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to measure peak memory")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_MEASURE, str(path), "like" if like else "-"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_a_member_that_inflates_past_its_record_is_refused_before_reading(tmp_path):
    """The case of the issue: one member of a valid checkpoint replaced by a .npy declaring 2 GiB
    of float64, deflated into 2 MiB. It is refused from the zip entry's declared size, naming the
    member and its record, while memory grows by a small fraction of 2 GiB."""
    path = tied_3x4(tmp_path)
    with_member(path, "model['enc'].npy", inflating_npy())
    assert path.stat().st_size < 3 * MiB
    result = load_in_child(path)
    assert result["outcome"].startswith("CheckpointError: "), result
    assert re.search(
        r"model\['enc'\]\.npy declares 2147483776 bytes uncompressed; its record, float64\[3, 4\], "
        r"takes 96 bytes",
        result["outcome"],
    ), result
    assert result["grew"] < 64 * MiB, result  # inflating it takes 2048 MiB


def test_a_record_that_does_not_fit_like_is_refused_before_reading(tmp_path):
    """A file whose metadata was changed to match the inflating member: a first moment recorded
    as float64[2**28] with its true CRC-32. With ``like`` it is refused from the record alone,
    before the member is read (``like``'s moment is float64[3, 4])."""
    path = tied_3x4(tmp_path)
    entry = inflating_npy()
    members = dict(members_of(path))
    meta = json.loads(members["optstate.json"])
    [record] = [r for r in meta["arrays"] if r["member"] == "state.states[0].mu.npy"]
    zeros_crc = 0
    for _ in range(BIG * 8 // MiB):
        zeros_crc = zlib.crc32(bytes(MiB), zeros_crc)
    record.update(shape=[BIG], crc32=zeros_crc)
    members["optstate.json"] = json.dumps(meta).encode()
    entries = [
        dataclasses.replace(entry, name=n) if n == record["member"] else Entry.stored(n, data)
        for n, data in members.items()
    ]
    write_zip(path, entries)
    result = load_in_child(path, like=True)
    assert result["outcome"].startswith("CheckpointMismatchError: "), result
    assert re.search(
        r"state\.states\[0\]\.mu is float64\[268435456\] in the file, float64\[3, 4\] in like",
        result["outcome"],
    ), result
    assert result["grew"] < 64 * MiB, result


def test_a_header_that_disagrees_with_the_record_is_refused(tmp_path):
    """The zip entry declares the record's size, but the .npy header inside declares 2**28
    values; then a header that agrees, followed by bytes the record does not account for."""
    path = tied_3x4(tmp_path)
    good = dict(members_of(path))["model['enc'].npy"]
    header = npy_header("<f8", (BIG,))
    lying = header + good[len(header) :]
    assert len(lying) == len(good)
    with_member(path, "model['enc'].npy", Entry.stored("", lying))
    with pytest.raises(
        CheckpointError,
        match=r"model\['enc'\]\.npy: its \.npy header declares float64\[268435456\], its record "
        r"float64\[3, 4\]",
    ):
        ost.load(path)

    path = tied_3x4(tmp_path)
    with_member(path, "model['enc'].npy", Entry.stored("", good + bytes(40)))
    with pytest.raises(
        CheckpointError,
        match=r"model\['enc'\]\.npy declares 264 bytes uncompressed, but its \.npy header "
        r"\(128 bytes\) and its record \(96 bytes\) take 224",
    ):
        ost.load(path)


def test_unknown_missing_and_duplicate_members_are_refused(tmp_path):
    path = tied_3x4(tmp_path)
    members = members_of(path)
    write_zip(path, [Entry.stored(n, d) for n, d in members] + [Entry.stored("extra.npy", b"x")])
    with pytest.raises(CheckpointError, match=r"members that its metadata does not record: extra"):
        ost.load(path)

    kept = [Entry.stored(n, d) for n, d in members if n != "state.step.npy"]
    write_zip(path, kept)
    with pytest.raises(
        CheckpointError, match=r"has no member state\.step\.npy \(state\.step\), which its metadata"
    ):
        ost.load(path)

    for name in ["model['enc'].npy", "optstate.json"]:
        twice = [Entry.stored(n, d) for n, d in members] + [Entry.stored(name, dict(members)[name])]
        write_zip(path, twice)
        with pytest.raises(
            CheckpointError, match=rf"holds two members named {re.escape(name)}: which one"
        ):
            ost.load(path)


def test_members_that_overlap_or_use_other_compression_are_refused(tmp_path):
    """A zip can hold one deflated block under many names (entries whose data overlap), and
    bzip2 reaches ratios far beyond deflate's 1:1032: optstate writes neither, and ``load``
    refuses both from the zip's directory."""
    path = tied_3x4(tmp_path)
    members = members_of(path)
    entries = [Entry.stored(n, d) for n, d in members]
    entries[0] = dataclasses.replace(entries[0], extent=len(entries[0].data) + 300)
    write_zip(path, entries)
    first, second = members[0][0], members[1][0]
    with pytest.raises(
        CheckpointError, match=rf"members {re.escape(first)} and {re.escape(second)} overlap"
    ):
        ost.load(path)

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            method = zipfile.ZIP_BZIP2 if name == "model['enc'].npy" else zipfile.ZIP_STORED
            zf.writestr(name, data, compress_type=method)
    with pytest.raises(CheckpointError, match=r"model\['enc'\]\.npy is compressed with method 12"):
        ost.load(path)


def test_an_over_long_metadata_member_is_refused_before_reading(tmp_path):
    """Metadata padded with 64 MiB of spaces (still valid JSON), deflated into 64 KiB."""
    path = tied_3x4(tmp_path)
    members = dict(members_of(path))
    padded = members["optstate.json"] + b" " * (64 * MiB)
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = z.compress(padded) + z.flush()
    entries = [
        Entry(n, data, len(padded), zlib.crc32(padded), deflated=True)
        if n == "optstate.json"
        else Entry.stored(n, d)
        for n, d in members.items()
    ]
    write_zip(path, entries)
    assert path.stat().st_size < MiB
    result = load_in_child(path)
    assert re.search(
        r"CheckpointError: .*optstate\.json declares 671\d{5} bytes, more than the metadata of "
        r"10 arrays can take \(at most \d+\)",
        result["outcome"],
    ), result
    assert result["grew"] < 16 * MiB, result
