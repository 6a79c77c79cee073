"""The PyTorch bridge's workings: modules read as their named parameters, ``.grad`` totals, the
gradient conventions checked, and a module stepped (the public names are in
``optstate.interop.torch``, whose docstring tells how PyTorch is trained)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import _arrays
from .._errors import StructureError
from .._state import Plan, State
from .._ties import find_ties
from .._transpose import Transpose
from .._update import step
from .._walk import flatten, path_string, path_strings, unwrap, wrap
from ._dtensor import check_not_dtensor, dtensor_type

__all__ = [
    "check_partials",
    "checked_gradients",
    "grad_totals",
    "named_grads",
    "named_parameters",
    "parameters",
    "update_module",
]


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """The model that optstate trains for ``module``: its Parameters by name, every name of a
    tied Parameter included (``dict(module.named_parameters(remove_duplicate=False))``).

    Buffers are not parameters. A Parameter with ``requires_grad=False`` is one, but it only
    steps when it is given a gradient; leave it out with a rule of ``None`` in ``setup`` to keep
    no state for it.

    Args:
        module: the ``torch.nn.Module`` (a ``DistributedDataParallel`` wrapper's names carry its
            ``module.`` prefix).

    Returns:
        A dict from every parameter name to its Parameter; a tied Parameter is the same object
        under each of its names.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``; a parameter is a ``DTensor`` (FSDP2).

    Examples:
        >>> import torch
        >>> from optstate.interop import torch as ost_torch
        >>> net = torch.nn.Linear(3, 2)
        >>> {name: tuple(p.shape) for name, p in ost_torch.parameters(net).items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    return _no_dtensors(named_parameters(module))


def named_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """``parameters`` without its checks: the walk each step makes of a module that ``setup``
    (through ``parameters``) has read already."""
    if type(module).named_parameters is not _NAMED_PARAMETERS:
        return dict(module.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    if not _named(module, "", out):  # a module that walks its children its own way
        return dict(module.named_parameters(remove_duplicate=False))
    return out


def _no_dtensors(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if dtensor_type() is not None:  # only once torch's DTensor module is in use
        for name, p in params.items():
            check_not_dtensor(p, f"model[{name!r}]")
    return params


_NAMED_PARAMETERS = nn.Module.named_parameters
_NAMED_MODULES = nn.Module.named_modules


def _named(module: nn.Module, prefix: str, out: dict[str, torch.Tensor]) -> bool:
    """``named_parameters(remove_duplicate=False)`` into ``out``, walked directly (it runs on every
    step, and torch's generators cost more than the step's own arithmetic on a small model):
    the module's own Parameters, then each child's, depth first. ``False`` if a module overrides
    ``named_modules``, whose walk this would not follow."""
    if type(module).named_modules is not _NAMED_MODULES:
        return False
    for name, p in module._parameters.items():
        if p is not None:
            out[prefix + name] = p
    for name, child in module._modules.items():
        if child is not None and not _named(child, f"{prefix}{name}.", out):
            return False
    return True


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

    Args:
        model: an ``nn.Module``, or a tree of tensors (leaf tensors and views of them).

    Returns:
        The totals in the structure ``update`` takes for ``model``: a dict by name for a module,
        the tree's own structure otherwise.

    Examples:
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
    if isinstance(model, nn.Module):
        # Parameters that are no views share no memory: a tie is one Parameter object at several
        # names, and each is a leaf with its own .grad (the fast path of every step).
        given: set[int] = set()
        totals: dict[str, Any] = {}
        for name, p in named_parameters(model).items():
            if p._base is not None:  # a view: the general walk below
                break
            key = id(p)
            if key in given:
                totals[name] = None
            else:
                given.add(key)
                totals[name] = p.grad
        else:
            return totals
    tree = named_parameters(model) if isinstance(model, nn.Module) else model
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
    params = named_parameters(module)
    by_name = _by_name(params, grads)
    if in_place and not torch.is_inference_mode_enabled():
        for name, p in params.items():
            if p.is_inference():
                raise ValueError(
                    f"model[{name!r}] is an inference tensor (made under torch.inference_mode), "
                    "which cannot be written outside inference mode; update_ writes into the "
                    "module's Parameters"
                )
        state, _ = step(state, params, by_name, in_place=True, donate=False)
        return state, module
    return step(state, params, by_name, in_place=False, donate=False)


def _by_name(
    params: Mapping[str, torch.Tensor], grads: Any, owner: str = "the module"
) -> dict[str, Any]:
    """A module's gradients as a dict over all its parameter names, ``None`` where none is given."""
    if grads is None:
        return dict.fromkeys(params)
    if type(grads) is dict and grads.keys() == params.keys():  # (grad_totals' own dict)
        return grads
    if not isinstance(grads, Mapping):
        raise TypeError(
            "the gradients of an nn.Module are a dict from its parameter names to tensors (what "
            "torch.func.grad returns over parameters(module), or grad_totals(module)); got "
            f"{type(grads).__name__}"
        )
    unknown = [name for name in grads if name not in params]
    if unknown:
        raise StructureError(
            f"grads has names that are not parameters of {owner}: {unknown[:5]}; its "
            f"parameters are {list(params)[:8]}{' ...' if len(params) > 8 else ''}"
        )
    return {name: grads.get(name) for name in params}


def named_grads(model: Any, grads: Any) -> Any:
    """The gradients of a named dict of tensors (``parameters(module)``, or any flat dict from
    names to tensors) with every name the gradient dict leaves out given as ``None``.

    Such a dict is trained as its module is: a name missing from the gradients is a parameter
    with no gradient, which does not step (``torch.optim`` skips a Parameter whose ``.grad`` is
    ``None``), and a tied name missing beside its twin adds nothing to the twin's gradient.
    Any other model, and a gradient that is not a dict, is returned as it is (its structure is
    checked against the model's by ``update``)."""
    if not (isinstance(model, Mapping) and isinstance(grads, Mapping)):
        return grads
    if model.keys() <= grads.keys():  # every name given (the module's own path comes here)
        return grads
    if not all(isinstance(k, str) and _arrays.is_torch(v) for k, v in model.items()):
        return grads
    return _by_name(model, grads, "the model")


def checked_gradients(
    plan: Plan, bases: list[Any], per_position: list[Any], model: Any
) -> list[Any]:
    """The gradients of a model of torch tensors, checked (``check_partials``, and none on the
    meta device), with sparse ones made dense. Called by ``update`` and ``update_``.

    A sparse gradient (``nn.Embedding(sparse=True)``) is stepped as its dense equal: the rules
    are those of ``torch.optim.Adam`` and its kin on a dense gradient, whose moments decay in
    every row (``torch.optim.SparseAdam``'s lazy updates of the given rows only are another
    algorithm)."""
    check_partials(plan, bases, per_position, model)
    out = per_position
    tensor, strided = torch.Tensor, torch.strided
    for pos, leaf in enumerate(per_position):
        g, depth = unwrap(leaf) if isinstance(leaf, Transpose) else (leaf, 0)
        if not isinstance(g, tensor):
            continue
        if g.is_meta:
            raise ValueError(
                f"the gradient at {path_string(model, pos, 'grads')} is a tensor on the meta "
                f"device ({g.dtype}{list(g.shape)}), which has no values; compute it on the "
                "parameter's device"
            )
        if g.layout is not strided:
            if out is per_position:
                out = list(per_position)
            out[pos] = wrap(g.to_dense(), depth)
    return out


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
        and g.layout == torch.strided
        and total.layout == torch.strided
        and _arrays.has_memory(g)
        and _arrays.view_permutation(total, g) is not False
    )
