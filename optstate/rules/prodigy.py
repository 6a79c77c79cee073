"""Prodigy: AdamW whose learning rate is estimated from the distance travelled."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import AcrossParameters, increment
from ._numerics import (
    abs2,
    cast,
    isdtype,
    namespace,
    real_dtype,
    scalar_dtype,
    select,
    wide_dtype,
)
from ._validate import flag, hyper, static


class ProdigyState(NamedTuple):
    exp_avg: Any  # m, the moving average of d g
    exp_avg_sq: Any  # v, the moving average of |d g|^2 (real-valued)
    grad_sum: Any  # s, the weighted sum of d g that estimates the distance's denominator
    params0: Any  # the parameter's value at setup
    d: Any  # the estimate of the learning rate (the group's, a 0-d real array; 0 before a step)
    numerator: Any  # the weighted numerator of that estimate (the group's, a 0-d real array)
    count: Any  # the group's steps, int32


@dataclass(frozen=True)
class Prodigy(AcrossParameters):
    r"""Prodigy, learning-rate-free AdamW: ``Prodigy(lr=1.0, betas=(0.9, 0.999), beta3=None,
    eps=1e-8, d0=1e-6, d_coef=1.0, weight_decay=0.0; safeguard_warmup=False)``.

    With :math:`d` the estimate of the learning rate (starting at :math:`d_0`) and
    :math:`\hat\eta = d\, \eta\, \sqrt{1-\beta_2^t}/(1-\beta_1^t)`, at step :math:`t` for every
    parameter :math:`p` of the rule's group:

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, d g, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |d g|^2, \quad
        s \leftarrow \beta_3 s + \frac{\hat\eta}{d_0}\, d g, \\
        N \leftarrow \beta_3 N + \frac{d}{d_0}\, \hat\eta \sum_p \langle g, p_0 - p \rangle,
        \quad d \leftarrow \max\!\left(d,\ c\, \frac{N}{\sum_p \lVert s \rVert_1}\right), \\
        p \leftarrow p - \hat\eta \left( \frac{m}{\sqrt{v} + d\,\epsilon} + \lambda p \right)

    with :math:`\eta` = ``lr`` (a schedule multiplying the estimate, 1 at its peak),
    :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\beta_3` = ``beta3`` (``None``:
    :math:`\sqrt{\beta_2}`), :math:`\epsilon` = ``eps``, :math:`d_0` = ``d0``, :math:`c` =
    ``d_coef``, :math:`\lambda` = ``weight_decay`` and :math:`p_0` the parameter at ``setup``.
    :math:`\hat\eta` uses :math:`d` before the step, the last term :math:`d` after it.
    ``safeguard_warmup=True`` (keyword-only) uses :math:`d` instead of :math:`\hat\eta` in
    :math:`s`.

    The estimate is one for all parameters of the rule's group: the sums run over every
    parameter with a gradient this step, a tied one counted once, as a single parameter would
    be. A parameter without a gradient does not take part: its moments hold, and it takes the
    group's :math:`d` when it next steps. For complex parameters :math:`\langle\cdot\rangle` is
    the real part of the inner product and :math:`|\cdot|` the modulus.

    Reproduces ``optax.contrib.prodigy`` (whose ``estim_lr0`` and ``estim_lr_coef`` are ``d0``
    and ``d_coef``), all parameters together.

    Args:
        lr: :math:`\eta`, the factor of the estimate (1, or a schedule peaking at 1).
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of :math:`m` and :math:`v`, in [0, 1).
        beta3: :math:`\beta_3`, the decay rate of :math:`s` and :math:`N` (``None``:
            :math:`\sqrt{\beta_2}`).
        eps: :math:`\epsilon`, added to :math:`\sqrt v` (scaled by :math:`d`).
        d0: :math:`d_0`, the first estimate.
        d_coef: :math:`c`, the factor of every new estimate.
        weight_decay: :math:`\lambda`, multiplied by :math:`\hat\eta`.
        safeguard_warmup: use :math:`d` in place of :math:`\hat\eta` in :math:`s` (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"w": np.zeros(2), "b": np.zeros(1)}
        >>> state = ost.setup(ost.Prodigy(), model)
        >>> for _ in range(20):
        ...     grads = {"w": 2 * (model["w"] - 3.0), "b": 2 * (model["b"] + 1.0)}
        ...     state, model = ost.update(state, model, grads)
        >>> bool(state.states[0].d > 100 * 1e-6)  # d grew from d0 towards the distance, 3
        True

    Reference: Mishchenko and Defazio, *Prodigy: An Expeditiously Adaptive Parameter-Free
    Learner* (ICML 2024), https://arxiv.org/abs/2306.06101
    """

    lr: float = hyper(1.0, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    beta3: float | None = hyper(None, min=0, below=1, optional=True)
    eps: float = hyper(1e-8, min=0)
    d0: float = hyper(1e-6, above=0)
    d_coef: float = hyper(1.0, min=0)
    weight_decay: float = hyper(0.0, min=0)
    _: KW_ONLY
    safeguard_warmup: bool = static(False, check=flag)

    def init(self, param: Any) -> ProdigyState:
        xp = namespace(param)
        wide = scalar_dtype(xp, param)
        return ProdigyState(
            exp_avg=xp.zeros_like(param),
            exp_avg_sq=xp.zeros_like(param, dtype=real_dtype(xp, param)),
            grad_sum=xp.zeros_like(param),
            params0=xp.asarray(param, copy=True),  # its own array: a step may donate both
            d=xp.zeros((), dtype=wide),  # d0 until the first step
            numerator=xp.zeros((), dtype=wide),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        hyper = hypers[0]  # the same for every parameter of the group
        xp = namespace(grads[0])
        wide = wide_dtype(xp, xp.float32, *grads)
        # The group's estimate, from the parameter that has taken the most steps (all agree
        # when every parameter steps every time).
        d, numerator, count = states[0].d, states[0].numerator, states[0].count
        d, numerator = cast(d, wide), cast(numerator, wide)
        for s in states[1:]:
            newer = s.count > count
            d, numerator, count = select(
                xp,
                newer,
                (cast(s.d, wide), cast(s.numerator, wide), s.count),
                (d, numerator, count),
            )
        beta1, beta2 = (xp.asarray(b, dtype=wide) for b in hyper["betas"])
        lr, eps, d0, coef, decay = (
            xp.asarray(hyper[k], dtype=wide) for k in ("lr", "eps", "d0", "d_coef", "weight_decay")
        )
        d = xp.where(count == 0, d0, d)
        beta3 = xp.sqrt(beta2) if hyper["beta3"] is None else xp.asarray(hyper["beta3"], dtype=wide)
        count = increment(count)
        t = cast(count, wide)
        dlr = d * lr * xp.sqrt(1 - beta2**t) / (1 - beta1**t)
        triples = list(zip(grads, states, params, strict=True))
        inner = xp.sum(xp.stack([_inner(xp, g, s.params0 - p, wide) for g, s, p in triples]))
        new_parts = []
        for g, s, _ in triples:
            dtype, real = g.dtype, real_dtype(xp, g)
            dg = cast(d, dtype) * g
            exp_avg = cast(beta1, dtype) * s.exp_avg + cast(1 - beta1, dtype) * dg
            exp_avg_sq = cast(beta2, real) * s.exp_avg_sq + cast(1 - beta2, real) * abs2(xp, dg)
            weight = (d if self.safeguard_warmup else dlr) / d0
            grad_sum = cast(beta3, dtype) * s.grad_sum + cast(weight, dtype) * dg
            new_parts.append((exp_avg, exp_avg_sq, grad_sum))
        numerator = beta3 * numerator + (d / d0) * dlr * inner
        denominator = xp.sum(xp.stack([xp.sum(cast(xp.abs(s), wide)) for _, _, s in new_parts]))
        d_new = xp.maximum(d, coef * numerator / denominator)
        new_states, steps = [], []
        for (exp_avg, exp_avg_sq, grad_sum), s, p in zip(new_parts, states, params, strict=True):
            dtype, real = p.dtype, real_dtype(xp, p)
            denom = xp.sqrt(exp_avg_sq) + cast(d_new * eps, real)
            step = cast(dlr * decay, dtype) * p + cast(dlr, dtype) * exp_avg / cast(denom, dtype)
            new_states.append(
                ProdigyState(
                    exp_avg,
                    exp_avg_sq,
                    grad_sum,
                    s.params0,
                    xp.asarray(cast(d_new, s.d.dtype)),  # 0-d: NumPy would make a scalar
                    xp.asarray(cast(numerator, s.numerator.dtype)),
                    count,
                )
            )
            steps.append(step)
        return new_states, steps


def _inner(xp: Any, a: Any, b: Any, wide: Any) -> Any:
    """The real part of ``<a, b>``, in ``wide`` (a real dtype)."""
    if isdtype(xp, a.dtype, "complex floating"):
        return cast(xp.sum(xp.real(a) * xp.real(b) + xp.imag(a) * xp.imag(b)), wide)
    return cast(xp.sum(a * b), wide)
