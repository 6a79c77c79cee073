"""PyTorch as a model kind of the core (see ``optstate._models``): an ``nn.Module`` is trained as
its named-parameter dict, and the gradients of torch tensors are read and checked as PyTorch
hands them out. torch itself is imported only once a module or a tensor is seen
(``_torch_bridge``, which needs it)."""

from __future__ import annotations

from typing import Any

from .. import _arrays
from .._models import ModelKind, TensorHooks, register

__all__: list[str] = []


def _positions(module: Any) -> Any:
    from ._torch_bridge import parameters

    return parameters(module)


def _update(state: Any, module: Any, grads: Any, in_place: bool) -> tuple[Any, Any]:
    from ._torch_bridge import update_module

    return update_module(state, module, grads, in_place=in_place)


def _prepare(model: Any, grads: Any) -> Any:
    from ._torch_bridge import named_grads

    return named_grads(model, grads)  # a name left out of a named dict: no gradient


def _check(plan: Any, bases: list[Any], per_position: list[Any], model: Any) -> list[Any]:
    from ._torch_bridge import checked_gradients

    return checked_gradients(plan, bases, per_position, model)


register(ModelKind("torch.nn.Module", _arrays.is_torch_module, _positions, _update))
register(TensorHooks("torch", _arrays.is_torch, _prepare, _check))
