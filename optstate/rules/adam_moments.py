"""Adam with its moments estimated otherwise: ``OAdam`` (an optimistic step), ``AdaBelief`` (the
variance of the gradient around its mean) and ``Yogi`` (an additive second moment), as optax
computes them.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import (
    abs2,
    cast,
    full_like,
    moment_zeros,
    namespace,
    powers,
    real_dtype,
    scalars,
    wide_dtype,
)
from ._validate import flag, floating_dtype, hyper, nonnegative, static

__all__ = ["AdaBelief", "OAdam", "Yogi"]


def _corrected(xp: Any, b1: Any, t: Any, m: Any, g: Any, nesterov: bool) -> Any:
    """optax's bias-corrected first moment, in ``m``'s dtype: ``m / (1 - b1**t)``, or with
    ``nesterov`` the look-ahead ``b1 m / (1 - b1**(t+1)) + (1 - b1) g / (1 - b1**t)``."""
    _, bc = powers(xp, b1, t)
    if not nesterov:
        (bc_,) = scalars(xp, m.dtype, bc)
        return m / bc_
    _, bc_next = powers(xp, b1, t + 1)
    b1_, w1, bc_, bc_next_ = scalars(xp, m.dtype, b1, 1 - b1, bc, bc_next)
    return b1_ * (m / bc_next_) + w1 * (g / bc_)


class OAdamState(NamedTuple):
    mu: Any  # first moment m, in mu_dtype (the parameter's dtype by default)
    nu: Any  # second moment v of |g|, real-valued
    previous: Any  # the previous direction r, the parameter's dtype
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class OAdam(Rule):
    r"""Optimistic Adam: ``OAdam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, alpha=1.0, beta=1.0, *,
    nesterov=True, mu_dtype=None)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \qquad
        r_t = \frac{\hat m}{\sqrt{v / (1-\beta_2^t)} + \epsilon}, \\
        p \leftarrow p - \eta \left( (\alpha + \beta)\, r_t - \beta\, r_{t-1} \right),
        \qquad r_0 = r_1

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``,
    :math:`\alpha, \beta` = ``alpha, beta`` and :math:`t` this parameter's step count;
    :math:`\hat m = \beta_1 m / (1-\beta_1^{t+1}) + (1-\beta_1)\, g / (1-\beta_1^t)` (Nesterov), or
    :math:`m / (1-\beta_1^t)` with ``nesterov=False``. Reproduces
    ``optax.optimistic_adam_v2`` (torch has no such rule), complex parameters included; optax has
    no default learning rate, this one is Adam's. ``mu_dtype`` stores :math:`m` in another real
    dtype; the arithmetic is in the parameter's dtype.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        alpha: :math:`\alpha`, the weight of the present ratio.
        beta: :math:`\beta`, the weight of the optimistic correction.
        nesterov: use the Nesterov form of :math:`\hat m` (keyword-only).
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OAdam(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # m^ = g (1 + 0.09/0.19): p - 0.1474 sign(g)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.852632, 2.147368]), True)

    Reference: Daskalakis, Ilyas, Syrgkanis and Zeng, *Training GANs with Optimism* (ICLR 2018),
    https://arxiv.org/abs/1711.00141
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    alpha: float = hyper(1.0, min=0)
    beta: float = hyper(1.0, min=0)
    _: KW_ONLY
    nesterov: bool = static(True, check=flag)
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> OAdamState:
        xp = namespace(param)
        return OAdamState(
            mu=moment_zeros(self, self.mu_dtype, param),
            nu=xp.zeros_like(param, dtype=real_dtype(xp, param)),
            previous=xp.zeros_like(param),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, dtype, real = namespace(grad), grad.dtype, real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        h = (hyper["lr"], beta1, beta2, hyper["eps"], hyper["alpha"], hyper["beta"])
        count = increment(state.count)
        wide = wide_dtype(xp, real, *h)
        lr, b1, b2, eps, alpha, beta, t = scalars(xp, wide, *h, count)
        w1_, b1_, lr_, ab_, beta_ = scalars(xp, dtype, 1 - b1, b1, lr, alpha + beta, beta)
        w2_, b2_, eps_ = scalars(xp, real, 1 - b2, b2, eps)
        _, bc2 = powers(xp, b2, t)
        mu = w1_ * grad + b1_ * cast(state.mu, dtype)
        nu = w2_ * abs2(xp, grad) + b2_ * state.nu
        m_hat = _corrected(xp, b1, t, mu, grad, self.nesterov)
        (bc2_,) = scalars(xp, real, bc2)
        r = m_hat / cast(xp.sqrt(nu / bc2_) + eps_, dtype)
        previous = xp.where(state.count == 0, r, state.previous)
        step = lr_ * (ab_ * r - beta_ * previous)
        return OAdamState(cast(mu, state.mu.dtype), nu, r, count), step


class AdaBeliefState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # second moment s of the prediction error |g - m|, real-valued
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AdaBelief(Rule):
    r"""AdaBelief: ``AdaBelief(lr=1e-3, betas=(0.9, 0.999), eps=1e-16, eps_root=1e-16, *,
    nesterov=False)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        s \leftarrow \beta_2 s + (1-\beta_2)\, |g - m|^2 + \epsilon_r, \qquad
        p \leftarrow p - \eta\, \frac{\hat m}{\sqrt{s / (1-\beta_2^t)} + \epsilon}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``,
    :math:`\epsilon_r` = ``eps_root``, :math:`t` this parameter's step count and
    :math:`\hat m = m / (1-\beta_1^t)`, or with ``nesterov=True``
    :math:`\beta_1 m / (1-\beta_1^{t+1}) + (1-\beta_1)\, g / (1-\beta_1^t)`. Reproduces
    ``optax.adabelief`` (torch has no such rule), complex parameters included; optax has no default
    learning rate, this one is the paper's.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of :math:`s`.
        eps_root: :math:`\epsilon_r`, added to :math:`s` at every step.
        nesterov: use the Nesterov form of :math:`\hat m` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AdaBelief(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # s = 0.001 (0.9 g)^2: p - lr sign(g) / 0.9
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.888889, 2.111111]), True)

    Reference: Zhuang et al., *AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
    Gradients* (NeurIPS 2020), https://arxiv.org/abs/2010.07468
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-16, min=0)
    eps_root: float = hyper(1e-16, min=0)
    _: KW_ONLY
    nesterov: bool = static(False, check=flag)

    def init(self, param: Any) -> AdaBeliefState:
        xp = namespace(param)
        nu = xp.zeros_like(param, dtype=real_dtype(xp, param))
        return AdaBeliefState(xp.zeros_like(param), nu, xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, dtype, real = namespace(grad), grad.dtype, real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        h = (hyper["lr"], beta1, beta2, hyper["eps"], hyper["eps_root"])
        count = increment(state.count)
        wide = wide_dtype(xp, real, *h)
        lr, b1, b2, eps, eps_root, t = scalars(xp, wide, *h, count)
        w1_, b1_, lr_ = scalars(xp, dtype, 1 - b1, b1, lr)
        w2_, b2_, eps_, eps_root_ = scalars(xp, real, 1 - b2, b2, eps, eps_root)
        mu = w1_ * grad + b1_ * state.mu
        nu = (w2_ * abs2(xp, grad - mu) + b2_ * state.nu) + eps_root_
        m_hat = _corrected(xp, b1, t, mu, grad, self.nesterov)
        _, bc2 = powers(xp, b2, t)
        (bc2_,) = scalars(xp, real, bc2)
        step = lr_ * (m_hat / cast(xp.sqrt(nu / bc2_) + eps_, dtype))
        return AdaBeliefState(mu, nu, count), step


class YogiState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # second moment v of |g|, real-valued
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class Yogi(Rule):
    r"""Yogi: ``Yogi(lr=1e-2, betas=(0.9, 0.999), eps=1e-3, *, initial_accumulator=1e-6)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow v - (1-\beta_2)\, \operatorname{sign}(v - |g|^2)\, |g|^2, \\
        p \leftarrow p - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``,
    :math:`t` this parameter's step count and :math:`m, v` both starting at
    ``initial_accumulator``: :math:`v` moves towards :math:`|g|^2` by an additive step, so the
    effective rate cannot grow as fast as Adam's. Reproduces ``optax.yogi`` (torch has no such
    rule), complex parameters included; optax has no default learning rate, this one is the
    paper's.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        initial_accumulator: the starting value of :math:`m` and :math:`v` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Yogi(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: lr (g + 9e-6) / (sqrt(g^2 + 1e-3) + eps), within 0.2 % of lr sign(g)
        >>> np.round(model["enc"], 3), model["dec"] is model["enc"]
        (array([0.9, 2.1]), True)

    Reference: Zaheer et al., *Adaptive Methods for Nonconvex Optimization* (NeurIPS 2018),
    https://papers.nips.cc/paper/8186-adaptive-methods-for-nonconvex-optimization
    """

    lr: float = hyper(1e-2, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-3, min=0)
    _: KW_ONLY
    initial_accumulator: float = static(1e-6, check=nonnegative)

    def init(self, param: Any) -> YogiState:
        xp = namespace(param)
        nu = xp.full_like(param, self.initial_accumulator, dtype=real_dtype(xp, param))
        mu = full_like(param, self.initial_accumulator, both_parts=False)
        return YogiState(mu, nu, xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, dtype, real = namespace(grad), grad.dtype, real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        h = (hyper["lr"], beta1, beta2, hyper["eps"])
        count = increment(state.count)
        wide = wide_dtype(xp, real, *h)
        lr, b1, b2, eps, t = scalars(xp, wide, *h, count)
        w1_, b1_, lr_ = scalars(xp, dtype, 1 - b1, b1, lr)
        w2_, eps_ = scalars(xp, real, 1 - b2, eps)
        mu = w1_ * grad + b1_ * state.mu
        g2 = abs2(xp, grad)
        nu = state.nu - (w2_ * xp.sign(state.nu - g2)) * g2
        m_hat = _corrected(xp, b1, t, mu, grad, nesterov=False)
        _, bc2 = powers(xp, b2, t)
        (bc2_,) = scalars(xp, real, bc2)
        step = lr_ * (m_hat / cast(xp.sqrt(nu / bc2_) + eps_, dtype))
        return YogiState(mu, nu, count), step
