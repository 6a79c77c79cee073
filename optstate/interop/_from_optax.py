"""optax -> optstate: ``from_optax`` and ``OptaxRule``, an optax transformation kept per unique
parameter (the public face is ``optstate.interop.optax``, whose docstring tells both directions)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax  # type: ignore[import-untyped]

from .. import _arrays
from ..rules._contract import AcrossParameters, Rule
from ..rules._validate import Hyper, check_hyper, static
from ._optax_refusals import refuse_unrunnable

_Injected = optax.InjectStatefulHyperparamsState


# -- optax -> optstate -------------------------------------------------------------------------


class _Transformation:
    """An optax transformation as a field of ``OptaxRule``: equal to another only if it holds the
    same transformation, and shown by the structure of the state it keeps for one parameter. That
    text is the same from one process to the next (the transformation's own ``repr`` shows its
    functions' addresses), so a checkpoint can compare its rule with the one of ``like``."""

    __slots__ = ("described", "probed", "tx")

    def __init__(self, tx: Any, described: str, probed: bool = True) -> None:
        self.tx = tx
        self.described = described
        self.probed = probed  # from_optax ran its update on a probe parameter (else setup does)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Transformation) and bool(self.tx == other.tx)

    def __hash__(self) -> int:
        return hash(self.tx)

    def __repr__(self) -> str:
        return f"<optax transformation keeping {self.described}>"


@dataclass(frozen=True, repr=False)
class OptaxRule(AcrossParameters):
    r"""An optax ``GradientTransformation`` as an optstate rule.

    Made by ``from_optax``, which checks the transformation and reads its hyper-parameters.

    Each unique parameter keeps the optax state ``transformation.init(param)`` of a model that is
    that parameter alone. A step runs ``transformation.update`` once for all the rule's
    parameters that have a gradient, with optax's parameter tree being the list of those
    parameters and its gradient tree their summed gradients; the step is minus optax's update,
    so the new parameter is ``p + u`` exactly as ``optax.apply_updates`` makes it.

    Attributes:
        transformation: the optax transformation (a property; it is part of the static plan, so
            it must be hashable, and two rules are equal only if they hold the same one).
        wrapped: the transformation with a description of the state it keeps, which stands for
            it in messages and checkpoints.
        hyperparams: the numeric hyper-parameters of the ``optax.inject_hyperparams`` wrappers in
            the transformation, as ``(name, value)`` pairs; they are the rule's hyper-parameters,
            which ``optstate.adjust`` changes.

    Examples:
        >>> import numpy as np, optax
        >>> from optstate.interop import optax as ost_optax
        >>> rule = ost_optax.from_optax(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
        >>> type(rule).__name__, rule.hyper()
        ('OptaxRule', {'learning_rate': 0.1})
    """

    final: ClassVar[bool] = True  # optax's update may be a gradient or a step: taken as a step

    wrapped: _Transformation = static()
    hyperparams: tuple[tuple[str, float | None], ...] = static(())

    @property
    def transformation(self) -> Any:
        return self.wrapped.tx

    def __repr__(self) -> str:
        return f"OptaxRule({self.wrapped!r}, hyperparams={self.hyperparams!r})"

    def hyper(self) -> dict[str, Any]:
        return dict(self.hyperparams)

    def structure(self) -> OptaxRule:
        return dataclasses.replace(self, hyperparams=tuple((n, None) for n, _ in self.hyperparams))

    def check_hyper(self, name: str, value: Any) -> bool:
        if name not in dict(self.hyperparams):
            return False
        check_hyper("OptaxRule", name, Hyper(), value, None)
        return True

    def init(self, param: Any) -> Any:
        if _arrays.is_torch(param):
            raise TypeError(
                "an optax rule computes with JAX and cannot train a torch tensor; use an optstate "
                "rule such as optstate.Adam for torch models"
            )
        state = self.transformation.init(param)
        if not self.wrapped.probed:  # from_optax could not run it on its probe: check now
            refuse_unrunnable(self.transformation, state, (tuple(param.shape), param.dtype))
        return state

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        hyper = hypers[0]  # the same for every parameter of the group
        tx = self.transformation
        signature = tuple((tuple(p.shape), jnp.dtype(p.dtype)) for p in params)
        layout = _layout(tx, signature)
        joint = layout.join(states)
        if hyper:
            joint = _with_hyperparams(joint, hyper)
        boxed_grads = [_Param(i, g) for i, g in enumerate(grads)]
        boxed_params = [_Param(i, p) for i, p in enumerate(params)]
        updates, joint = tx.update(boxed_grads, joint, boxed_params)
        if not (
            isinstance(updates, list)
            and len(updates) == len(params)
            and all(isinstance(u, _Param) for u in updates)
        ):
            raise TypeError(
                f"{self.wrapped!r} returned updates of another structure than its gradients: "
                f"{jax.tree_util.tree_structure(updates)}"
            )
        return layout.split(joint, states), [-u.value for u in updates]


def from_optax(transformation: Any) -> OptaxRule:
    """The optstate rule that runs ``transformation``, an ``optax.GradientTransformation``, on
    each unique parameter's summed gradient.

    One optax state is kept per unique parameter, and every step feeds optax all of the rule's
    parameters that have a gradient, as one list: transformations that look across parameters
    (``clip_by_global_norm``, ``apply_if_finite``, ``MultiSteps``) see each tied weight once,
    as if the model held it once. The result equals optax run on the de-duplicated model with
    each tied weight's gradients summed by hand.

    Hyper-parameters: optax keeps its own inside its state. Wrap the transformation in
    ``optax.inject_hyperparams`` and its numeric hyper-parameters become the rule's, under their
    optax names: ``optstate.adjust(state, learning_rate=1e-4)`` changes them between steps
    without recompiling a jitted ``update`` (and may give them an ``optstate.schedules``
    schedule). Those given to ``inject_hyperparams`` as schedules follow optax's own count.

    What differs from optax on a whole model:

    * optax sees a list of the unique parameters, not the model's tree: masks and labels given
      as trees (``optax.masked``, ``optax.multi_transform``) do not fit it; choose rules per
      subtree with ``optstate.setup`` instead (a tree of rules, or a function of the path).
    * A parameter without a gradient at a step keeps its optax state. optax's counters shared
      by all parameters (such as Adam's step count) are kept with every parameter; a step takes
      them from the first parameter that has a gradient.
    * optax computes with JAX: NumPy parameters come back as NumPy arrays but their optax
      states are JAX arrays, and float64 needs ``jax_enable_x64``. Torch tensors are refused.

    Args:
        transformation: an ``optax.GradientTransformation`` (called: ``optax.adam(1e-3)``, not
            ``optax.adam``), hashable.

    Returns:
        An ``OptaxRule`` for ``optstate.setup``.

    Examples:
        >>> import jax.numpy as jnp, optax, optstate as ost
        >>> from optstate.interop import optax as ost_optax
        >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
        >>> rule = ost_optax.from_optax(tx)
        >>> rule.hyper()
        {'b1': 0.9, 'b2': 0.999, 'eps': 1e-08, 'eps_root': 0.0, 'learning_rate': 0.001}
        >>> state = ost.setup(rule, {"w": jnp.ones(3)})
        >>> state = ost.adjust(state, learning_rate=1e-4)

    Refused before any step (here, or at ``setup`` if a probe parameter of shape ``(1,)`` does
    not fit it): an update that needs the loss's value or function (``optax.lbfgs``,
    ``optax.polyak_sgd``, ``optax.contrib.reduce_on_plateau``), and ``optax.lookahead``.

    Raises:
        TypeError: ``transformation`` is not an optax transformation (an uncalled factory
            such as ``optax.adam``, an optstate rule), is not hashable, or is refused (above).
    """
    if isinstance(transformation, Rule):
        raise TypeError(
            f"{transformation!r} is already an optstate rule: pass it to optstate.setup as it is"
        )
    init = getattr(transformation, "init", None)
    step = getattr(transformation, "update", None)
    if not (callable(init) and callable(step)):
        hint = ""
        if callable(transformation):
            name = getattr(transformation, "__name__", repr(transformation))
            hint = f" (the function {name} makes one: call it, e.g. {name}(1e-3))"
        raise TypeError(
            "from_optax expects an optax.GradientTransformation (with init and update), such as "
            f"optax.adam(1e-3); got {transformation!r} of type "
            f"{type(transformation).__name__}{hint}"
        )
    try:
        hash(transformation)
    except TypeError:
        raise TypeError(
            f"{transformation!r} cannot be hashed, and a rule is part of the state's static "
            "plan; pass an optax.GradientTransformation (a NamedTuple of two functions)"
        ) from None
    try:  # the state of a probe parameter shows the hyper-parameters and describes the state
        probe = transformation.init(jnp.zeros((1,), jnp.float32))
    except Exception:  # a transformation for other parameters: setup checks it instead
        described = getattr(transformation.init, "__qualname__", type(transformation).__name__)
        return OptaxRule(_Transformation(transformation, described, probed=False))
    refuse_unrunnable(transformation, probe, ((1,), jnp.dtype(jnp.float32)))
    described = str(jax.tree_util.tree_structure(probe)).removeprefix("PyTreeDef(")[:-1]
    return OptaxRule(_Transformation(transformation, described), _injected_hyperparams(probe))


def _injected_hyperparams(probe: Any) -> tuple[tuple[str, float], ...]:
    """The numeric hyper-parameters of every ``inject_hyperparams`` node of an optax state (a
    name that two nodes give different values is left out: it could not be told apart)."""
    found: dict[str, float] = {}
    clashing: set[str] = set()
    for node in _injected_nodes(probe):
        for name in sorted(set(node.hyperparams) - set(node.hyperparams_states)):
            value = float(str(np.asarray(node.hyperparams[name])[()]))  # 0.9, not 0.89999997
            if found.get(name, value) != value:
                clashing.add(name)
            found[name] = value
    return tuple((n, v) for n, v in found.items() if n not in clashing)


def _injected_nodes(tree: Any) -> list[Any]:
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, _Injected))
    return [x for x in leaves if isinstance(x, _Injected)]


def _with_hyperparams(joint: Any, hyper: dict[str, Any]) -> Any:
    """The joint optax state with the rule's hyper-parameters written into its
    ``inject_hyperparams`` nodes, each in the dtype optax keeps it in."""

    def write(node: Any) -> Any:
        if not isinstance(node, _Injected):
            return node
        values = dict(node.hyperparams)
        for name, value in hyper.items():
            if name in values and name not in node.hyperparams_states:
                values[name] = jnp.asarray(value).astype(jnp.asarray(values[name]).dtype)
        return node._replace(hyperparams=values)

    return jax.tree_util.tree_map(write, joint, is_leaf=lambda x: isinstance(x, _Injected))


@jax.tree_util.register_pytree_node_class
class _Param:
    """One unique parameter in the tree optax sees: a node whose only child is the parameter (or
    its gradient, update or a piece of its optax state) and whose static data is its index, so
    that the pieces of the joint optax state that belong to each parameter can be found."""

    __slots__ = ("index", "value")

    def __init__(self, index: int, value: Any) -> None:
        self.index = index
        self.value = value

    def tree_flatten(self) -> tuple[tuple[Any], int]:
        return (self.value,), self.index

    @classmethod
    def tree_unflatten(cls, index: int, children: Any) -> _Param:
        return cls(index, *children)

    def __repr__(self) -> str:
        return f"parameter {self.index}: {self.value!r}"


def _is_param(x: Any) -> bool:
    return isinstance(x, _Param)


class _Layout(NamedTuple):
    """How per-parameter optax states make the joint state of several parameters, and back.

    Flattened with ``_Param`` nodes kept whole, an optax state is a sequence of *items*: shared
    leaves (counters, injected hyper-parameters) and ``_Param`` nodes, each holding the pieces of
    one parameter. ``items`` describes the joint state's sequence: ``None`` for a shared leaf,
    ``(i, treedef)`` for a piece of parameter ``i``; ``alone[i]`` the sequence of parameter
    ``i``'s own state (``None`` shared, else how many leaves its piece has).
    """

    treedef: Any
    items: tuple[tuple[int, Any] | None, ...]
    alone: tuple[tuple[int | None, ...], ...]

    def join(self, states: list[Any]) -> Any:
        """The joint optax state of the parameters whose own states are ``states``."""
        split = [self._pieces(i, s) for i, s in enumerate(states)]
        shared = iter(split[0][0])  # the first parameter's counters stand for all
        pieces = [iter(own) for _, own in split]
        items = [
            next(shared)
            if item is None
            else _Param(item[0], item[1].unflatten(next(pieces[item[0]])))
            for item in self.items
        ]
        return self.treedef.unflatten(items)

    def split(self, joint: Any, like: list[Any]) -> list[Any]:
        """Each parameter's own optax state, cut out of the joint state."""
        items, treedef = jax.tree_util.tree_flatten(joint, is_leaf=_is_param)
        if treedef != self.treedef:
            raise TypeError(
                "the optax transformation returned a state of another structure than its init: "
                f"{treedef}, expected {self.treedef}"
            )
        shared = [x for x, item in zip(items, self.items, strict=True) if item is None]
        pieces: list[list[list[Any]]] = [[] for _ in like]
        for x, item in zip(items, self.items, strict=True):
            if item is not None:
                pieces[item[0]].append(jax.tree_util.tree_leaves(x.value))
        out = []
        for i, old in enumerate(like):
            own, common = iter(pieces[i]), iter(shared)
            leaves = [
                leaf
                for kind in self.alone[i]
                for leaf in ([next(common)] if kind is None else next(own))
            ]
            structure: Any = jax.tree_util.tree_structure(old)
            out.append(structure.unflatten(leaves))
        return out

    def _pieces(self, i: int, state: Any) -> tuple[list[Any], list[list[Any]]]:
        """Parameter ``i``'s own state as its shared leaves and the leaves of its pieces."""
        leaves = jax.tree_util.tree_leaves(state)
        expected = sum(1 if n is None else n for n in self.alone[i])
        if len(leaves) != expected:
            raise TypeError(
                f"an optax state in the optstate State has {len(leaves)} arrays where the "
                f"transformation's init makes {expected}: a state of another transformation?"
            )
        shared: list[Any] = []
        own: list[list[Any]] = []
        at = 0
        for n in self.alone[i]:
            if n is None:
                shared.append(leaves[at])
                at += 1
            else:
                own.append(leaves[at : at + n])
                at += n
        return shared, own


def _abstract(transformation: Any, signature: tuple[Any, ...]) -> tuple[list[Any], Any]:
    """The items and structure of the state optax makes for parameters of these shapes and
    dtypes, each wrapped in a ``_Param`` (no arrays are made)."""
    params = [
        _Param(i, jax.ShapeDtypeStruct(s, d))  # type: ignore[no-untyped-call]
        for i, (s, d) in enumerate(signature)
    ]
    state = jax.eval_shape(transformation.init, params)
    items, treedef = jax.tree_util.tree_flatten(state, is_leaf=_is_param)
    return items, treedef


def _shape(x: Any) -> tuple[tuple[int, ...], Any]:
    return tuple(x.shape), x.dtype


@functools.lru_cache(maxsize=256)
def _alone(transformation: Any, one: Any) -> tuple[list[Any], list[Any], tuple[int | None, ...]]:
    """For a parameter of shape and dtype ``one`` alone: the shapes of the shared leaves of its
    optax state, the structures of its pieces, and its item sequence (see ``_Layout``)."""
    items, _ = _abstract(transformation, (one,))
    shared = [_shape(x) for x in items if not _is_param(x)]
    pieces = [jax.tree_util.tree_structure(x.value) for x in items if _is_param(x)]
    sequence = tuple(
        len(jax.tree_util.tree_leaves(x.value)) if _is_param(x) else None for x in items
    )
    return shared, pieces, sequence


@functools.lru_cache(maxsize=128)
def _layout(transformation: Any, signature: tuple[Any, ...]) -> _Layout:
    """The layout of the joint optax state of parameters of these shapes and dtypes, checked
    against the state optax makes for each parameter alone."""
    items, treedef = _abstract(transformation, signature)
    joint_items = tuple(
        (x.index, jax.tree_util.tree_structure(x.value)) if _is_param(x) else None for x in items
    )
    joint_shared = [_shape(x) for x in items if not _is_param(x)]
    alone = []
    for i, one in enumerate(signature):
        shared, pieces, sequence = _alone(transformation, one)
        mine = [item[1] for item in joint_items if item is not None and item[0] == i]
        if shared != joint_shared or pieces != mine:
            raise TypeError(
                f"{transformation!r} keeps a state that is not made parameter by parameter (its "
                "shared part, or a parameter's part, depends on the other parameters), so it "
                "cannot be kept per parameter; write the optimiser as an optstate rule instead"
            )
        alone.append(sequence)
    return _Layout(treedef, joint_items, tuple(alone))
