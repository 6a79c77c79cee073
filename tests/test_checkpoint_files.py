"""Checkpoint files: ``save`` writes atomically and checks before writing; ``load`` refuses files
that are not (sound) checkpoints with a ``CheckpointError`` and loads nothing from them.

References: the bytes of a file cut short or flipped, the zip structure as Python's ``zipfile``
reads it, and the previous checkpoint's own arrays.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import zipfile
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
    rewrite_metadata(path, lambda meta: meta.update(version=2, optstate="9.0"))
    with pytest.raises(CheckpointError, match=r"format version 2 \(by optstate 9\.0\).* up to 1"):
        ost.load(path)
    rewrite_metadata(path, lambda meta: meta.update(format="something.else"))
    with pytest.raises(CheckpointError, match="not an optstate checkpoint"):
        ost.load(path)


def test_malformed_metadata_is_refused(small):
    path, _, _ = small
    rewrite_metadata(path, lambda meta: meta["plan"].pop("slots"))
    with pytest.raises(CheckpointError, match=r"malformed metadata \(KeyError: 'slots'\)"):
        ost.load(path)
