"""``load``: the file's plan and every array record checked against ``like`` (when given) before
any array is read; then the arrays read, the state and model rebuilt with their ties."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax

from .. import _arrays, _models
from .._positions import check_model, check_structure, place
from .._state import Plan, State
from .._transpose import is_transpose
from .._walk import flatten, unwrap
from ..schedules import Schedule
from ._archive import Reader, open_checkpoint
from ._codec import CheckpointError, CheckpointMismatchError, Json
from ._kinds import Kind, convert, dtype_text, matches, numpy_dtype
from ._plan import compare_plans, like_params, params, plan_meta, slots
from ._trees import describe, first_difference, needs_like, treedef
from ._values import OpaqueError, build_rule, decode, same


class _Missing:
    pass


_MISSING: Any = _Missing()

Read = Callable[[Reader], Any]  # a value to read once every record has been checked


def _array(reader: Reader, index: int, where: str, target: Any) -> Read:
    """Array ``index``, to be read as ``target``'s kind: checked now against ``target`` (an array
    of ``like``) if there is one, so that a record that does not fit ``like`` is refused before
    anything is read."""
    r = reader.record(index)
    if _arrays.is_torch(target) and target.device.type == "meta":
        raise CheckpointMismatchError(
            f"{reader.path}: like's {where} is on the meta device, which holds no values: build "
            "like where the values are to go (module.to_empty(device=...) for a module made on "
            "the meta device)"
        )
    if not isinstance(target, Kind) and not matches(r.shape, r.dtype, target):
        raise CheckpointMismatchError(
            f"{reader.path}: {where} is {r.text} in the file, "
            f"{dtype_text(target.dtype)}{list(target.shape)} in like"
        )
    return lambda reader: convert(reader.array(index, where), target, where)


def _tree(reader: Reader, record: Json, like: Any, where: str, kind: Kind, strict: bool) -> Read:
    """A tree of the state: the structure of ``like`` (with its arrays' kinds and shardings) when
    it is the same, else rebuilt from the file, which ``strict`` forbids when there is a ``like``
    (rule states must agree, hyper-parameters may have changed)."""
    desc, indices = record["tree"], record["arrays"]
    like_leaves: list[Any] | None = None
    structure: Any
    if like is not _MISSING and same(desc, describe(like)):
        like_leaves, structure = jax.tree_util.tree_flatten(like)
    else:
        try:
            structure = treedef(desc, where)
        except OpaqueError as err:
            if like is _MISSING:
                raise needs_like(err) from None
            raise CheckpointMismatchError(
                f"{reader.path}: {first_difference(desc, describe(like), where)}"
            ) from None
        if strict and like is not _MISSING:
            raise CheckpointMismatchError(
                f"{reader.path}: {first_difference(desc, describe(like), where)}"
            )
    if structure.num_leaves != len(indices):
        raise CheckpointError(f"{reader.path}: {where} does not have its recorded leaves")
    flat, _ = jax.tree_util.tree_flatten_with_path(structure.unflatten([0] * len(indices)))
    reads = [
        _array(
            reader,
            index,
            where + jax.tree_util.keystr(p),
            kind if like_leaves is None else like_leaves[i],
        )
        for i, (index, (p, _)) in enumerate(zip(indices, flat, strict=True))
    ]
    return lambda reader: structure.unflatten([read(reader) for read in reads])


def _split_like(like: Any) -> tuple[State | None, Any]:
    if like is None:
        return None, _MISSING
    if isinstance(like, State):
        return like, _MISSING
    if isinstance(like, tuple | list) and len(like) == 2 and isinstance(like[0], State):
        return like[0], like[1]
    raise TypeError(
        "like must be a State (e.g. optstate.setup(rule, model)) or a pair (state, model), "
        f"got {type(like).__name__}"
    )


def load(path: str | os.PathLike[str], like: Any = None) -> Any:
    """Read a checkpoint written by ``save``: a ``State``, or ``(state, model)`` if the file
    holds a model.

    ``like`` is what the checkpoint should fit: a ``State`` (say ``optstate.setup(rule, model)``
    for a freshly built model) or a pair ``(state, model)``. The file must be for the same model
    structure, ties, parameter shapes and dtypes and rules, or ``CheckpointMismatchError`` names
    the first path that differs. The loaded arrays take the kind of their counterparts in
    ``like``: JAX arrays with the same sharding (so loading onto a mesh is ``like`` built on that
    mesh), torch tensors on the same device (requiring a gradient where ``like``'s do), or NumPy
    arrays. What changed during training comes from the file: the moments, the step count, the
    hyper-parameters (also a schedule that ``adjust`` put in place of a number), frozen flags and
    rules split by ``adjust``. A model's leaves that are not arrays or plain values (functions,
    objects) come from ``like``'s model. A torch ``nn.Module`` in ``like`` stands for its
    named-parameter dict: that dict of new tensors is what comes back (``like``'s module is not
    changed; ``module.load_state_dict(params, strict=False)`` copies them into it).

    The model comes back with its ties as ``setup`` saw them: one array object at every position
    of a parameter, re-wrapped in ``Transpose`` where there was one, and as a view of the one
    array (NumPy or torch) where there was a view.

    Without ``like``, everything comes back as NumPy arrays, whatever kind was saved (JAX arrays
    or torch tensors too), and the structures are rebuilt from the file: dicts, lists, tuples,
    ``None``, ``Transpose``, optstate's rules, rule states and schedules. A model or rule of
    another package (an Equinox module, your own rule class) cannot be rebuilt without pickle:
    the error asks for ``like``. Classes of other packages are never imported on a file's say-so.

    Nothing is decompressed before the archive's directory and every array's record agree, and
    nothing is allocated beyond what the records declare; with ``like``, every record is also
    checked against ``like`` before any array is read, so a file cannot make ``load`` allocate
    more than ``like`` holds. Every array is checked (``.npy`` header, size, CRC-32) and
    everything is built before ``load`` returns: an error never leaves a half-loaded state, and
    ``like`` is only read, never changed. See docs/checkpoints.md for the order of the checks.

    Args:
        path: the checkpoint file.
        like: ``None``, a ``State``, or a pair ``(state, model)`` that the file must fit; the
            loaded arrays take the kind, device and sharding of their counterparts in it.

    Returns:
        The ``State``, or ``(state, model)`` if the file holds a model.

    Examples:
        >>> import os, tempfile, numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}                       # one parameter, two positions
        >>> state, model = ost.update(ost.setup(ost.Momentum(0.5), model), model,
        ...                           {"enc": np.ones(2), "dec": np.ones(2)})
        >>> with tempfile.TemporaryDirectory() as d:
        ...     ost.save(os.path.join(d, "ckpt.npz"), state, model)
        ...     fresh = {"enc": np.zeros(2)}
        ...     fresh["dec"] = fresh["enc"]
        ...     like = (ost.setup(ost.Momentum(0.5), fresh), fresh)
        ...     state2, model2 = ost.load(os.path.join(d, "ckpt.npz"), like=like)
        >>> model2["enc"], model2["dec"] is model2["enc"], int(state2.step)
        (array([0., 1.]), True, 1)

    Raises:
        CheckpointError: not a checkpoint; truncated or corrupted; an archive whose members
            declare more than their records, or members the metadata does not record (or lacks,
            or names twice); a newer format version; a structure only ``like`` can give.
            ``CheckpointMismatchError`` (a subclass): the file does not fit ``like``.
        FileNotFoundError: no such file.
        TypeError: ``like`` is neither a ``State`` nor a ``(state, model)`` pair.
    """
    path = os.fspath(path)
    like_state, like_model = _split_like(like)
    with open_checkpoint(path) as reader:
        meta = reader.meta
        plan = _load_plan(reader, meta["plan"], like_state)
        kind = Kind(like_state.step if like_state is not None else None)
        states = []
        for k, record in enumerate(meta["state"]["states"]):
            like_tree = like_state.states[k] if like_state is not None else _MISSING
            states.append(_tree(reader, record, like_tree, f"state.states[{k}]", kind, True))
        step_like = like_state.step if like_state is not None else kind
        step = _array(reader, meta["state"]["step"], "state.step", step_like)
        hyper = _hyper(reader, plan, like_state, kind)
        clocks = _clocks(reader, plan, like_state, kind, step)
        if len(states) != len(plan.params):
            raise CheckpointError(f"{path}: the state does not match its own tie plan")
        model = None
        if meta["model"] is not None:
            model = _model(reader, meta["model"], plan, like_model, kind)
        # Every record has been checked: now the arrays are read.
        state = State(
            [s(reader) for s in states],
            [tuple(v(reader) for v in variants) for variants in hyper],
            [c(reader) for c in clocks],
            step(reader),
            plan,
        )
        return state if model is None else (state, model(reader))


def _hyper(reader: Reader, plan: Plan, like_state: State | None, kind: Kind) -> list[list[Read]]:
    """Each rule group's variants of hyper-parameters (one per group in a version 1 file), checked
    against the plan: every parameter's variant is one of its group's."""
    records = reader.meta["state"]["hyper"]
    if reader.meta["version"] < 2:
        records = [[record] for record in records]
    if len(records) != len(plan.rules) or any(
        not isinstance(variants, list) or not variants for variants in records
    ):
        raise CheckpointError(f"{reader.path}: the hyper-parameters do not match the tie plan")
    for k, (r, v) in enumerate(zip(plan.param_rules, plan.param_variants, strict=True)):
        if r >= 0 and not 0 <= v < len(records[r]):
            raise CheckpointError(
                f"{reader.path}: parameter {k} uses variant {v} of its rule group's "
                f"hyper-parameters, which has {len(records[r])}"
            )
    out = []
    for r, variants in enumerate(records):
        like_tree = _MISSING  # version 1: the file's trees (other step dtypes), like's kind
        if like_state is not None and reader.meta["version"] >= 2:  # like's group's first variant
            like_tree = like_state.hyper[like_state.plan.param_rules[plan.groups[r][0]]][0]
        reads = [
            _tree(reader, record, like_tree, f"state.hyper[{r}][{v}]", kind, False)
            for v, record in enumerate(variants)
        ]
        if reader.meta["version"] < 2:
            reads = [_integer_steps(read) for read in reads]
        out.append(reads)
    return out


def _integer_steps(read: Read) -> Read:
    """A version 1 tree of hyper-parameters, its schedules' step counts made int32 as version 2
    keeps them (version 1 stored them as floats)."""

    def steps(value: Any) -> Any:
        return _arrays.namespace(value).astype(value, _arrays.namespace(value).int32)

    def convert(leaf: Any) -> Any:
        return leaf.map_numbers(lambda v: v, steps) if isinstance(leaf, Schedule) else leaf

    def reread(reader: Reader) -> Any:
        tree = read(reader)
        return jax.tree_util.tree_map(convert, tree, is_leaf=lambda x: isinstance(x, Schedule))

    return reread


def _clocks(
    reader: Reader, plan: Plan, like_state: State | None, kind: Kind, step: Read
) -> list[Read]:
    """Each rule group's schedule clocks; for a version 1 file, the step count (version 1
    evaluated every schedule at it)."""
    if reader.meta["version"] < 2:
        return [_copies(rule.clocks(), step) for rule in plan.rules]
    records = reader.meta["state"].get("clocks")
    if not isinstance(records, list) or len(records) != len(plan.rules):
        raise CheckpointError(f"{reader.path}: the clocks do not match the tie plan")
    out = []
    for r, record in enumerate(records):
        like_tree = _MISSING
        if like_state is not None:
            like_tree = like_state.clocks[like_state.plan.param_rules[plan.groups[r][0]]]
        out.append(_tree(reader, record, like_tree, f"state.clocks[{r}]", kind, True))
    return out


def _copies(shape: Any, step: Read) -> Read:
    """A clock tree of ``shape`` holding copies of the step count (no array twice in a state,
    which donation would refuse)."""

    def read(reader: Reader) -> Any:
        count = step(reader)
        xp = _arrays.namespace(count)
        return jax.tree_util.tree_map(lambda _: xp.asarray(count, copy=True), shape)

    return read


def _load_plan(reader: Reader, file_plan: Json, like_state: State | None) -> Plan:
    file_slots, file_params = slots(file_plan), params(file_plan)
    param_rules = tuple(int(r) for r in file_plan["param_rules"])
    frozen = tuple(bool(f) for f in file_plan["frozen"])
    default = [0 if r >= 0 else -1 for r in param_rules]  # version 1: one variant per group
    variants = tuple(int(v) for v in file_plan.get("param_variants", default))
    if len(variants) != len(param_rules):
        raise CheckpointError(f"{reader.path}: a variant per parameter is missing from the plan")
    if like_state is None:
        try:
            structure = treedef(file_plan["tree"], "model", is_transpose)
            rules = tuple(build_rule(r) for r in file_plan["rules"])
        except OpaqueError as err:
            raise needs_like(err) from None
        return Plan(structure, file_slots, file_params, rules, param_rules, frozen, variants)
    like_plan = like_state.plan
    compare_plans(reader.path, file_plan, plan_meta(like_plan))
    # Rules come from like (the same structures, checked above), grouped as in the file.
    first = {r: k for k, r in reversed(list(enumerate(param_rules)))}  # each rule's 1st param
    if sorted(first) != list(range(-1 if -1 in first else 0, len(file_plan["rules"]))):
        raise CheckpointError(f"{reader.path}: a rule without parameters in the tie plan")
    rules = tuple(
        like_plan.rules[like_plan.param_rules[first[r]]] for r in range(len(file_plan["rules"]))
    )
    # Parameters as in the file too (see ``like_params``).
    file_params = like_params(file_params, like_plan)
    saved = (file_params, rules, param_rules, frozen, variants)
    if saved == (
        like_plan.params,
        like_plan.rules,
        like_plan.param_rules,
        like_plan.frozen,
        like_plan.param_variants,
    ):
        return like_plan
    return like_plan.replace(
        params=file_params,
        rules=rules,
        param_rules=param_rules,
        frozen=frozen,
        param_variants=variants,
    )


def _model(reader: Reader, record: Json, plan: Plan, like_model: Any, kind: Kind) -> Read:
    """The model to read: each parameter's record checked against the plan and ``like``'s model,
    each other leaf's against ``like``'s, before anything is read."""
    names = reader.meta["plan"]["positions"]
    like_leaves: list[Any] | None = None
    if like_model is not _MISSING:
        like_model = _models.positions(like_model)  # a module as its named parameters
        like_leaves, like_def = flatten(like_model)
        check_structure(plan, like_def, like_model)
    if len(record["leaves"]) != len(plan.slots):
        raise CheckpointError(f"{reader.path}: the model does not have its recorded leaves")
    bases = [
        _param(reader, index, names[p.primary], p, like_leaves, kind)
        for p, index in zip(plan.params, record["params"], strict=True)
    ]
    like_at = [_MISSING] * len(plan.slots) if like_leaves is None else like_leaves
    leaves = [
        _leaf(reader, entry, like_at[pos], names[pos], kind)
        for pos, entry in enumerate(record["leaves"])
    ]
    return lambda reader: _rebuild(reader, plan, [b(reader) for b in bases], leaves)


def _param(
    reader: Reader, index: int, where: str, param: Any, like_leaves: list[Any] | None, kind: Kind
) -> Read:
    r = reader.record(index)
    if r.shape != param.shape or r.dtype != numpy_dtype(param.dtype):
        raise CheckpointError(f"{reader.path}: {where} does not match the tie plan")
    if like_leaves is None:
        return _array(reader, index, where, kind)
    target = unwrap(like_leaves[param.primary])[0]
    if not _arrays.is_trainable(target):
        raise CheckpointMismatchError(
            f"{reader.path}: like's model holds {type(target).__name__} at {where}, where "
            "like's state (and the file) have a parameter"
        )
    if not matches(r.shape, r.dtype, target):
        raise CheckpointMismatchError(
            f"{reader.path}: like's model holds {dtype_text(target.dtype)}"
            f"{list(target.shape)} at {where}, but like's state (and the file) {r.text}"
        )
    return _array(reader, index, where, target)


def _leaf(reader: Reader, entry: Json, like_leaf: Any, where: str, kind: Kind) -> Read:
    """A position that is not a parameter's (``None`` for one that is: placed from the
    parameter's array)."""
    if entry is None:
        return lambda reader: None
    if "value" in entry:
        value = decode(entry["value"])
        return lambda reader: value
    if "key" in entry:
        index, impl = entry["key"], entry["impl"]
        reader.record(index)

        def key(reader: Reader) -> Any:
            data = reader.array(index, where)
            keys = jax.random.wrap_key_data(jax.numpy.asarray(data), impl=impl)
            if _arrays.is_jax(like_leaf) and like_leaf.shape == keys.shape:
                return jax.device_put(keys, like_leaf.sharding)
            return keys

        return key
    if "array" in entry:
        index, r = entry["array"], reader.record(entry["array"])
        if entry.get("scalar"):
            return lambda reader: reader.array(index, where)[()]
        same_shape = hasattr(like_leaf, "shape") and tuple(like_leaf.shape) == r.shape
        target = like_leaf if same_shape else kind
        return lambda reader: convert(reader.array(index, where), target, where)
    if like_leaf is _MISSING:
        raise CheckpointError(
            f"{where} held a {entry['opaque']}, which a checkpoint does not store: load with "
            "like=(state, model) to take it from a freshly built model"
        )
    return lambda reader: like_leaf


def _rebuild(reader: Reader, plan: Plan, bases: list[Any], leaves: list[Read]) -> Any:
    """The model: its other leaves read, each parameter's one array placed at its positions."""
    new_leaves = place(plan, [leaf(reader) for leaf in leaves], bases, [True] * len(bases))
    model = plan.treedef.unflatten(new_leaves)
    try:
        check_model(plan, new_leaves, bases, model)
    except ValueError as err:
        raise CheckpointError(f"{reader.path}: the model does not fit its tie plan: {err}") from err
    return model
