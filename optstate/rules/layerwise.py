"""Layer-wise trust ratios: Lamb and Lars scale each parameter's step by its own norm."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import abs2, cast, namespace, real_dtype, scalars
from ._validate import flag, hyper, static


def _trust_ratio(xp: Any, param: Any, update: Any, coefficient: Any, eps: Any) -> Any:
    """``coefficient * |p| / (|u| + eps)`` over the whole parameter, 1 where either norm is 0."""
    param_norm = xp.asarray(xp.linalg.vector_norm(param))
    update_norm = xp.asarray(xp.linalg.vector_norm(update))
    ratio = coefficient * param_norm / (update_norm + eps)
    degenerate = xp.logical_or(param_norm == 0, update_norm == 0)
    ratio = xp.where(degenerate, xp.ones_like(ratio), ratio)
    return cast(ratio, update.dtype)


class LambState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # second moment v, real-valued (the real dtype of a complex parameter)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class Lamb(Rule):
    r"""LAMB, Adam with a layer-wise trust ratio:
    ``Lamb(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, eps_root=0.0)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \\
        u = \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t) + \epsilon_r} + \epsilon}
            + \lambda\, p, \qquad
        p \leftarrow p - \eta\, \frac{\lVert p \rVert}{\lVert u \rVert}\, u

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps``, :math:`\epsilon_r` = ``eps_root``, :math:`\lambda` = ``weight_decay``, :math:`t` this
    parameter's step count, and the ratio of norms taken as 1 when either norm is zero. The norms
    are Frobenius norms of one whole (unique) parameter: a tied weight has one trust ratio.

    Reproduces ``optax.lamb`` (its ``b1, b2, eps, eps_root, weight_decay``; optax's ``mask`` is a
    per-parameter choice of rule here), including complex parameters. optax has no default
    learning rate; 1e-3 is Adam's. optax's ``lamb`` has no ``mu_dtype``, nor does this rule.
    torch.optim has no LAMB.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        weight_decay: :math:`\lambda`, added to the Adam ratio before the trust ratio.
        eps_root: :math:`\epsilon_r`, added to the second moment under the root.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Lamb(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # u = sign(g) up to eps; trust ratio |p| / |u| = sqrt(5 / 2): p - 0.1581 sign(g)
        >>> np.round(model["enc"], 4), model["dec"] is model["enc"]
        (array([0.8419, 2.1581]), True)

    Reference: You et al., *Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes* (ICLR 2020), https://arxiv.org/abs/1904.00962
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-6, min=0)
    weight_decay: float = hyper(0.0, min=0)
    eps_root: float = hyper(0.0, min=0)

    def init(self, param: Any) -> LambState:
        xp = namespace(param)
        return LambState(
            mu=xp.zeros_like(param),
            nu=xp.zeros_like(param, dtype=real_dtype(xp, param)),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        dtype, real = grad.dtype, real_dtype(xp, grad)
        beta1, beta2 = hyper["betas"]
        b1, c1, lr, decay = scalars(xp, dtype, beta1, 1 - beta1, hyper["lr"], hyper["weight_decay"])
        b2, c2, eps, eps_root = scalars(xp, real, beta2, 1 - beta2, hyper["eps"], hyper["eps_root"])
        # Bias corrections in the hyper-parameters' precision (beta2 = 0.999 is 1 in bfloat16).
        wide = xp.asarray(beta1).dtype
        b1_wide, b2_wide = scalars(xp, wide, beta1, beta2)
        count = increment(state.count)
        t = cast(count, wide)
        mu = c1 * grad + b1 * state.mu
        nu = c2 * abs2(xp, grad) + b2 * state.nu
        mu_hat = mu / cast(xp.asarray(1 - b1_wide**t), dtype)
        nu_hat = nu / cast(xp.asarray(1 - b2_wide**t), real)
        update = mu_hat / cast(xp.sqrt(nu_hat + eps_root) + eps, dtype) + decay * param
        (one, zero) = scalars(xp, real, 1, 0)
        ratio = _trust_ratio(xp, param, update, one, zero)
        return LambState(mu, nu, count), update * ratio * lr


class LarsState(NamedTuple):
    trace: Any  # the momentum buffer b, the parameter's dtype (it holds lr-scaled steps)


@dataclass(frozen=True)
class Lars(Rule):
    r"""LARS, momentum with a layer-wise trust ratio:
    ``Lars(lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=0.0, *,
    nesterov=False)``.

    .. math::
        u = g + \lambda\, p, \qquad
        u \leftarrow \eta\, \frac{c\, \lVert p \rVert}{\lVert u \rVert + \epsilon}\, u, \qquad
        b \leftarrow u + \mu\, b, \qquad
        p \leftarrow p - b \quad (\text{or } p - (u + \mu\, b) \text{ with } \texttt{nesterov})

    with :math:`\eta` = ``lr``, :math:`\mu` = ``momentum``, :math:`\lambda` = ``weight_decay``,
    :math:`c` = ``trust_coefficient``, :math:`\epsilon` = ``eps``, :math:`b` starting at zero, and
    the trust ratio taken as 1 when either norm is zero. The learning rate acts before the
    momentum, so changing it mid-run does not rescale the buffer. The norms are Frobenius norms of
    one whole (unique) parameter: a tied weight has one trust ratio.

    Reproduces ``optax.lars`` (its ``weight_decay, trust_coefficient, eps, momentum, nesterov``;
    its masks are a per-parameter choice of rule here), including complex parameters. optax has
    no default learning rate; with ``lr=1.0`` a step moves a parameter by the trust coefficient's
    fraction of its norm (before momentum). torch.optim has no LARS.

    Args:
        lr: the learning rate :math:`\eta`.
        momentum: :math:`\mu`, the factor of the buffer :math:`b`.
        weight_decay: :math:`\lambda`, added to the gradient before the trust ratio.
        trust_coefficient: :math:`c`.
        eps: :math:`\epsilon`, added to the gradient's norm.
        nesterov: step by :math:`u + \mu b` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Lars(lr=1.0, trust_coefficient=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # |p| = |g|: p - 0.1 g
        (array([0.9, 2.2]), True)

    Reference: You, Gitman and Ginsburg, *Large Batch Training of Convolutional Networks* (2017),
    https://arxiv.org/abs/1708.03888
    """

    lr: float = hyper(1.0, min=0)
    momentum: float = hyper(0.9, min=0)
    weight_decay: float = hyper(0.0, min=0)
    trust_coefficient: float = hyper(1e-3, min=0)
    eps: float = hyper(0.0, min=0)
    _: KW_ONLY
    nesterov: bool = static(False, check=flag)

    def init(self, param: Any) -> LarsState:
        return LarsState(namespace(param).zeros_like(param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        lr, momentum, decay = scalars(
            xp, grad.dtype, hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        )
        coefficient, eps = scalars(
            xp, real_dtype(xp, grad), hyper["trust_coefficient"], hyper["eps"]
        )
        update = grad + decay * param
        update = update * _trust_ratio(xp, param, update, coefficient, eps) * lr
        trace = update + momentum * state.trace
        return LarsState(trace), update + momentum * trace if self.nesterov else trace
