"""Clipping: element-wise and by norm, applied to a parameter's summed gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._contract import AcrossParameters, Rule
from ._numerics import abs2, cast, isdtype, namespace, real_dtype, scalars, wide_dtype
from ._validate import hyper, static


@dataclass(frozen=True)
class ClipGrad(Rule):
    r"""Element-wise clipping: ``ClipGrad(delta=10.0)``.

    .. math:: g \leftarrow \min(\max(g, -\delta), \delta)

    with :math:`\delta` = ``delta``; for complex gradients the real and imaginary parts are clipped
    separately. Passes the clipped gradient on, so it goes first in an ``OptimiserChain``.
    Reproduces ``optax.clip(delta)`` and Optimisers.jl's ``ClipGrad``. A tied parameter is clipped
    after its gradients are summed.

    Args:
        delta: :math:`\delta`, the bound of every element.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.ClipGrad(1.5), ost.Descent(0.1)), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # g clipped to [1, -1.5]
        (array([0.9 , 2.15]), True)
    """

    delta: float = hyper(10.0, min=0)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        (delta,) = scalars(xp, real_dtype(xp, grad), hyper["delta"])
        if isdtype(xp, grad.dtype, "complex floating"):
            re = xp.clip(xp.real(grad), -delta, delta)
            im = xp.clip(xp.imag(grad), -delta, delta)
            one_j = xp.asarray(1j, dtype=grad.dtype)
            return state, cast(re, grad.dtype) + one_j * cast(im, grad.dtype)
        return state, xp.clip(grad, -delta, delta)


def _norm_order(p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float):
        raise TypeError(f"must be a positive number or math.inf, got {p!r}")
    if not p > 0:
        raise ValueError(f"must be a positive number or math.inf, got {p!r}")


@dataclass(frozen=True)
class ClipNorm(Rule):
    r"""Clipping by norm, per parameter: ``ClipNorm(max_norm=10.0, p=2)``.

    .. math:: g \leftarrow g \cdot \min\left(1, \frac{c}{\lVert g \rVert_p}\right)

    with :math:`c` = ``max_norm`` and :math:`\lVert g \rVert_p` the ``p``-norm of the whole summed
    gradient of one parameter (``p`` may be ``math.inf``). A gradient within the bound passes
    unchanged. Reproduces ``optax.clip_by_global_norm(max_norm)`` applied to one parameter at a
    time, and Optimisers.jl's ``ClipNorm``.

    Args:
        max_norm: :math:`c`, the largest norm passed on.
        p: the order of the norm (``math.inf`` for the largest element).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.ClipNorm(1.0), ost.Descent(1.0)), model)
        >>> grads = {"enc": np.array([1.5, 2.0]), "dec": np.array([1.5, 2.0])}  # g = [3, 4]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # g = [3, 4] / 5, the sum clipped
        (array([0.4, 1.2]), True)

    Reference: Pascanu et al., *On the difficulty of training recurrent neural networks*
    (ICML 2013).
    """

    max_norm: float = hyper(10.0, min=0)
    p: float = static(2, check=_norm_order)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        (bound,) = scalars(xp, real_dtype(xp, grad), hyper["max_norm"])
        order = math.inf if self.p == math.inf else self.p
        norm = xp.linalg.vector_norm(grad, ord=order)
        # bound / max(norm, bound) is exactly 1 within the bound and never divides by zero.
        scale = bound / xp.maximum(norm, bound)
        return state, grad * cast(xp.asarray(scale), grad.dtype)


@dataclass(frozen=True)
class ClipGlobalNorm(AcrossParameters):
    r"""Clipping by the norm of all parameters together: ``ClipGlobalNorm(max_norm)``.

    .. math::
        g_k \leftarrow g_k \cdot \min\left(1, \frac{c}{\sqrt{\sum_j \lVert g_j \rVert_2^2}}\right)

    with :math:`c` = ``max_norm`` and the sum over every unique parameter this rule applies to,
    each with its summed gradient: a tied parameter counts once, as it would if it appeared once.
    Within a chain the norm is taken of the gradients as they reach this rule. Squares are summed
    in at least float32. Reproduces ``optax.clip_by_global_norm(max_norm)`` (and
    ``torch.nn.utils.clip_grad_norm_`` but for the ``1e-6`` torch adds to the norm).

    Args:
        max_norm: :math:`c`, the largest global norm passed on.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.ClipGlobalNorm(1.0), ost.Descent(1.0)), model)
        >>> grads = {"enc": np.array([1.5, 2.0]), "dec": np.array([1.5, 2.0])}  # g = [3, 4]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # norm 5, the tie counted once
        (array([0.4, 1.2]), True)

    Reference: Pascanu et al., *On the difficulty of training recurrent neural networks*
    (ICML 2013).
    """

    max_norm: float = hyper(min=0)

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        hyper = hypers[0]  # the same for every parameter of the group
        xp = namespace(grads[0])
        wide = wide_dtype(xp, xp.float32, *grads)
        squares = [xp.sum(abs2(xp, cast(g, _widened(xp, g, wide)))) for g in grads]
        norm = xp.sqrt(xp.sum(xp.stack([cast(s, wide) for s in squares])))
        (bound,) = scalars(xp, wide, hyper["max_norm"])
        scale = bound / xp.maximum(norm, bound)
        return states, [g * cast(scale, g.dtype) for g in grads]


def _widened(xp: Any, g: Any, wide: Any) -> Any:
    """``g``'s dtype with at least ``wide``'s precision (complex stays complex)."""
    if isdtype(xp, g.dtype, "complex floating"):
        return xp.complex128 if wide == xp.float64 else g.dtype
    return wide
