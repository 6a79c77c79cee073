"""``gradient`` and ``value_and_gradient``: differentiate a zero-argument loss closure with
respect to the parameters it reads, wherever it reads them."""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .. import _arrays
from ._grads import Grads
from ._objects import LOSS, Graph, is_compiled
from ._params import Params, describe
from ._swap import Swapper


def gradient(loss_fn: Callable[[], Any], ps: Params) -> Grads:
    """The gradient of the zero-argument ``loss_fn`` with respect to the parameters in ``ps``.

    For the call, every place where ``loss_fn`` can read a parameter holds one traced JAX value
    (``Transpose(traced)`` at a ``Transpose``, the traced value transposed at a NumPy view), so
    JAX adds up every use and ``grads[W]`` is ``W``'s total gradient. Those places are the
    positions recorded by ``params`` and everything the loss reaches: its closure variables,
    default arguments and the globals its code names, and from there, recursively, containers
    (subclasses too), attributes (``__dict__`` and ``__slots__``), the closures of functions
    held anywhere, partials, bound methods, class attributes and the attributes of the user's
    modules. A jitted function (``jax.jit``, ``equinox.filter_jit``) that reads a parameter
    from its closure runs as its Python function for the call. The originals are put back when
    the loss returns or raises. The loss must compute with ``jax.numpy`` (NumPy cannot take
    traced values) and return a real floating scalar. Call it outside ``jax.jit``.

    Args:
        loss_fn: a function of no arguments returning the loss, a real floating scalar.
        ps: the parameters, ``params(model)`` of the model the loss reads.

    Returns:
        The ``Grads``: each parameter's total gradient, keyed by the parameter (and its aliases).

    Raises:
        StaleParamsError: an array recorded by ``params`` was replaced in the model since.
        ValueError: the loss does not depend on any of the parameters.
        TypeError: ``loss_fn`` is not a function of no arguments or ``ps`` not a ``Params``;
            the loss is not a real floating scalar (an integer or boolean loss has no gradient);
            a parameter sits where it can be neither substituted nor rebuilt (a tuple subclass
            JAX does not flatten, an attribute that cannot be set), or a jitted function that
            reads one sits where it cannot be replaced (the message names the place).

    Examples:
        >>> import jax.numpy as jnp, numpy as np
        >>> from optstate import implicit
        >>> W = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
        >>> layers = [{"w": W}, {"w": W.T}]           # W used twice: once as a NumPy view
        >>> x = np.ones((1, 2), np.float32)
        >>> ps = implicit.params(layers)
        >>> grads = implicit.gradient(lambda: jnp.sum(x @ layers[0]["w"] @ layers[1]["w"]), ps)
        >>> grads[W]            # d/dW |W.T 1|^2 = 2 (1)(W.T 1).T, as a NumPy array like W
        array([[ 8., 12.],
               [ 8., 12.]], dtype=float32)
    """
    return value_and_gradient(loss_fn, ps)[1]


def value_and_gradient(loss_fn: Callable[[], Any], ps: Params) -> tuple[Any, Grads]:
    """``(loss_fn(), gradient(loss_fn, ps))`` from one evaluation of the loss.

    Args:
        loss_fn: a function of no arguments returning the loss, a real floating scalar.
        ps: the parameters, ``params(model)`` of the model the loss reads.

    Returns:
        The loss's value (a JAX scalar) and the ``Grads``.

    Raises:
        StaleParamsError, ValueError, TypeError: as ``gradient``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from optstate import implicit
        >>> model = {"w": jnp.array([3.0])}
        >>> value, grads = implicit.value_and_gradient(
        ...     lambda: jnp.sum(model["w"] ** 2), implicit.params(model)
        ... )
        >>> float(value), grads[model["w"]]
        (9.0, Array([6.], dtype=float32))
    """
    if not isinstance(ps, Params):
        raise TypeError(
            f"gradient(loss_fn, ps) takes the Params of implicit.params(model), got "
            f"{type(ps).__name__}"
        )
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function of no arguments, got {type(loss_fn).__name__}")
    ps._check(ps._root, "gradient")
    graph = Graph(code=True, home=_home(loss_fn), skip=(Params, Grads))
    reached = [False]

    def traced(values: list[Any]) -> Any:
        swapper = Swapper(ps._resolve, ps._overlap, values, graph)
        try:
            swapper.swap(ps._root, "model")
            out = swapper.swap(loss_fn, LOSS)()
        finally:
            swapper.restore()
        _check_loss(out)
        reached[0] = isinstance(out, jax.core.Tracer)
        return out

    value, pullback = jax.vjp(traced, list(ps))
    if not reached[0]:
        raise ValueError(
            f"the loss does not depend on any of the {len(ps)} parameters: it reaches none of "
            "them, neither through the model given to params nor through what it reads. Was "
            "the model replaced after params was taken (take params of the model the loss "
            "uses), or does the loss read the arrays through an installed package's globals?"
        )
    (raw,) = pullback(jax.numpy.ones((), value.dtype))
    totals = [_arrays.coerce(g, b) for g, b in zip(raw, ps, strict=True)]
    return value, Grads(ps, totals)


def _home(loss_fn: Any) -> dict[str, Any] | None:
    """The globals of the module the loss is written in (through partials, bound methods,
    jitted functions and a callable object's ``__call__``)."""
    f = loss_fn
    for _ in range(16):
        if isinstance(f, types.FunctionType):
            return f.__globals__
        if isinstance(f, functools.partial):
            f = f.func
        elif isinstance(f, types.MethodType):
            f = f.__func__
        elif is_compiled(f):
            f = f.__wrapped__
        else:
            f = inspect.getattr_static(type(f), "__call__", None)  # a callable object
    return None


def _check_loss(out: Any) -> None:
    dtype: Any = getattr(out, "dtype", None)
    shape = getattr(out, "shape", None)
    if isinstance(out, bool | int | float | complex):
        dtype, shape = np.result_type(out), ()
    if shape != () or dtype is None:
        raise TypeError(
            f"loss_fn must return a real scalar (the loss), got {describe(out)}; "
            "return auxiliary values through a variable the closure writes to"
        )
    if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating):
        raise TypeError(f"loss_fn must return a real scalar (the loss), got {describe(out)}")
    if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        raise TypeError(
            f"the loss is not a differentiable (floating) scalar: loss_fn returned "
            f"{describe(out)}, and an integer or boolean value has no gradient. Compute the loss "
            "in floating point (a count of comparisons, say, needs a smooth stand-in)"
        )
