"""optstate's own errors and warnings, one family: ``OptstateError`` is the base of every error
optstate raises of its own (each also derives from the built-in it refines, ``ValueError``, so
existing ``except ValueError`` code keeps working), and ``OptstateWarning`` of its warnings."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CopyWarning",
    "GroupSplitWarning",
    "OptstateError",
    "OptstateWarning",
    "StaleParamsError",
    "StructureError",
    "TieError",
]


class OptstateError(Exception):
    """Base class of the errors optstate raises of its own: catch it to catch any of them.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> state = ost.setup(ost.Adam(), {"w": np.ones(2)})
        >>> try:
        ...     ost.update(state, {"v": np.ones(2)}, {"v": np.ones(2)})
        ... except ost.OptstateError as err:
        ...     print(type(err).__name__)
        StructureError
    """


class OptstateWarning(UserWarning):
    """Base class of optstate's warnings: ``warnings.simplefilter("error", OptstateWarning)`` makes
    them all errors.

    Examples:
        >>> import warnings, numpy as np, optstate as ost
        >>> w = np.arange(6.0).reshape(2, 3)
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error", ost.OptstateWarning)
        ...     try:
        ...         ost.setup(ost.Adam(), {"enc": w, "dec": w.T.copy()})  # a copy, not a tie
        ...     except ost.OptstateWarning as warning:
        ...         print(type(warning).__name__)
        CopyWarning
    """


class StructureError(OptstateError, ValueError):
    """A tree does not have the structure it was expected to have.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> state = ost.setup(ost.Descent(), {"w": np.ones(2)})
        >>> try:
        ...     ost.update(state, {"v": np.ones(2)}, {"v": np.ones(2)})
        ... except ost.StructureError as err:
        ...     print(err)
        the model does not have the structure the state was set up for ...; positions missing
        from the model: model['w']; positions the state does not know: model['v']. ...
    """


class TieError(OptstateError, ValueError):
    """Two positions overlap in memory in a way that cannot be trained as one parameter.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> a = np.arange(6.0)
        >>> try:
        ...     ost.setup(ost.Descent(), {"x": a[:4], "y": a[2:]})  # overlapping slices
        ... except ost.TieError as err:
        ...     print(err)
        model['x'] and model['y'] share memory, but neither is the other or its transpose ...
    """


class CheckpointError(OptstateError, ValueError):
    """A file that cannot be loaded as an optstate checkpoint: not a checkpoint at all, truncated
    or corrupted bytes, an archive that declares more than its records, or a format version newer
    than this optstate reads. Nothing is loaded.

    Examples:
        >>> import os, tempfile, optstate as ost
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "notes.npz")
        ...     with open(path, "w") as f:
        ...         _ = f.write("not a checkpoint")
        ...     try:
        ...         ost.load(path)
        ...     except ost.CheckpointError as err:
        ...         print(str(err).removeprefix(path))
         is not an optstate checkpoint: it is not a .npz (zip) file (it begins with b'not a ch')
    """


class CheckpointMismatchError(CheckpointError):
    """A sound checkpoint that does not fit ``like``: another model structure, other ties, other
    parameter shapes or dtypes, or other rules. The message names the first path that differs.

    Examples:
        >>> import os, tempfile, numpy as np, optstate as ost
        >>> model, other = {"w": np.ones(2)}, {"w": np.ones(3)}
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "ckpt.npz")
        ...     ost.save(path, ost.setup(ost.Adam(), model), model)
        ...     try:
        ...         ost.load(path, like=(ost.setup(ost.Adam(), other), other))
        ...     except ost.CheckpointMismatchError as err:
        ...         print(str(err).removeprefix(path))
        : model['w'] is float64[2] in the file, float64[3] in like
    """


class StaleParamsError(OptstateError, ValueError):
    """A parameter recorded by ``params`` is no longer at one of its positions in the model.

    Raised by ``gradient`` and ``Grads.to_tree``: an array replaced after ``params`` (by hand, or
    by a pure ``optstate.update``, which returns new arrays) is not followed, since the loss
    would no longer read the recorded one. Take ``params(model)`` again.

    Examples:
        >>> import jax.numpy as jnp
        >>> from optstate import implicit
        >>> model = {"w": jnp.ones(2)}
        >>> ps = implicit.params(model)
        >>> model["w"] = jnp.zeros(2)
        >>> try:
        ...     implicit.gradient(lambda: jnp.sum(model["w"]), ps)
        ... except implicit.StaleParamsError as err:
        ...     print(str(err)[:60])
        gradient: model['w'] held the parameter JAX float32[2] when
    """


class CopyWarning(OptstateWarning):
    """``setup`` found separate arrays that look like one weight: equal values up to a permutation
    of the axes (a copy, or JAX's ``W.T``, which is a new array), or, inside ``jax.jit``, a
    ``Transpose`` whose parent sits at no other position while another parameter has its shape.

    Each is trained as a parameter of its own. For a tie, put the same array at both positions
    (``optstate.Transpose(W)`` for the transposed use), and call ``setup`` outside ``jax.jit`` or
    inside ``optstate.jit``. A copy made on purpose (an untied decoder started at the encoder's
    transpose) is silenced with a filter on this class::

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optstate.CopyWarning)
            state = optstate.setup(rule, model)

    Examples:
        >>> import warnings, numpy as np, optstate as ost
        >>> w = np.arange(6.0).reshape(2, 3)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = ost.setup(ost.Adam(), {"enc": w, "dec": w.T.copy()})
        >>> caught[0].category.__name__, "model['dec']" in str(caught[0].message)
        ('CopyWarning', True)
    """


class GroupSplitWarning(OptstateWarning):
    """Rules that look across parameters (``ClipGlobalNorm``, ``SkipNonFinite``, ``from_optax``)
    were set up in several groups of parameters, each of which then looks only at itself.

    Examples:
        >>> import warnings, numpy as np, optstate as ost
        >>> rules = {  # two rule structures: each group clips by its own global norm
        ...     "a": ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Adam()),
        ...     "b": ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent()),
        ... }
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = ost.setup(rules, {"a": np.ones(2), "b": np.ones(2)})
        >>> print(caught[0].message)
        rules that look across parameters run once per group of parameters with one rule
        structure, and this setup makes 2 such groups: ...
    """
