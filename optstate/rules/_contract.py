"""The rule contract, and the small array helpers rules share.

A rule is a frozen dataclass. It knows nothing of trees or ties: it sees one parameter and its
summed gradient at a time, and turns them into the *step* that is subtracted from the parameter,
``p_new = p - step`` (so ``Descent`` returns ``lr * g``).

* ``hyper()``: the hyper-parameters, a small tree of numbers. ``setup`` stores them in the state as
  0-d arrays, so they can change between compiled steps without recompiling.
* ``init(param)``: the rule's state for one parameter (a tuple of arrays, possibly empty).
* ``apply(hyper, state, param, grad)``: ``(new_state, step)``. It reads hyper-parameters from
  ``hyper``, never from ``self``, and computes with the functions of the arrays' own namespace
  (``xp = namespace(grad)``), so one implementation serves NumPy, JAX and PyTorch.

``update`` calls ``update_all`` once per rule with every parameter that has a gradient this step.
By default it applies ``apply`` to each and subtracts the step; a rule that looks across
parameters (``ClipGlobalNorm``, ``SkipNonFinite``) overrides ``apply_all``, and one that makes the
new parameter itself (``MixedPrecision``) overrides ``update_all``.

``update_`` on mutable arrays (NumPy, torch) computes every new value with ``apply``, then
writes the new parameters into the arrays they have, all at once. Where a rule's group is the
step's only one, the optional ``fused_`` may instead step it in place with the array library's
fused kernel (``Adam``, ``AdamW``, ``AdaGrad`` on torch: ``_fused``), whose arithmetic is the
reference's own. The rule's arithmetic lives once, in ``apply``: the tests check that the fused
kernels agree with it.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from .._arrays import cast, is_numpy, is_torch, namespace
from .._schedules import MAX_STEP, Schedule
from ._validate import Hyper, Member, Static, check_hyper, declaration

__all__ = ["Rule", "cast", "namespace"]


class Rule:
    """Base class of every rule: a frozen dataclass whose fields are its hyper-parameters.

    Subclasses are written ``@dataclass(frozen=True) class MyRule(Rule): ...`` with the two members
    of the contract, ``init`` and ``apply``; the module docstring has the rest. Fields are
    hyper-parameters unless declared ``static``; ``hyper(default, min=..., below=...)`` declares a
    range, which is checked here when the rule is made and by ``adjust``.

    Examples:
        >>> from dataclasses import dataclass
        >>> import numpy as np, optstate as ost
        >>> from optstate.rules import hyper
        >>> @dataclass(frozen=True)
        ... class SignDescent(ost.Rule):  # p - lr sign(g); no state, so no init
        ...     lr: float = hyper(0.1, min=0)
        ...
        ...     def apply(self, hyper, state, param, grad):
        ...         return state, hyper["lr"] * np.sign(grad)
        >>> w = np.array([1.0, 2.0])
        >>> state = ost.setup(SignDescent(), {"enc": w, "dec": w})
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, {"enc": w, "dec": w}, grads)
        >>> model["enc"], model["dec"] is model["enc"]
        (array([0.9, 2.1]), True)
        >>> SignDescent(lr=-1.0)
        Traceback (most recent call last):
        ...
        ValueError: SignDescent(lr=...) must be in [0, inf), got -1
    """

    # A rule that looks across all the parameters of its group (it defines ``apply_all``): its own
    # hyper-parameters are then the same for all of them.
    across: ClassVar[bool] = False
    # A rule that must wrap every other (it cannot stand inside a chain or another wrapper).
    outermost: ClassVar[bool] = False
    # A rule whose step is a whole update, not a transformed gradient that another rule could
    # take as its gradient: it can only end a chain (``from_optax``'s, whose optax update may be
    # either, and is taken as an update).
    final: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field, declared in _declarations(type(self)):
            value = getattr(self, field.name)
            if isinstance(declared, Member):
                for v in value if declared.many else (value,):
                    check_member(v, name)
            elif isinstance(declared, Static):
                if declared.check is not None:
                    try:
                        declared.check(value)
                    except (TypeError, ValueError) as err:
                        raise type(err)(f"{name}({field.name}=...) {err}") from None
            else:
                check_hyper(name, field.name, declared, value, field.default)

    # -- the contract ------------------------------------------------------------------------

    def init(self, param: Any) -> Any:
        """The rule's state for one parameter: a tuple or NamedTuple of arrays (``()`` for none)."""
        del param
        return ()

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        """``(new_state, step)`` for one parameter and its summed gradient; ``p - step`` is the new
        parameter. ``hyper`` holds the hyper-parameters at this step (schedules evaluated), as
        0-d arrays keyed by field name; read them there, never from ``self``."""
        raise NotImplementedError(f"{self.name()} does not define apply")

    # -- optional: documented apart (docs/rules.md, "Writing a rule") ---------------------------

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """``apply`` for every parameter of this rule's group at once: ``(new_states, steps)``.
        ``hypers[i]`` is parameter ``i``'s. A rule that looks across parameters overrides it
        (and sets ``across = True``; its own hyper-parameters are the same in every
        ``hypers[i]``)."""
        out = [
            self.apply(h, s, p, g) for h, s, p, g in zip(hypers, states, params, grads, strict=True)
        ]
        return [new for new, _ in out], [step for _, step in out]

    def update_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """``(new_states, new_params)``: the steps of ``apply_all`` subtracted, dtypes kept. A rule
        that makes the new parameter itself (``MixedPrecision``) overrides it."""
        states, steps = self.apply_all(hypers, states, params, grads)
        return states, [cast(p - step, p.dtype) for p, step in zip(params, steps, strict=True)]

    def ready(self, state: Any) -> Any:
        """``None``, or a 0-d boolean computed from the new state: ``False`` while the rule is
        still gathering (``AccumGrad``). An ``OptimiserChain`` then holds the rules after it."""
        del state
        return None

    def fused_(self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]) -> bool:
        """Step these parameters in place with one fused kernel, if the arrays allow it, and say
        whether it did (no rule can, unless it says so). Called only when this rule's group,
        with one variant of hyper-parameters, is all the step writes: the kernel's one call is
        then the step, and if it raises, nothing was written (counts raised before it are
        lowered again)."""
        del hyper, states, params, grads
        return False

    # -- what the walk asks of a rule (containers override these) ------------------------------

    def members(self) -> tuple[Rule, ...]:
        """The rules this one holds (a chain's, a wrapper's: its ``member()`` fields), in order."""
        out: list[Rule] = []
        for field, declared in _declarations(type(self)):
            if isinstance(declared, Member):
                value = getattr(self, field.name)
                out.extend(value if declared.many else (value,))
        return tuple(out)

    def hyper(self) -> Any:
        """The hyper-parameters, a small tree of numbers and schedules: the values of the fields
        that are not static, by name."""
        return {
            field.name: getattr(self, field.name)
            for field, declared in _declarations(type(self))
            if isinstance(declared, Hyper)
        }

    def structure(self) -> Rule:
        """The rule with its hyper-parameters taken out (``None``) and its members' likewise: the
        static part of a state, hashable and compared by value."""
        out = copy.copy(self)
        for field, declared in _declarations(type(self)):
            value = getattr(self, field.name)
            if isinstance(declared, Member):
                value = tuple(v.structure() for v in value) if declared.many else value.structure()
            elif isinstance(declared, Hyper):
                value = None
            object.__setattr__(out, field.name, value)
        return out

    def clocks(self) -> Any:
        """The shape of this rule's schedule clocks: one step count (``0``) for a rule, a tuple of
        its members' for a chain. A schedule of the rule is evaluated at its clock: the number of
        steps this rule has taken (not counting steps gathered by ``AccumGrad`` or skipped by
        ``SkipNonFinite``)."""
        return 0

    def tick(self, clock: Any, before: list[Any], after: list[Any]) -> Any:
        """The clocks after a step that took the rule states of its group from ``before`` to
        ``after`` (the parameters that had a gradient). A rule takes every step it is given."""
        del before, after
        return increment(clock)

    def looks_across(self) -> bool:
        """This rule or one of its members looks across parameters."""
        return type(self).across or any(m.looks_across() for m in self.members())

    def shared(self) -> frozenset[str]:
        """The names of the hyper-parameters that must be equal for all parameters of a group: the
        own hyper-parameters of the rules that look across parameters."""
        own = frozenset(self.hyper()) if type(self).across and not self.members() else frozenset()
        return own.union(*(m.shared() for m in self.members()))

    def group_key(self) -> Any:
        """Parameters whose rules have equal keys share one group: the same structure, and the same
        values where a member looks across parameters. Within a group other hyper-parameters may
        differ from parameter to parameter (per-subtree rules, ``adjust`` of a subset)."""
        own = self.hyper() if type(self).across and not self.members() else None
        return (self.structure(), _frozen(own), tuple(m.group_key() for m in self.members()))

    def check_hyper(self, name: str, value: Any) -> bool:
        """Check ``value`` for every hyper-parameter called ``name`` in this rule or its members, as
        a new value given to ``adjust``; whether any has that name."""
        found = False
        for field, declared in _declarations(type(self)):
            if field.name == name and isinstance(declared, Hyper):
                check_hyper(type(self).__name__, name, declared, value, field.default)
                found = True
        for member in self.members():
            found = member.check_hyper(name, value) or found
        return found

    def name(self) -> str:
        return type(self).__name__


class AcrossParameters(Rule):
    """A rule that looks at all its parameters together: it defines ``apply_all``, and ``apply``
    is that for a single parameter."""

    across: ClassVar[bool] = True

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        (new,), (step,) = self.apply_all([hyper], [state], [param], [grad])
        return new, step

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        raise NotImplementedError


Declared = tuple[tuple[dataclasses.Field[Any], Hyper | Static | Member], ...]
_declared: dict[type, Declared] = {}


def _declarations(cls: type) -> Declared:
    """The dataclass fields of a rule class and what each was declared as (cached per class)."""
    found = _declared.get(cls)
    if found is None:
        fields = dataclasses.fields(cls) if dataclasses.is_dataclass(cls) else ()
        found = _declared[cls] = tuple((f, declaration(f)) for f in fields if f.init)
    return found


def _frozen(tree: Any) -> Any:
    """A hashable stand-in for a tree of hyper-parameter values (arrays by identity)."""
    if tree is None:
        return None
    if isinstance(tree, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in tree.items()))
    if isinstance(tree, tuple | list):
        return tuple(_frozen(v) for v in tree)
    try:
        hash(tree)
    except TypeError:
        return ("unhashable", id(tree))
    return tree


def increment(count: Any) -> Any:
    """``count + 1`` for a step count, saturating at ``2**31 - 1`` instead of wrapping (as optax's
    counts do): a run that long keeps its last schedule value and bias correction."""
    if is_torch(count):  # eager: a comparison of one number, cheaper than the array functions
        return count + 1 if int(count) < MAX_STEP else count.clone()
    if is_numpy(count):
        return np.array(count + 1 if int(count) < MAX_STEP else count, dtype=count.dtype)
    xp = namespace(count)
    top = xp.asarray(MAX_STEP - 1, dtype=count.dtype)
    return xp.asarray(xp.minimum(count, top) + xp.asarray(1, dtype=count.dtype))


def check_member(rule: Any, container: str) -> None:
    """``rule`` may stand inside ``container`` (a chain or a wrapper), or a TypeError says why."""
    if not isinstance(rule, Rule):
        raise TypeError(
            f"{container} takes optstate rules, got {rule!r} of type {type(rule).__name__}"
        )
    if type(rule).outermost:
        raise TypeError(
            f"{rule.name()} must be the outermost rule, not inside {container}: wrap it around"
        )


def _is_hyper(value: Any) -> bool:
    return isinstance(value, Schedule) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool)
    )
