"""Clipping: element-wise and by norm, applied to a parameter's summed gradient."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._base import (
    AcrossParameters,
    Rule,
    abs2,
    cast,
    finfo,
    isdtype,
    namespace,
    real_dtype,
    scalars,
)
from ._validate import hyper, static


@dataclass(frozen=True)
class ClipGrad(Rule):
    r"""Element-wise clipping: ``ClipGrad(delta=10.0)``.

    .. math:: g \leftarrow \min(\max(g, -\delta), \delta)

    with :math:`\delta` = ``delta``; for complex gradients the real and imaginary parts are clipped
    separately. Passes the clipped gradient on, so it goes first in an ``OptimiserChain``.
    Reproduces ``optax.clip(delta)`` and Optimisers.jl's ``ClipGrad``. A tied parameter is clipped
    after its gradients are summed.
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

    Reference: Pascanu et al., *On the difficulty of training recurrent neural networks*
    (ICML 2013).
    """

    max_norm: float = hyper(min=0)

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        hyper = hypers[0]  # the same for every parameter of the group
        xp = namespace(grads[0])
        wide = xp.float64 if any(finfo(xp, g.dtype).bits >= 64 for g in grads) else xp.float32
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
