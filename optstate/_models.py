"""Model kinds: models that are not a pytree of arrays, and gradients that are not given as the
model's tree.

The core (``setup``, ``update``, ``retie``, ``eval_params``, the checkpoints) asks this registry
and names no kind itself. A kind registers from its own module: ``optstate.interop._torch_kind``
for ``torch.nn.Module`` and torch tensors, ``optstate.implicit`` for its ``Grads``; the public
face (``optstate/__init__.py``) imports both. A kind tells whether a value is of it without
importing its library, so that ``import optstate`` imports no optional package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GradientForm",
    "ModelKind",
    "TensorHooks",
    "model_kind",
    "positions",
    "register",
    "structural",
    "tensor_hooks",
]


@dataclass(frozen=True)
class ModelKind:
    """A model that is read as a pytree of positions (``positions``) and stepped by its own
    ``update(state, model, grads, in_place)``, which returns ``(state, model)``."""

    name: str
    matches: Callable[[Any], bool]
    positions: Callable[[Any], Any]
    update: Callable[[Any, Any, Any, bool], tuple[Any, Any]]


@dataclass(frozen=True)
class GradientForm:
    """Gradients in another form than the model's tree (``Grads``, keyed by array): ``to_tree``
    makes ``(grads, model)`` the structural gradient ``update`` takes."""

    name: str
    matches: Callable[[Any], bool]
    to_tree: Callable[[Any, Any], Any]


@dataclass(frozen=True)
class TensorHooks:
    """What the arrays of one library add to a step whose parameters are theirs (``owns``):
    ``prepare(model, grads)`` before the gradients are paired with positions (names left out of
    a dict), ``check(plan, bases, per_position, model)`` after (a total counted twice, a layout
    the rules cannot read), returning the gradients per position."""

    name: str
    owns: Callable[[Any], bool]
    prepare: Callable[[Any, Any], Any]
    check: Callable[[Any, list[Any], list[Any], Any], list[Any]]


_KINDS: list[ModelKind] = []
_FORMS: list[GradientForm] = []
_HOOKS: list[TensorHooks] = []


def register(entry: ModelKind | GradientForm | TensorHooks) -> None:
    """Add a model kind, a gradient form or tensor hooks (once per name)."""
    table: list[Any] = (
        _KINDS
        if isinstance(entry, ModelKind)
        else _FORMS
        if isinstance(entry, GradientForm)
        else _HOOKS
    )
    if all(e.name != entry.name for e in table):
        table.append(entry)


def model_kind(model: Any) -> ModelKind | None:
    """The registered kind of ``model``, or ``None`` for a pytree of arrays."""
    return next((kind for kind in _KINDS if kind.matches(model)), None)


def positions(model: Any) -> Any:
    """``model`` as the pytree its tie plan is made over (a module as its named parameters)."""
    kind = model_kind(model)
    return model if kind is None else kind.positions(model)


def structural(grads: Any, model: Any) -> Any:
    """``grads`` as the model's tree, from any registered gradient form."""
    form = next((f for f in _FORMS if f.matches(grads)), None)
    return grads if form is None else form.to_tree(grads, model)


def tensor_hooks(bases: list[Any]) -> TensorHooks | None:
    """The hooks of the library whose arrays ``bases`` (a model's parameters) are, if any."""
    return next((h for h in _HOOKS if any(h.owns(b) for b in bases)), None)
