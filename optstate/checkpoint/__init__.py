"""Checkpoints: ``save(path, state, model=None)`` and ``load(path, like=None)``.

A checkpoint is one NumPy ``.npz`` file (a zip archive of ``.npy`` arrays, readable with
``np.load(path, allow_pickle=False)``) with one extra member, ``optstate.json``, that describes
the rest: the format name and version, the tie plan (which positions hold which parameter, in
what orientation, with which rule, frozen or not), the structure of the model and of every rule
state and hyper-parameter tree, and for each array its shape, dtype and CRC-32. Nothing is
pickled. A tied parameter is stored once, under the path of its first position.

``save`` writes a temporary file beside ``path``, flushes it to disk and renames it over ``path``
(``os.replace``), so ``path`` always holds either the previous checkpoint or the new one, whole.
``load`` checks the archive against its metadata before it decompresses anything, reads no more
than the metadata records, and checks and builds everything before it returns, so an error never
leaves a half-loaded state. See docs/checkpoints.md for the guarantees and an orbax-checkpoint
recipe.

The package, from the ground up: ``_codec`` (the format's name, version, errors and how one
array is recorded), ``_values`` and ``_trees`` (plain values, classes and tree structures in
JSON), ``_kinds`` (NumPy, JAX and torch arrays: host copies, and loaded arrays in ``like``'s
kind), ``_plan`` (the tie plan in JSON, compared with ``like``'s), ``_archive`` (the zip: atomic
writes, and the checks before reading), then ``_save`` and ``_load``.
"""

from ._codec import FORMAT as FORMAT
from ._codec import VERSION as VERSION
from ._codec import CheckpointError as CheckpointError
from ._codec import CheckpointMismatchError as CheckpointMismatchError
from ._load import load as load
from ._save import save as save

__all__ = ["FORMAT", "VERSION", "CheckpointError", "CheckpointMismatchError", "load", "save"]
