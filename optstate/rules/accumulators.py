"""Accumulators: a per-element step size from a running sum or average of squared gradients.

``RMSProp``, ``AdaGrad`` and ``AdaDelta``, with the arithmetic of ``torch.optim`` (without its
``weight_decay``: chain ``WeightDecay`` for that), complex parameters as pairs of reals as torch
treats them; where torch and optax disagree a keyword-only option gives optax's convention.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from . import _fused
from ._contract import Rule, increment
from ._numerics import (
    by_parts,
    full_like,
    namespace,
    real_dtype,
    scalars,
    wide_dtype,
)
from ._validate import flag, hyper, nonnegative, static

__all__ = ["AdaDelta", "AdaGrad", "RMSProp"]


class RMSPropState(NamedTuple):
    nu: Any  # the average v of g^2, the parameter's dtype (real and imaginary parts separately)
    mu: Any  # the average of g with centred=True, else None
    velocity: Any  # the momentum buffer b, the parameter's dtype
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class RMSProp(Rule):
    r"""RMSProp: ``RMSProp(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.0, *, centred=False,
    eps_in_sqrt=False, initial_accumulator=0.0)``.

    .. math::
        v \leftarrow \alpha v + (1-\alpha)\, g^2, \qquad
        d = \sqrt{v} + \epsilon, \qquad
        b \leftarrow \mu b + g / d, \qquad
        p \leftarrow p - \eta\, b

    with :math:`\eta` = ``lr``, :math:`\alpha` = ``alpha``, :math:`\epsilon` = ``eps``,
    :math:`\mu` = ``momentum``, and :math:`v` starting at ``initial_accumulator``, :math:`b` at
    zero; with :math:`\mu = 0` the step is :math:`\eta\, g / d` (the buffer is kept all the same,
    so that ``momentum`` can change between compiled steps). ``centred=True`` also tracks
    :math:`\bar g \leftarrow \alpha \bar g + (1-\alpha)\, g` and uses
    :math:`d = \sqrt{v - \bar g^2} + \epsilon`. Reproduces ``torch.optim.RMSprop``, also for
    complex parameters (real and imaginary parts separately). ``eps_in_sqrt=True`` puts
    :math:`\epsilon` under the root, :math:`d = \sqrt{v + \epsilon}`: then the rule is
    ``optax.rmsprop(lr, decay=alpha, eps=eps, initial_scale=initial_accumulator, centered=centred,
    momentum=momentum)`` (whose momentum acts after the learning rate: the same for a constant
    one).

    Args:
        lr: the learning rate :math:`\eta`.
        alpha: :math:`\alpha`, the decay rate of :math:`v`, in [0, 1].
        eps: :math:`\epsilon`, added to :math:`\sqrt{v}` (or under the root, ``eps_in_sqrt``).
        momentum: :math:`\mu`, the factor of the buffer :math:`b`.
        centred: divide by the root of the variance, :math:`v - \bar g^2` (keyword-only).
        eps_in_sqrt: :math:`d = \sqrt{v + \epsilon}` (keyword-only).
        initial_accumulator: the starting value of :math:`v` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.RMSProp(lr=0.01), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # v = 0.01 g^2: p - 10 lr sign(g)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.9, 2.1]), True)

    Reference: Tieleman and Hinton, *Lecture 6.5, rmsprop* (COURSERA: Neural Networks for Machine
    Learning, 2012); centred: Graves, *Generating Sequences With Recurrent Neural Networks* (2013),
    https://arxiv.org/abs/1308.0850
    """

    lr: float = hyper(1e-2, min=0)
    alpha: float = hyper(0.99, min=0, max=1)
    eps: float = hyper(1e-8, min=0)
    momentum: float = hyper(0.0, min=0)
    _: KW_ONLY
    centred: bool = static(False, check=flag)
    eps_in_sqrt: bool = static(False, check=flag)
    initial_accumulator: float = static(0.0, check=nonnegative)

    def init(self, param: Any) -> RMSPropState:
        xp = namespace(param)
        return RMSPropState(
            nu=full_like(param, self.initial_accumulator, both_parts=True),
            mu=xp.zeros_like(param) if self.centred else None,
            velocity=xp.zeros_like(param),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        h = (hyper["lr"], hyper["alpha"], hyper["eps"], hyper["momentum"])
        lr, alpha, eps, momentum = scalars(xp, wide_dtype(xp, real, *h), *h)
        lr, alpha, w, eps, momentum = scalars(xp, real, lr, alpha, 1 - alpha, eps, momentum)
        with_momentum = momentum > 0

        def kernel(g: Any, v: Any, g_avg: Any, b: Any) -> tuple[Any, Any, Any, Any]:
            v = v * alpha + (w * g) * g
            var = v
            if self.centred:
                g_avg = g_avg + w * (g - g_avg)
                var = v - g_avg * g_avg
            d = xp.sqrt(var + eps) if self.eps_in_sqrt else xp.sqrt(var) + eps
            b = b * momentum + g / d
            return v, g_avg, b, xp.where(with_momentum, lr * b, (lr * g) / d)

        nu, mu, velocity, step = by_parts(xp, kernel, grad, state.nu, state.mu, state.velocity)
        return RMSPropState(nu, mu, velocity, increment(state.count)), step


class AdaGradState(NamedTuple):
    sum_of_squares: Any  # s, the parameter's dtype (real and imaginary parts separately)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AdaGrad(Rule):
    r"""AdaGrad: ``AdaGrad(lr=1e-2, lr_decay=0.0, eps=1e-10, *, initial_accumulator=0.0,
    eps_in_sqrt=False)``.

    .. math::
        s \leftarrow s + g^2, \qquad
        p \leftarrow p - \frac{\eta}{1 + (t-1)\lambda}\, \frac{g}{\sqrt{s} + \epsilon}

    with :math:`\eta` = ``lr``, :math:`\lambda` = ``lr_decay``, :math:`\epsilon` = ``eps``,
    :math:`t` this parameter's step count and :math:`s` starting at ``initial_accumulator``.
    Reproduces ``torch.optim.Adagrad``, also for complex parameters (real and imaginary parts
    separately, each starting at ``initial_accumulator``). ``eps_in_sqrt=True`` divides by
    :math:`\sqrt{s + \epsilon}` instead; with ``initial_accumulator=0.1, eps=1e-7`` that is
    ``optax.adagrad``.

    ``update_`` on contiguous torch tensors of one device and one float dtype, where this rule
    is the step's only one, runs torch's fused kernel (``torch._fused_adagrad_``, as
    ``torch.optim.Adagrad(fused=True)``; ``eps_in_sqrt=False`` only); elsewhere the pure form.

    Args:
        lr: the learning rate :math:`\eta`.
        lr_decay: :math:`\lambda`, the decay of the learning rate with the step count.
        eps: :math:`\epsilon`, added to :math:`\sqrt{s}` (or under the root, ``eps_in_sqrt``).
        initial_accumulator: the starting value of :math:`s` (keyword-only).
        eps_in_sqrt: divide by :math:`\sqrt{s + \epsilon}` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AdaGrad(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]  # s = g^2: p - lr sign(g)
        (array([0.9, 2.1]), True)

    Reference: Duchi, Hazan and Singer, *Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization* (JMLR 2011), https://jmlr.org/papers/v12/duchi11a.html
    """

    lr: float = hyper(1e-2, min=0)
    lr_decay: float = hyper(0.0, min=0)
    eps: float = hyper(1e-10, min=0)
    _: KW_ONLY
    initial_accumulator: float = static(0.0, check=nonnegative)
    eps_in_sqrt: bool = static(False, check=flag)

    def init(self, param: Any) -> AdaGradState:
        xp = namespace(param)
        return AdaGradState(
            full_like(param, self.initial_accumulator, both_parts=True),
            xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        count = increment(state.count)
        h = (hyper["lr"], hyper["lr_decay"], hyper["eps"])
        lr, decay, eps, t = scalars(xp, wide_dtype(xp, real, *h), *h, count)
        clr, eps = scalars(xp, real, lr / (1 + (t - 1) * decay), eps)

        def kernel(g: Any, s: Any) -> tuple[Any, Any]:
            s = s + g * g
            std = xp.sqrt(s + eps) if self.eps_in_sqrt else xp.sqrt(s) + eps
            return s, (clr * g) / std

        total, step = by_parts(xp, kernel, grad, state.sum_of_squares)
        return AdaGradState(total, count), step

    def fused_(self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]) -> bool:
        sums = [s.sum_of_squares for s in states]
        counts = [s.count for s in states]
        if self.eps_in_sqrt or not _fused.fits(params, grads, [sums], counts):
            return False
        _fused.adagrad_(
            params, grads, sums, counts,
            lr=float(hyper["lr"]), lr_decay=float(hyper["lr_decay"]), eps=float(hyper["eps"]),
        )  # fmt: skip
        return True


class AdaDeltaState(NamedTuple):
    nu: Any  # the average v of g^2, the parameter's dtype (real and imaginary parts separately)
    delta: Any  # the average u of squared updates, likewise
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AdaDelta(Rule):
    r"""AdaDelta: ``AdaDelta(lr=1.0, rho=0.9, eps=1e-6)``.

    .. math::
        v \leftarrow \rho v + (1-\rho)\, g^2, \qquad
        \Delta = \frac{\sqrt{u + \epsilon}}{\sqrt{v + \epsilon}}\, g, \qquad
        u \leftarrow \rho u + (1-\rho)\, \Delta^2, \qquad
        p \leftarrow p - \eta\, \Delta

    with :math:`\eta` = ``lr``, :math:`\rho` = ``rho``, :math:`\epsilon` = ``eps`` and
    :math:`v, u` starting at zero. Reproduces ``torch.optim.Adadelta`` and ``optax.adadelta``
    (which agree); complex parameters as torch, real and imaginary parts separately.

    Args:
        lr: the learning rate :math:`\eta`, multiplying :math:`\Delta`.
        rho: :math:`\rho`, the decay rate of both running averages, in [0, 1].
        eps: :math:`\epsilon`, inside both roots.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AdaDelta(), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: sqrt(eps / (0.1 g^2 + eps)) g, about sqrt(1e-5) sign(g) = 0.00316 sign(g)
        >>> np.round(model["enc"], 5), model["dec"] is model["enc"]
        (array([0.99684, 2.00316]), True)

    Reference: Zeiler, *ADADELTA: An Adaptive Learning Rate Method* (2012),
    https://arxiv.org/abs/1212.5701
    """

    lr: float = hyper(1.0, min=0)
    rho: float = hyper(0.9, min=0, max=1)
    eps: float = hyper(1e-6, min=0)

    def init(self, param: Any) -> AdaDeltaState:
        xp = namespace(param)
        return AdaDeltaState(
            xp.zeros_like(param), xp.zeros_like(param), xp.zeros((), dtype=xp.int32)
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        h = (hyper["lr"], hyper["rho"], hyper["eps"])
        lr, rho, eps = scalars(xp, wide_dtype(xp, real, *h), *h)
        lr, rho, w, eps = scalars(xp, real, lr, rho, 1 - rho, eps)

        def kernel(g: Any, v: Any, u: Any) -> tuple[Any, Any, Any]:
            v = v * rho + (w * g) * g
            delta = (xp.sqrt(u + eps) / xp.sqrt(v + eps)) * g
            u = u * rho + (w * delta) * delta
            return v, u, lr * delta

        nu, delta, step = by_parts(xp, kernel, grad, state.nu, state.delta)
        return AdaDeltaState(nu, delta, increment(state.count)), step


# -- optax's Adam variants: complex parameters through |g|^2, as optax ---------------------------
