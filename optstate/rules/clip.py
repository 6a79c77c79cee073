"""Clipping: element-wise and by norm, applied to a parameter's summed gradient."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ._base import Rule, cast, namespace, real_dtype, scalars


@dataclass(frozen=True)
class ClipGrad(Rule):
    r"""Element-wise clipping: ``ClipGrad(delta=10.0)``.

    .. math:: g \leftarrow \min(\max(g, -\delta), \delta)

    with :math:`\delta` = ``delta``; for complex gradients the real and imaginary parts are clipped
    separately. Passes the clipped gradient on, so it goes first in an ``OptimiserChain``.
    Reproduces ``optax.clip(delta)`` and Optimisers.jl's ``ClipGrad``. A tied parameter is clipped
    after its gradients are summed.
    """

    delta: float = 10.0
    hyper_names: ClassVar[tuple[str, ...]] = ("delta",)

    def __post_init__(self) -> None:
        self._check()

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        (delta,) = scalars(xp, real_dtype(xp, grad), hyper["delta"])
        if xp.isdtype(grad.dtype, "complex floating"):
            re = xp.clip(xp.real(grad), -delta, delta)
            im = xp.clip(xp.imag(grad), -delta, delta)
            one_j = xp.asarray(1j, dtype=grad.dtype)
            return state, cast(re, grad.dtype) + one_j * cast(im, grad.dtype)
        return state, xp.clip(grad, -delta, delta)


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

    max_norm: float = 10.0
    p: float = 2
    hyper_names: ClassVar[tuple[str, ...]] = ("max_norm",)

    def __post_init__(self) -> None:
        self._check()
        if not (isinstance(self.p, int | float) and self.p > 0):
            raise ValueError(
                f"ClipNorm(p=...) must be a positive number or math.inf, got {self.p!r}"
            )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        (bound,) = scalars(xp, real_dtype(xp, grad), hyper["max_norm"])
        order = math.inf if self.p == math.inf else self.p
        norm = xp.linalg.vector_norm(grad, ord=order)
        # bound / max(norm, bound) is exactly 1 within the bound and never divides by zero.
        scale = bound / xp.maximum(norm, bound)
        return state, grad * cast(xp.asarray(scale), grad.dtype)
