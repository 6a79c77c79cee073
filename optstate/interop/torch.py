"""PyTorch: ``nn.Module`` models, the two ways PyTorch hands out gradients, and ``Optimizer``.

``Optimizer(module, rule)`` is a ``torch.optim.Optimizer`` for the usual loop (``zero_grad``,
``backward``, ``step``, learning-rate schedulers, ``state_dict``); it is defined in
``_torch_optimizer`` and steps with what this module provides.

optstate trains torch tensors as it trains NumPy and JAX arrays: the same rules, through the
tensors' array-API namespace, eagerly and outside autograd (``torch.no_grad()``), each result on
its parameter's device and in its dtype. ``setup``, ``update`` and ``update_`` also take an
``nn.Module``, which they read as its named-parameter dict (``parameters``): a Parameter
registered under two names (``head.weight = emb.weight``) is one parameter at two positions.
A dict of tensors is a model too, and there a view of a tensor (``W.t()``, ``W.permute(...)``)
is a tie, recognised from its memory as NumPy views are.

**Two gradient conventions.** ``update`` adds up the gradients of every position of a parameter,
so what it is given must say which kind of gradient it is:

* *Partial gradients*, one per name (structural): what ``torch.func.grad`` returns for
  ``functional_call(module, params, args, tie_weights=False)`` over ``parameters(module)``. Pass
  the dict as it is; optstate sums the tied names. A dict that leaves names out (as ``torch.func``
  gives for the de-duplicated ``dict(module.named_parameters())``) means no gradient at those
  names.
* *Totals*, one per Parameter: ``.grad`` after ``loss.backward()``, which autograd has already
  summed over every use. Pass ``grad_totals(model)``, which puts each total at **one** position
  and ``None`` at the others, so it is counted once. A dict that gives a Parameter's ``.grad``
  at two of its names (``{n: p.grad for n, p in named_parameters(remove_duplicate=False)}``)
  would count it twice, and ``update`` refuses it.

**In place or pure.** ``update_(state, module, grads)`` writes the new values into the module's
Parameters (``copy_`` under ``torch.no_grad()``: the same Parameter objects, still tied, still
registered with the module) and returns ``(state, module)``. ``update(state, module, grads)``
leaves the module alone and returns ``(state, new)``, where ``new`` is the named-parameter dict
of new tensors (one tensor for all names of a tied Parameter, requiring a gradient where the old
one did), for ``torch.func.functional_call(module, new, args)``.

Example:
    >>> import torch, optstate as ost
    >>> from optstate.interop import torch as ost_torch
    >>> lm = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False))
    >>> lm[1].weight = lm[0].weight                  # tied input and output embedding
    >>> list(ost_torch.parameters(lm))
    ['0.weight', '1.weight']
    >>> state = ost.setup(ost.Adam(0.1), lm)
    >>> state
    State(Adam; 1 parameters, 1 tied)
    >>> lm(torch.tensor([0, 3])).logsumexp(-1).sum().backward()
    >>> state, lm = ost.update_(state, lm, ost_torch.grad_totals(lm))
    >>> lm[1].weight is lm[0].weight
    True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import _arrays
from .._errors import StructureError
from .._state import Plan, State
from .._ties import find_ties
from .._update import _step
from .._walk import flatten, path_string, path_strings, unwrap, wrap
from ._torch_optimizer import Optimizer as Optimizer

__all__ = ["Optimizer", "grad_totals", "parameters"]


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model that optstate trains for ``module``: its Parameters by name, every name of a
    tied Parameter included (``dict(module.named_parameters(remove_duplicate=False))``).

    Buffers are not parameters. A Parameter with ``requires_grad=False`` is one, but it only
    steps when it is given a gradient; leave it out with a rule of ``None`` in ``setup`` to keep
    no state for it.

    Example:
        >>> import torch
        >>> from optstate.interop import torch as ost_torch
        >>> net = torch.nn.Linear(3, 2)
        >>> {name: tuple(p.shape) for name, p in ost_torch.parameters(net).items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    params: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        check_not_dtensor(p, f"model[{name!r}]")
    return params


@functools.cache
def _dtensor_type() -> type | tuple[()]:
    """``DTensor``, or ``()`` (what ``isinstance`` never matches) where torch has no
    distributed package."""
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.tensor import DTensor

    return DTensor


def check_not_dtensor(x: Any, where: str) -> None:
    """Refuse a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard`` or by tensor
    parallelism): it is a wrapper without memory of its own, which optstate's tie detection reads
    (see docs/pytorch.md, "Several processes")."""
    if isinstance(x, _dtensor_type()):
        placements = tuple(getattr(x, "placements", ()))
        raise TypeError(
            f"{where} is a DTensor (placements {placements}), as FSDP2's fully_shard "
            "or tensor parallelism makes parameters; optstate does not train DTensors: it finds "
            "ties from tensors' memory, which a DTensor does not have. Train the module "
            "under DistributedDataParallel (replicated parameters), or see docs/pytorch.md"
        )


def grad_totals(model: nn.Module | Any) -> Any:
    """The ``.grad`` totals of ``model``'s tensors, in the form that ``update`` counts once: each
    leaf tensor's ``.grad`` at one of its positions and ``None`` at every other position.

    After ``loss.backward()`` a leaf tensor's ``.grad`` holds its **total** gradient, summed by
    autograd over every use, tied names and views included. ``update`` adds up the gradients of a
    parameter's positions, so a total must sit at one position only: this function puts each
    leaf tensor's ``.grad`` at the first position holding that tensor and ``None`` everywhere
    else, views included (a view keeps no ``.grad``: its gradient is in its base's). ``model`` is
    an ``nn.Module`` (the result is a dict by parameter name, as ``parameters``) or any tree of
    tensors (the result has its structure). A parameter whose ``.grad`` is ``None`` gets
    ``None``: it does not step, as in ``torch.optim``.

    Example:
        >>> import torch
        >>> from optstate.interop import torch as ost_torch
        >>> W = torch.ones(2, 3, requires_grad=True)
        >>> model = {"enc": W, "dec": W.t()}            # one parameter, seen transposed
        >>> x = torch.ones(1, 2)
        >>> (x @ model["enc"] @ model["dec"]).sum().backward()
        >>> totals = ost_torch.grad_totals(model)
        >>> totals["dec"] is None, totals["enc"] is W.grad
        (True, True)

    Raises:
        ValueError: a parameter's tensor was computed (not a leaf, and not a view of one in the
            model), so autograd keeps no ``.grad`` for it.
        TieError: two tensors overlap in memory in a way that is not a tie (as in ``setup``).
    """
    tree = parameters(model) if isinstance(model, nn.Module) else model
    leaves, treedef = flatten(tree)
    slots, _ = find_ties(leaves, lambda: path_strings(tree))
    tensors = [unwrap(leaf) for leaf in leaves]
    has_leaf = {  # the parameters held somewhere as an autograd leaf, which keeps the .grad
        slot.param
        for slot, (x, _) in zip(slots, tensors, strict=True)
        if slot is not None and _arrays.is_torch(x) and x.is_leaf
    }
    out: list[Any] = [None] * len(leaves)
    seen: set[int] = set()
    for pos, (slot, (x, depth)) in enumerate(zip(slots, tensors, strict=True)):
        if slot is None or not _arrays.is_torch(x) or id(x) in seen:
            continue  # not a parameter, NumPy or JAX (no .grad), or this tensor's total is given
        seen.add(id(x))
        if x.is_leaf:
            out[pos] = None if x.grad is None else wrap(x.grad, depth)
        elif not (_arrays.is_view(x) and slot.param in has_leaf):
            what = (
                "a view of a tensor that is not in the model"
                if _arrays.is_view(x)
                else (f"computed, grad_fn={type(x.grad_fn).__name__}")
            )
            raise ValueError(
                f"{path_string(tree, pos)} is not a leaf tensor ({what}), and autograd keeps "
                ".grad only for leaves. Hold the leaf (an nn.Parameter, or a tensor made with "
                "requires_grad=True) in the model and compute the rest in the loss"
            )
    return treedef.unflatten(out)


def update_module(
    state: State, module: nn.Module, grads: Any, *, in_place: bool
) -> tuple[State, Any]:
    """``update`` (``in_place=False``) or ``update_`` on an ``nn.Module``: the module read as its
    named-parameter dict, ``grads`` a dict by name. Returns ``(state, new_parameters_dict)`` or,
    in place, ``(state, module)``."""
    params = parameters(module)
    by_name = _by_name(params, grads)
    if in_place:
        for name, p in params.items():
            if not _arrays.writable(p):
                raise ValueError(
                    f"model[{name!r}] is an inference tensor (made under torch.inference_mode), "
                    "which cannot be written outside inference mode; update_ writes into the "
                    "module's Parameters"
                )
        state, _ = _step(state, params, by_name, in_place=True, donate=False)
        return state, module
    return _step(state, params, by_name, in_place=False, donate=False)


def _by_name(params: dict[str, torch.Tensor], grads: Any) -> dict[str, Any]:
    """A module's gradients as a dict over all its parameter names, ``None`` where none is given."""
    if grads is None:
        return dict.fromkeys(params)
    if not isinstance(grads, Mapping):
        raise TypeError(
            "the gradients of an nn.Module are a dict from its parameter names to tensors (what "
            "torch.func.grad returns over parameters(module), or grad_totals(module)); got "
            f"{type(grads).__name__}"
        )
    unknown = [name for name in grads if name not in params]
    if unknown:
        raise StructureError(
            f"grads has names that are not parameters of the module: {unknown[:5]}; its "
            f"parameters are {list(params)[:8]}{' ...' if len(params) > 8 else ''}"
        )
    return {name: grads.get(name) for name in params}


def check_partials(plan: Plan, bases: list[Any], per_position: list[Any], model: Any) -> None:
    """Refuse a structural gradient that gives a tied parameter its own ``.grad`` (the total
    autograd accumulated, or a view of it) at two or more positions: ``update`` would count that
    total once per position. Called by ``update`` for models of torch tensors.

    The test is against the parameter's ``.grad`` itself, not against two positions holding one
    tensor: ``torch.func.grad`` legitimately returns one tensor object as the partial gradient of
    two inputs that meet in a sum (``a + b``), and those partials must be added up."""
    for param, base in zip(plan.params, bases, strict=True):
        if len(param.positions) < 2 or not _arrays.is_torch(base) or not base.is_leaf:
            continue
        total = base.grad
        if total is None:
            continue
        holding = [pos for pos in param.positions if _is_view_of(per_position[pos], total)]
        if len(holding) > 1:
            names = [path_string(model, pos, "grads") for pos in holding[:2]]
            raise ValueError(
                f"{names[0]} and {names[1]} both hold the .grad of the parameter at "
                f"{path_string(model, param.primary)}, which is already its total gradient "
                "over every use (autograd summed the tied positions). A structural gradient "
                "gives each position its own partial gradient and optstate adds them up, so "
                f"this total would be counted {len(holding)} times. After loss.backward(), pass "
                "optstate.interop.torch.grad_totals(model), which counts each total once; "
                "with torch.func.grad, pass the dict of partial gradients it returns"
            )


def _is_view_of(g: Any, total: torch.Tensor) -> bool:
    """``g`` is ``total``, or a view of its memory in another orientation (``total.t()``)."""
    g = unwrap(g)[0]
    if g is total:
        return True
    return (
        _arrays.is_torch(g)
        and _arrays.has_memory(g)
        and _arrays.view_permutation(total, g) is not False
    )
