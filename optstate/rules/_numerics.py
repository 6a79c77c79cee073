"""The numerics rules share: dtypes, the precision of scalar arithmetic, complex numbers.

* Scalar precision, one policy: hyper-parameters and what is derived from them (``1 - beta``,
  bias corrections) are computed in ``wide_dtype`` (``float64`` when the parameter or a
  hyper-parameter is, else ``float32``, never less) or, where only the parameter's precision is
  known, ``scalar_dtype`` (the parameter's real dtype, at least ``float32``); only the resulting
  factors are cast to the parameter's dtype (``scalars``).
* Complex parameters, one convention: element-wise rules treat the real and imaginary parts as
  two real parameters (``by_parts``, torch's ``view_as_real``); squared magnitudes use ``abs2``.
* ``mu_dtype``: a first moment stored in another floating dtype (``moment_zeros``), validated
  once, where the field is declared (``_validate.floating_dtype``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import cast, namespace

__all__ = [
    "abs2",
    "by_parts",
    "cast",
    "finfo",
    "full_like",
    "isdtype",
    "moment_zeros",
    "namespace",
    "powers",
    "real_dtype",
    "scalar_dtype",
    "scalars",
    "select",
    "wide_dtype",
]


def finfo(xp: Any, dtype: Any) -> Any:
    """``xp.finfo(dtype)``, also for NumPy arrays of ml_dtypes' 16-bit and 8-bit floats (such as
    bfloat16), which NumPy's own ``finfo`` does not know."""
    try:
        return xp.finfo(dtype)
    except (ValueError, TypeError, AttributeError):
        return jnp.finfo(dtype)  # type: ignore[no-untyped-call]


def isdtype(xp: Any, dtype: Any, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, also for ml_dtypes' floats in NumPy arrays (see ``finfo``)."""
    try:
        return bool(xp.isdtype(dtype, kind))
    except (ValueError, TypeError):
        return bool(jnp.isdtype(dtype, kind))


def moment_zeros(rule: Any, mu_dtype: Any, param: Any) -> Any:
    """The first-moment buffer: zeros in ``mu_dtype``, or in the parameter's dtype for ``None``."""
    xp = namespace(param)
    if mu_dtype is None:
        return xp.zeros_like(param)
    if isdtype(xp, param.dtype, "complex floating"):
        raise TypeError(
            f"{rule.name()}(mu_dtype={mu_dtype!r}) stores the first moment in a real dtype, but "
            f"the parameter is {param.dtype}; use mu_dtype=None for complex parameters"
        )
    if type(mu_dtype).__module__ != "torch":
        mu_dtype = np.dtype(mu_dtype)  # names such as "bfloat16" as dtypes every namespace takes
    return xp.zeros_like(param, dtype=mu_dtype)


def real_dtype(xp: Any, x: Any) -> Any:
    """``float32`` for ``complex64``, the dtype itself for real arrays."""
    dtype = finfo(xp, x.dtype).dtype
    return getattr(xp, dtype) if isinstance(dtype, str) else dtype  # torch's finfo gives a name


def scalar_dtype(xp: Any, x: Any) -> Any:
    """The real dtype, at least float32, in which to compute scalars derived from hyper-parameters
    (``1 - beta``, bias corrections) before casting them to a 16-bit parameter's dtype."""
    return wide_dtype(xp, real_dtype(xp, x))  # the one policy, with no hyper-parameter to widen it


def scalars(xp: Any, dtype: Any, *values: Any) -> tuple[Any, ...]:
    """Hyper-parameters as 0-d arrays of ``dtype``, so arithmetic keeps the parameter's dtype."""
    return tuple(xp.asarray(v, dtype=dtype) for v in values)


def abs2(xp: Any, g: Any) -> Any:
    """``|g|**2``, real-valued also for complex ``g``."""
    if isdtype(xp, g.dtype, "complex floating"):
        return xp.real(g) ** 2 + xp.imag(g) ** 2
    return g * g


def select(xp: Any, flag: Any, new: Any, old: Any) -> Any:
    """``new`` where the 0-d boolean ``flag`` holds, else ``old``, leaf by leaf (works under jit,
    where a Python ``if`` on an array cannot)."""
    return jax.tree_util.tree_map(lambda n, o: xp.where(flag, n, o), new, old)


def wide_dtype(xp: Any, real: Any, *values: Any) -> Any:
    """The dtype of scalar arithmetic: ``float64`` if ``real`` or any hyper-parameter is, else
    ``float32`` (never less, so ``bfloat16`` parameters get ``float32`` bias corrections)."""
    dtypes = [real]
    for v in values:
        dtype = getattr(v, "dtype", None)
        dtypes.append(xp.asarray(v).dtype if dtype is None else dtype)
    # by name, so that NumPy hyper-parameters also widen another namespace's arithmetic
    wide = any(str(d).rsplit(".", 1)[-1] in ("float64", "complex128") for d in dtypes)
    return xp.float64 if wide else xp.float32


def powers(xp: Any, beta: Any, t: Any) -> tuple[Any, Any]:
    """``(beta**t, 1 - beta**t)``. The second as ``-expm1(t log beta)``: accurate to a few ulps
    where ``beta**t`` is near 1, which a float32 subtraction is not (torch subtracts in float64)."""
    positive = beta > 0
    log = xp.log(xp.where(positive, beta, xp.ones_like(beta)))
    one = xp.ones_like(beta)
    return xp.where(positive, xp.exp(t * log), 0 * one), xp.where(positive, -xp.expm1(t * log), one)


def by_parts(xp: Any, fn: Any, grad: Any, *buffers: Any) -> tuple[Any, ...]:
    """``fn(grad, *buffers)`` on real arrays; for complex ones applied to the real and the imaginary
    parts separately and put back together (torch's ``view_as_real``). ``None`` passes through."""
    if not isdtype(xp, grad.dtype, "complex floating"):
        return tuple(fn(grad, *buffers))

    def part(take: Any) -> tuple[Any, ...]:
        return tuple(fn(take(grad), *(None if b is None else take(b) for b in buffers)))

    one_j = xp.asarray(1j, dtype=grad.dtype)
    return tuple(
        None if re is None else cast(re, grad.dtype) + one_j * cast(im, grad.dtype)
        for re, im in zip(part(xp.real), part(xp.imag), strict=True)
    )


def full_like(param: Any, value: float, *, both_parts: bool) -> Any:
    """A buffer of ``value``; for complex parameters ``value + value j`` with ``both_parts``
    (torch's element-wise convention), else ``value + 0j`` (optax's)."""
    xp = namespace(param)
    if isdtype(xp, param.dtype, "complex floating") and both_parts:
        return xp.full_like(param, complex(value, value))
    return xp.full_like(param, value)
