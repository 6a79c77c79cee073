"""Gradient descent, with and without momentum."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ._contract import Rule
from ._numerics import namespace, scalars
from ._validate import hyper


@dataclass(frozen=True)
class Descent(Rule):
    r"""Plain gradient descent: ``Descent(lr=0.1)``.

    .. math:: p \leftarrow p - \eta\, g

    with :math:`\eta` = ``lr``. Reproduces ``torch.optim.SGD(lr)`` and ``optax.sgd(lr)``.

    Args:
        lr: the learning rate :math:`\eta`.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Descent(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # p - lr g
        (array([0.9, 2.2]), True)
    """

    lr: float = hyper(0.1, min=0)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        (lr,) = scalars(xp, grad.dtype, hyper["lr"])
        return state, lr * grad


class MomentumState(NamedTuple):
    velocity: Any  # b in the docstrings below


@dataclass(frozen=True)
class Momentum(Rule):
    r"""Heavy-ball momentum: ``Momentum(lr=0.01, momentum=0.9)``.

    .. math::
        b \leftarrow \mu\, b + g, \qquad p \leftarrow p - \eta\, b

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum`` and :math:`b` starting at zero. This is
    the arithmetic of ``torch.optim.SGD(lr, momentum)`` (``dampening=0``) and of
    ``optax.sgd(lr, momentum)``, which this rule reproduces. With a constant learning rate it equals
    Optimisers.jl's form ``v = mu v + lr g; p -= v``.

    Args:
        lr: the learning rate :math:`\eta`.
        momentum: :math:`\mu`, the factor of the previous velocity.

    Raises:
        ValueError: a hyper-parameter outside its range (``lr < 0`` or ``momentum < 0``).
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Momentum(lr=0.1, momentum=0.9), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> for _ in range(2):
        ...     state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # b = g, then 1.9 g: p - 0.29 g
        (array([0.71, 2.58]), True)

    Reference: Polyak, *Some methods of speeding up the convergence of iteration methods* (1964).
    """

    lr: float = hyper(0.01, min=0)
    momentum: float = hyper(0.9, min=0)

    def init(self, param: Any) -> MomentumState:
        return MomentumState(namespace(param).zeros_like(param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        return _momentum(hyper, state, grad, nesterov=False)


@dataclass(frozen=True)
class Nesterov(Rule):
    r"""Nesterov momentum: ``Nesterov(lr=0.001, momentum=0.9)``.

    .. math::
        b \leftarrow \mu\, b + g, \qquad p \leftarrow p - \eta\,(g + \mu\, b)

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum`` and :math:`b` starting at zero.
    Reproduces ``torch.optim.SGD(lr, momentum, nesterov=True)`` and
    ``optax.sgd(lr, momentum, nesterov=True)``.

    Args:
        lr: the learning rate :math:`\eta`.
        momentum: :math:`\mu`, the factor of the previous velocity.

    Raises:
        ValueError: a hyper-parameter outside its range (``lr < 0`` or ``momentum < 0``).
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Nesterov(lr=0.1, momentum=0.9), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # b = g: p - lr (g + mu g)
        (array([0.81, 2.38]), True)

    Reference: Sutskever et al., *On the importance of initialization and momentum in deep
    learning* (ICML 2013), after Nesterov (1983).
    """

    lr: float = hyper(0.001, min=0)
    momentum: float = hyper(0.9, min=0)

    def init(self, param: Any) -> MomentumState:
        return MomentumState(namespace(param).zeros_like(param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        return _momentum(hyper, state, grad, nesterov=True)


def _momentum(hyper: Any, state: Any, grad: Any, *, nesterov: bool) -> tuple[Any, Any]:
    xp = namespace(grad)
    lr, mu = scalars(xp, grad.dtype, hyper["lr"], hyper["momentum"])
    velocity = mu * state.velocity + grad
    return MomentumState(velocity), lr * (grad + mu * velocity if nesterov else velocity)
