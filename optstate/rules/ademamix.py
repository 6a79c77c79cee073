"""AdEMAMix: Adam with a second, slow moving average of the gradients mixed in."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import abs2, cast, moment_zeros, namespace, real_dtype, scalar_dtype, scalars
from ._validate import floating_dtype, hyper, static


class AdEMAMixState(NamedTuple):
    m1: Any  # the fast moving average of g (``mu_dtype``)
    m2: Any  # the slow moving average of g (``mu_dtype``)
    nu: Any  # the second moment, real-valued
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class AdEMAMix(Rule):
    r"""AdEMAMix: ``AdEMAMix(lr=1e-3, betas=(0.9, 0.999), beta3=0.9999, alpha=5.0, eps=1e-8,
    eps_root=0.0, weight_decay=0.0)``.

    .. math::
        m_1 \leftarrow \beta_1 m_1 + (1-\beta_1)\, g, \quad
        m_2 \leftarrow \beta_3 m_2 + (1-\beta_3)\, g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \\
        p \leftarrow p - \eta \left( \frac{m_1/(1-\beta_1^t) + \alpha\, m_2}
        {\sqrt{v/(1-\beta_2^t) + \bar\epsilon} + \epsilon} + \lambda p \right)

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\beta_3` =
    ``beta3``, :math:`\alpha` = ``alpha``, :math:`\epsilon` = ``eps``, :math:`\bar\epsilon` =
    ``eps_root``, :math:`\lambda` = ``weight_decay`` and :math:`t` the steps this parameter has
    taken. The slow average :math:`m_2` is not bias-corrected: it fills slowly on purpose. The
    paper warms :math:`\alpha` and :math:`\beta_3` up over the first steps; any hyper-parameter
    may be a schedule, evaluated at the steps the rule has taken (0 first), as optax evaluates
    ``alpha`` and ``b3``: ``AdEMAMix(alpha=ost.schedules.linear(0.0, 5.0, 10_000))``.
    ``mu_dtype`` (keyword-only) keeps :math:`m_1` and :math:`m_2` in another dtype.

    Reproduces ``optax.contrib.ademamix`` (whose ``b1, b2, b3`` are ``betas`` and ``beta3``),
    schedules included.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        beta3: :math:`\beta_3`, the decay rate of the slow average :math:`m_2`, in [0, 1).
        alpha: :math:`\alpha`, the weight of the slow average.
        eps: :math:`\epsilon`, added to the root of the second moment.
        eps_root: :math:`\bar\epsilon`, added to the second moment under the root.
        weight_decay: :math:`\lambda`, multiplied by ``lr``.
        mu_dtype: the dtype of :math:`m_1` and :math:`m_2` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"w": np.zeros(2)}
        >>> state = ost.setup(ost.AdEMAMix(0.1, alpha=0.0), model)
        >>> state, model = ost.update(state, model, {"w": np.array([3.0, -1.0])})
        >>> np.round(model["w"], 6)  # with alpha = 0, Adam's first step: lr sign(g)
        array([-0.1,  0.1])

    Reference: Pagliardini, Ablin and Grangier, *The AdEMAMix Optimizer: Better, Faster, Older*
    (ICLR 2025), https://arxiv.org/abs/2409.03137
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    beta3: float = hyper(0.9999, min=0, below=1)
    alpha: float = hyper(5.0, min=0)
    eps: float = hyper(1e-8, min=0)
    eps_root: float = hyper(0.0, min=0)
    weight_decay: float = hyper(0.0, min=0)
    _: KW_ONLY
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> AdEMAMixState:
        xp = namespace(param)
        return AdEMAMixState(
            m1=moment_zeros(self, self.mu_dtype, param),
            m2=moment_zeros(self, self.mu_dtype, param),
            nu=xp.zeros_like(param, dtype=real_dtype(xp, param)),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        dtype, real = grad.dtype, real_dtype(xp, grad)
        wide = scalar_dtype(xp, grad)
        beta1, beta2 = hyper["betas"]
        b1, b2, b3, alpha, eps, eps_root, lr, decay = scalars(
            xp,
            wide,
            beta1,
            beta2,
            hyper["beta3"],
            hyper["alpha"],
            hyper["eps"],
            hyper["eps_root"],
            hyper["lr"],
            hyper["weight_decay"],
        )
        m1 = cast(1 - b1, dtype) * grad + cast(cast(b1, state.m1.dtype) * state.m1, dtype)
        m2 = cast(1 - b3, dtype) * grad + cast(cast(b3, state.m2.dtype) * state.m2, dtype)
        nu = cast(1 - b2, real) * abs2(xp, grad) + cast(b2, real) * state.nu
        count = increment(state.count)
        t = cast(count, wide)
        m1_hat = m1 / cast(xp.asarray(1 - b1**t), dtype)
        nu_hat = nu / cast(xp.asarray(1 - b2**t), real)
        denominator = xp.sqrt(nu_hat + cast(eps_root, real)) + cast(eps, real)
        direction = (m1_hat + cast(alpha, dtype) * m2) / cast(denominator, dtype)
        step = cast(lr, dtype) * (direction + cast(decay, dtype) * param)
        return AdEMAMixState(cast(m1, state.m1.dtype), cast(m2, state.m2.dtype), nu, count), step
