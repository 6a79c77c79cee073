"""PyTorch: ``nn.Module`` models, the two ways PyTorch hands out gradients, and ``Optimizer``.

``Optimizer(module, rule)`` is a ``torch.optim.Optimizer`` for the usual loop (``zero_grad``,
``backward``, ``step``, learning-rate schedulers, ``state_dict``); it steps with
``grad_totals`` and ``optstate.update_``.

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
  names, for the module and for a named dict of its tensors alike (``named_grads``).
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

Examples:
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

from ._torch_bridge import grad_totals as grad_totals
from ._torch_bridge import parameters as parameters
from ._torch_optimizer import Optimizer as Optimizer

__all__ = ["Optimizer", "grad_totals", "parameters"]
