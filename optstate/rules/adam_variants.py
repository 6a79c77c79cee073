"""Adam's variants in ``torch.optim``: ``RAdam`` (a rectified warm-up), ``NAdam`` (Nesterov
momentum), ``AdaMax`` (the infinity norm) and ``AMSGrad`` (the maximum second moment), with
torch's arithmetic.

Scalar arithmetic (bias corrections, schedules of the momentum) follows ``_numerics``' policy:
``float64`` when the parameter or the hyper-parameters are, as torch computes it in Python floats,
else ``float32``; only the resulting factors are cast to the parameter's dtype.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import (
    by_parts,
    cast,
    moment_zeros,
    namespace,
    powers,
    real_dtype,
    scalar_dtype,
    scalars,
    wide_dtype,
)
from ._validate import flag, floating_dtype, hyper, static

__all__ = ["AMSGrad", "AdaMax", "NAdam", "RAdam"]


def _moments_init(rule: Any, param: Any) -> tuple[Any, Any, Any]:
    xp = namespace(param)
    return (
        moment_zeros(rule, rule.mu_dtype, param),
        xp.zeros_like(param),
        xp.zeros((), dtype=xp.int32),
    )


class RAdamState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # second moment v, the parameter's dtype (real and imaginary parts separately)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class RAdam(Rule):
    r"""Rectified Adam: ``RAdam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, *,
    correct_before_eps=False)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad v \leftarrow \beta_2 v + (1-\beta_2)\, g^2,
        \\
        \rho_\infty = \frac{2}{1-\beta_2} - 1, \qquad
        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1-\beta_2^t}, \qquad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}},
        \\
        p \leftarrow p - \eta\, \frac{m}{1-\beta_1^t} \cdot
        \begin{cases} r_t \sqrt{1-\beta_2^t} / (\sqrt{v} + \epsilon) & \rho_t > 5 \\
        1 & \text{otherwise} \end{cases}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``
    and :math:`t` this parameter's step count: plain momentum until the variance of the adaptive
    rate is tractable (:math:`\rho_t > 5`), then Adam rectified by :math:`r_t`. Reproduces
    ``torch.optim.RAdam``, also for complex parameters (real and imaginary parts separately).
    ``correct_before_eps=True`` adds :math:`\epsilon` to :math:`\sqrt{v/(1-\beta_2^t)}` instead, as
    ``optax.radam`` does (which switches at :math:`\rho_t \ge 5`, a difference only at exactly 5).

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        correct_before_eps: add :math:`\epsilon` after the bias correction (``optax.radam``).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.RAdam(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # rho_1 = 1 <= 5: momentum, p - lr g
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.9, 2.2]), True)

    Reference: Liu et al., *On the Variance of the Adaptive Learning Rate and Beyond* (ICLR 2020),
    https://arxiv.org/abs/1908.03265
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    _: KW_ONLY
    correct_before_eps: bool = static(False, check=flag)

    def init(self, param: Any) -> RAdamState:
        xp = namespace(param)
        return RAdamState(xp.zeros_like(param), xp.zeros_like(param), xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        count = increment(state.count)
        wide = wide_dtype(xp, real, hyper["lr"], beta1, beta2, hyper["eps"])
        lr, b1, b2, eps, t = scalars(xp, wide, hyper["lr"], beta1, beta2, hyper["eps"], count)
        _, bc1 = powers(xp, b1, t)
        b2t, bc2 = powers(xp, b2, t)
        rho_inf = 2 / (1 - b2) - 1
        rho = rho_inf - 2 * t * b2t / bc2
        rectify = rho > 5
        # r_t only where it is used; elsewhere 6 keeps every factor positive (rho_inf >= rho_t)
        six = 6 * xp.ones_like(rho)
        rho, rho_inf = xp.where(rectify, rho, six), xp.where(rectify, rho_inf, six)
        r = xp.sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
        w1, w2, b2_, eps_, lr_, bc1_, bc2_, r_, sqrt_bc2 = scalars(
            xp, real, 1 - b1, 1 - b2, b2, eps, lr, bc1, bc2, r, xp.sqrt(bc2)
        )

        def kernel(g: Any, m: Any, v: Any) -> tuple[Any, Any, Any]:
            m = m + w1 * (g - m)
            v = v * b2_ + (w2 * g) * g
            m_hat_lr = (m / bc1_) * lr_
            if self.correct_before_eps:
                adaptive = 1 / (xp.sqrt(v / bc2_) + eps_)
            else:
                adaptive = sqrt_bc2 / (xp.sqrt(v) + eps_)
            return m, v, xp.where(rectify, (m_hat_lr * adaptive) * r_, m_hat_lr)

        mu, nu, step = by_parts(xp, kernel, grad, state.mu, state.nu)
        return RAdamState(mu, nu, count), step


class NAdamState(NamedTuple):
    mu: Any  # first moment m, in mu_dtype (the parameter's dtype by default)
    nu: Any  # second moment v, the parameter's dtype (real and imaginary parts separately)
    mu_product: Any  # prod of mu_1..mu_t, a 0-d float32 (float64 for float64 parameters)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class NAdam(Rule):
    r"""Adam with Nesterov momentum: ``NAdam(lr=2e-3, betas=(0.9, 0.999), eps=1e-8,
    momentum_decay=4e-3, *, momentum_schedule=True, mu_dtype=None)``.

    .. math::
        \mu_t = \beta_1 \left(1 - \tfrac12\, 0.96^{t\psi}\right), \qquad
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g^2, \\
        p \leftarrow p - \eta \left(
        \frac{(1-\mu_t)\, g}{1 - \prod_{i \le t} \mu_i}
        + \frac{\mu_{t+1}\, m}{1 - \prod_{i \le t+1} \mu_i} \right)
        \Big/ \left(\sqrt{v / (1-\beta_2^t)} + \epsilon\right)

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``,
    :math:`\psi` = ``momentum_decay`` and :math:`t` this parameter's step count. Reproduces
    ``torch.optim.NAdam``, also for complex parameters (real and imaginary parts separately).
    ``momentum_schedule=False`` keeps :math:`\mu_t = \beta_1` (``momentum_decay`` is then unused),
    which is ``optax.nadam``. ``mu_dtype`` stores :math:`m` in another real dtype (e.g.
    ``jnp.bfloat16``); the arithmetic is in the parameter's dtype.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        momentum_decay: :math:`\psi`, how fast :math:`\mu_t` approaches :math:`\beta_1`.
        momentum_schedule: ``False`` keeps :math:`\mu_t = \beta_1` (``optax.nadam``).
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.NAdam(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: lr (1 + 0.1 mu_2 / (1 - mu_1 mu_2)) sign(g) = 0.1056 sign(g),
        >>> # with mu_t = 0.9 (1 - 0.96**(0.004 t) / 2)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.894355, 2.105645]), True)

    Reference: Dozat, *Incorporating Nesterov Momentum into Adam* (ICLR 2016 workshop),
    https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """

    lr: float = hyper(2e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    momentum_decay: float = hyper(4e-3, min=0)
    _: KW_ONLY
    momentum_schedule: bool = static(True, check=flag)
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> NAdamState:
        xp = namespace(param)
        product = scalar_dtype(xp, param)
        mu, nu, count = _moments_init(self, param)
        return NAdamState(mu, nu, xp.ones((), dtype=product), count)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        h = (hyper["lr"], beta1, beta2, hyper["eps"], hyper["momentum_decay"])
        count = increment(state.count)
        wide = wide_dtype(xp, real, *h)
        lr, b1, b2, eps, psi, t = scalars(xp, wide, *h, count)
        _, bc2 = powers(xp, b2, t)
        if self.momentum_schedule:
            mu_t = b1 * (1 - 0.5 * 0.96 ** (t * psi))
            mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * psi))
        else:
            mu_t = mu_next = b1
        (mu_t_stored,) = scalars(xp, state.mu_product.dtype, mu_t)
        product = state.mu_product * mu_t_stored
        (product_wide,) = scalars(xp, wide, product)
        c_grad = lr * (1 - mu_t) / (1 - product_wide)
        c_mom = lr * mu_next / (1 - product_wide * mu_next)
        w1, w2, b2_, eps_, bc2_, c_grad, c_mom = scalars(
            xp, real, 1 - b1, 1 - b2, b2, eps, bc2, c_grad, c_mom
        )

        def kernel(g: Any, m: Any, v: Any) -> tuple[Any, Any, Any]:
            m = m + w1 * (g - m)
            v = v * b2_ + (w2 * g) * g
            denom = xp.sqrt(v / bc2_) + eps_
            return m, v, (c_grad * g) / denom + (c_mom * m) / denom

        mu, nu, step = by_parts(xp, kernel, grad, cast(state.mu, grad.dtype), state.nu)
        return NAdamState(cast(mu, state.mu.dtype), nu, xp.asarray(product), count), step


class AdaMaxState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # the decaying maximum u of |g|, the parameter's dtype (parts separately)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AdaMax(Rule):
    r"""Adam with the infinity norm: ``AdaMax(lr=2e-3, betas=(0.9, 0.999), eps=1e-8)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        u \leftarrow \max(\beta_2 u,\ |g| + \epsilon), \qquad
        p \leftarrow p - \frac{\eta}{1-\beta_1^t}\, \frac{m}{u}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``
    and :math:`t` this parameter's step count. Reproduces ``torch.optim.Adamax`` and
    ``optax.adamax`` (which agree); complex parameters as torch, real and imaginary parts
    separately (optax would take the modulus).

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to :math:`|g|` in the running maximum.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AdaMax(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: lr (0.1 g / 0.1) / |g|
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.9, 2.1]), True)

    Reference: Kingma and Ba, *Adam: A Method for Stochastic Optimization* (ICLR 2015), section 7,
    https://arxiv.org/abs/1412.6980
    """

    lr: float = hyper(2e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)

    def init(self, param: Any) -> AdaMaxState:
        xp = namespace(param)
        return AdaMaxState(xp.zeros_like(param), xp.zeros_like(param), xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        count = increment(state.count)
        wide = wide_dtype(xp, real, hyper["lr"], beta1, beta2, hyper["eps"])
        lr, b1, b2, eps, t = scalars(xp, wide, hyper["lr"], beta1, beta2, hyper["eps"], count)
        _, bc1 = powers(xp, b1, t)
        w1, b2_, eps_, clr = scalars(xp, real, 1 - b1, b2, eps, lr / bc1)

        def kernel(g: Any, m: Any, u: Any) -> tuple[Any, Any, Any]:
            m = m + w1 * (g - m)
            u = xp.maximum(u * b2_, xp.abs(g) + eps_)
            return m, u, (clr * m) / u

        mu, nu, step = by_parts(xp, kernel, grad, state.mu, state.nu)
        return AdaMaxState(mu, nu, count), step


class AMSGradState(NamedTuple):
    mu: Any  # first moment m, in mu_dtype (the parameter's dtype by default)
    nu: Any  # second moment v, the parameter's dtype (real and imaginary parts separately)
    nu_max: Any  # the running maximum of v (of v / (1 - beta2^t) with correct_before_max)
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AMSGrad(Rule):
    r"""Adam with a non-decreasing second moment: ``AMSGrad(lr=1e-3, betas=(0.9, 0.999),
    eps=1e-8, *, correct_before_max=False, mu_dtype=None)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, g^2, \qquad
        \bar v \leftarrow \max(\bar v, v), \\
        p \leftarrow p - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{\bar v / (1-\beta_2^t)} + \epsilon}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``
    and :math:`t` this parameter's step count. Reproduces ``torch.optim.Adam(amsgrad=True)``, also
    for complex parameters (real and imaginary parts separately). ``correct_before_max=True`` keeps
    the maximum of the bias-corrected :math:`v / (1-\beta_2^t)` instead, as ``optax.amsgrad`` does.
    ``mu_dtype`` stores :math:`m` in another real dtype; the arithmetic is in the parameter's dtype.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        correct_before_max: keep the maximum of the bias-corrected second moment (optax's form).
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AMSGrad(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]  # first step: as Adam's
        (array([0.9, 2.1]), True)

    Reference: Reddi, Kale and Kumar, *On the Convergence of Adam and Beyond* (ICLR 2018),
    https://arxiv.org/abs/1904.09237
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    _: KW_ONLY
    correct_before_max: bool = static(False, check=flag)
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> AMSGradState:
        mu, nu, count = _moments_init(self, param)
        return AMSGradState(mu, nu, namespace(param).zeros_like(param), count)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp, real = namespace(grad), real_dtype(namespace(grad), grad)
        beta1, beta2 = hyper["betas"]
        count = increment(state.count)
        wide = wide_dtype(xp, real, hyper["lr"], beta1, beta2, hyper["eps"])
        lr, b1, b2, eps, t = scalars(xp, wide, hyper["lr"], beta1, beta2, hyper["eps"], count)
        _, bc1 = powers(xp, b1, t)
        _, bc2 = powers(xp, b2, t)
        w1, w2, b2_, eps_, lr_, bc1_, bc2_, sqrt_bc2, step_size = scalars(
            xp, real, 1 - b1, 1 - b2, b2, eps, lr, bc1, bc2, xp.sqrt(bc2), lr / bc1
        )

        def kernel(g: Any, m: Any, v: Any, v_max: Any) -> tuple[Any, Any, Any, Any]:
            m = m + w1 * (g - m)
            v = v * b2_ + (w2 * g) * g
            if self.correct_before_max:
                v_max = xp.maximum(v_max, v / bc2_)
                return m, v, v_max, lr_ * ((m / bc1_) / (xp.sqrt(v_max) + eps_))
            v_max = xp.maximum(v_max, v)
            return m, v, v_max, (step_size * m) / (xp.sqrt(v_max) / sqrt_bc2 + eps_)

        mu = cast(state.mu, grad.dtype)
        mu, nu, nu_max, step = by_parts(xp, kernel, grad, mu, state.nu, state.nu_max)
        return AMSGradState(cast(mu, state.mu.dtype), nu, nu_max, count), step
