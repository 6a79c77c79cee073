"""torch's fused optimiser kernels: one call steps every parameter, moment and count of a group.

``torch.optim.Adam(fused=True)``, ``AdamW(fused=True)`` and ``Adagrad(fused=True)`` run one
kernel (``torch._fused_adam_``, ``torch._fused_adamw_``, ``torch._fused_adagrad_``) that reads
each element of a parameter, its gradient and its moments once and writes the new ones: the
fastest form on CPU and GPU. ``update_`` uses them for ``Adam``, ``AdamW`` and ``AdaGrad``
(``Rule.fused_``) where the tensors allow it (``fits``), and where that rule's group is the step's
only one (the kernel's one call is then the step's only write, so a failure changes nothing).

The kernels are called as ``torch.optim`` calls them: ``maximize=False``, ``amsgrad=False``, no
``grad_scale`` or ``found_inf``, and the step counts as float tensors on the parameters' device,
counted one up before the call (torch adds one to its own counts before the kernel). optstate's
counts are int32 tensors: they are raised by one before the call and lowered again if it fails;
the CPU kernels take them as they are, other devices' as float32 copies.
torch is never imported here: only used once the program has imported it.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

from . import _inplace

FLOATS = ("float16", "bfloat16", "float32", "float64")


def fits(
    params: Sequence[Any], grads: Sequence[Any], moments: Sequence[Sequence[Any]], counts: Any
) -> bool:
    """One fused call can step these: torch tensors of one device and one floating dtype (the
    parameters, their gradients and every moment, ``moments`` holding one list per kind),
    dense and contiguous, writable; int32 step counts; and no memory shared between a gradient
    and what the kernel writes, nor between two written tensors (the kernel reads each element
    once, so it must not be written by the step before it is read).

    The parameters and gradients are checked at every call (the model's tensors are the user's to
    change between steps). A rule state's tensors, its moments and counts, are its own: they are
    checked the first time they are seen, and afterwards recognised (by weak reference) as the
    same tensors, which the kernel wrote in place (``_state_storages``)."""
    torch = sys.modules.get("torch")
    if torch is None or not params or not isinstance(params[0], torch.Tensor):
        return False
    dtype = params[0].dtype
    if dtype not in _dtypes(torch) or torch.is_inference_mode_enabled():
        return False
    device = None if params[0].is_cpu else params[0].device  # (the CPU: no device objects)
    if not _all_fit(torch, (*params, *grads), dtype, device):
        return False
    if any(p.is_inference() for p in params):  # written only in inference mode
        return False
    state = _state_storages(torch, [x for kind in moments for x in kind], counts, dtype, device)
    if state is None:
        return False
    written = {p.untyped_storage().data_ptr() for p in params}
    if len(written) != len(params) or not written.isdisjoint(state):
        return False
    read = {g.untyped_storage().data_ptr() for g in grads}
    return written.isdisjoint(read) and state.isdisjoint(read)


def _all_fit(torch: Any, tensors: Sequence[Any], dtype: Any, device: Any) -> bool:
    """Torch tensors of ``dtype``, contiguous, on ``device`` (``None``: the CPU). (A sparse
    tensor is not contiguous; real dtypes have no conjugate or negative bit.)"""
    tensor = torch.Tensor
    if device is None:
        return all(
            isinstance(x, tensor) and x.dtype is dtype and x.is_contiguous() and x.is_cpu
            for x in tensors
        )
    return all(
        isinstance(x, tensor) and x.dtype is dtype and x.is_contiguous() and x.device == device
        for x in tensors
    )


class _Checked(NamedTuple):
    """A rule state's tensors that fit the kernel, and their storages."""

    refs: tuple[weakref.ref[Any], ...]  # the moments, then the counts
    dtype: Any
    device: Any
    storages: frozenset[int]  # the moments'


# Checked rule states, by the id of their first tensor. An entry goes when that tensor does.
_CHECKED: dict[int, _Checked] = {}


def _state_storages(
    torch: Any, moments: list[Any], counts: Sequence[Any], dtype: Any, device: Any
) -> frozenset[int] | None:
    """The storages of a rule state's moments, if they and its counts fit the kernel beside
    parameters of ``dtype`` on ``device``: moments as ``_all_fit`` and in storages of their own,
    counts int32 tensors. ``None`` if not.

    A step that fuses writes the state's tensors in place and returns them in the new state, so
    the next step sees the same tensors: they are checked once, and then known by weak reference
    (touching none of them, which on a large model costs more than the kernel's own reading of
    their headers). Only in-place changes of their type or layout (``mu.t_()``, ``mu.data = x``)
    would go unseen, and a state's tensors are not the user's to change: a state with other
    tensors (``load_state_dict``, ``copy.deepcopy``, a replaced moment) is checked again."""
    tensors = (*moments, *counts)
    if not tensors:
        return None
    key = id(tensors[0])
    known = _CHECKED.get(key)
    if (
        known is not None
        and known.dtype is dtype
        and known.device == device
        and len(known.refs) == len(tensors)
        and all(ref() is x for ref, x in zip(known.refs, tensors, strict=True))
    ):
        return known.storages
    if not _all_fit(torch, moments, dtype, device):
        return None
    int32 = torch.int32
    if not all(isinstance(c, torch.Tensor) and c.dtype is int32 for c in counts):
        return None
    storages = frozenset(x.untyped_storage().data_ptr() for x in moments)
    if len(storages) != len(moments):
        return None

    def forget(_: Any) -> None:
        _CHECKED.pop(key, None)

    refs = (weakref.ref(tensors[0], forget), *(weakref.ref(x) for x in tensors[1:]))
    _CHECKED[key] = _Checked(refs, dtype, device, storages)
    return storages


def _steps(counts: list[Any], device: Any) -> list[Any]:
    """The counts after this step as the kernel reads them. The CPU kernels read each step
    tensor as a number whatever its dtype, so there the int32 counts are passed as they are
    (tests/test_fused.py checks them against torch.optim, past 2**24 included). Other devices'
    kernels read float32 tensors on ``device``: one is made per distinct count, and shared."""
    if device.type == "cpu":
        return counts
    torch = sys.modules["torch"]
    made: dict[int, Any] = {}
    out = []
    for t in _inplace.values(counts):
        if t not in made:
            made[t] = torch.tensor(float(t), dtype=torch.float32, device=device)
        out.append(made[t])
    return out


def adam_(
    params: list[Any],
    grads: list[Any],
    mus: list[Any],
    nus: list[Any],
    counts: list[Any],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float | None,
) -> None:
    """One Adam step in place (AdamW's with ``decay``, Adam's with ``None``)."""
    torch = sys.modules["torch"]
    kernel = torch._fused_adam_ if decay is None else torch._fused_adamw_
    _inplace.count_(counts, 1)
    try:
        kernel(
            params, grads, mus, nus, [], _steps(counts, params[0].device),
            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2, weight_decay=decay or 0.0,
            eps=eps, maximize=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
    except BaseException:
        _inplace.count_(counts, -1)
        raise


def adagrad_(
    params: list[Any],
    grads: list[Any],
    sums: list[Any],
    counts: list[Any],
    *,
    lr: float,
    lr_decay: float,
    eps: float,
) -> None:
    """One AdaGrad step in place."""
    torch = sys.modules["torch"]
    _inplace.count_(counts, 1)
    try:
        torch._fused_adagrad_(
            params, grads, sums, _steps(counts, params[0].device),
            lr=lr, lr_decay=lr_decay, weight_decay=0.0, eps=eps, maximize=False,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
    except BaseException:
        _inplace.count_(counts, -1)
        raise


def _dtypes(torch: Any) -> tuple[Any, ...]:
    return tuple(getattr(torch, name) for name in FLOATS)
