"""ADOPT: Adam with the second moment of the previous step, and the first step spent on it."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import (
    abs2,
    cast,
    isdtype,
    moment_zeros,
    namespace,
    real_dtype,
    scalar_dtype,
    scalars,
)
from ._validate import flag, floating_dtype, hyper, static


class AdoptState(NamedTuple):
    mu: Any  # first moment m of the normalised gradients (``mu_dtype``)
    nu: Any  # second moment v, real-valued
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class Adopt(Rule):
    r"""ADOPT: ``Adopt(lr=1e-3, betas=(0.9, 0.9999), eps=1e-6)``.

    .. math::
        \text{step 1:}\quad v \leftarrow |g|^2, \quad p \text{ unchanged}; \qquad
        \text{step } t > 1\text{:} \\
        u = \mathrm{clip}\!\left(\frac{g}{\max(\sqrt{v}, \epsilon)}, t_0^{1/4}\right), \quad
        m \leftarrow \beta_1 m + (1-\beta_1)\, u, \quad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \quad
        p \leftarrow p - \eta\, m

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` =
    ``eps`` and :math:`t_0 = t - 1` the steps taken before this one. The gradient is normalised
    by the second moment *before* it takes in :math:`g`, so the two are independent, which is
    what lets ADOPT converge for any :math:`\beta_2`. ``clip(x, c)`` bounds each element to
    :math:`[-c, c]` (for complex gradients the real and imaginary parts apart); it is skipped with
    ``use_clipping=False``. ``nesterov=True`` steps by :math:`\beta_1 m + (1-\beta_1) u` with the
    new :math:`m`. ``mu_dtype`` keeps :math:`m` in another dtype. All options are keyword-only.

    Reproduces ``optax.contrib.adopt`` (with its default ``clip_value_fn``,
    :math:`t_0^{1/4}`); the defaults are optax's and the paper's.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of :math:`m` and :math:`v`, in [0, 1).
        eps: :math:`\epsilon`, the floor of :math:`\sqrt{v}`.
        nesterov: step by :math:`\beta_1 m + (1-\beta_1) u` (keyword-only).
        use_clipping: clip the normalised gradient to :math:`t_0^{1/4}` (keyword-only).
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"w": np.ones(2)}
        >>> state = ost.setup(ost.Adopt(0.1), model)
        >>> for _ in range(2):
        ...     state, model = ost.update(state, model, {"w": np.array([2.0, -1.0])})
        >>> model["w"]  # the first step set v; the second moved by lr (1 - beta1) sign(g)
        array([0.99, 1.01])

    Reference: Taniguchi et al., *ADOPT: Modified Adam Can Converge with Any beta2 with the
    Optimal Rate* (NeurIPS 2024), https://arxiv.org/abs/2411.02853
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.9999), min=0, below=1)
    eps: float = hyper(1e-6, min=0)
    _: KW_ONLY
    nesterov: bool = static(False, check=flag)
    use_clipping: bool = static(True, check=flag)
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> AdoptState:
        xp = namespace(param)
        return AdoptState(
            mu=moment_zeros(self, self.mu_dtype, param),
            nu=xp.zeros_like(param, dtype=real_dtype(xp, param)),
            count=xp.zeros((), dtype=xp.int32),
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        dtype, real = grad.dtype, real_dtype(xp, grad)
        wide = scalar_dtype(xp, grad)
        beta1, beta2 = hyper["betas"]
        b1, b2, eps, lr = scalars(xp, wide, beta1, beta2, hyper["eps"], hyper["lr"])
        started = state.count > 0
        # The first step only fills v: beta2 is 0 and beta1 is 1 there.
        b1 = xp.where(started, b1, xp.ones_like(b1))
        b2 = xp.where(started, b2, xp.zeros_like(b2))
        nu = cast(1 - b2, real) * abs2(xp, grad) + cast(b2, real) * state.nu
        normalised = grad / cast(xp.maximum(xp.sqrt(state.nu), cast(eps, real)), dtype)
        if self.use_clipping:
            bound = cast(cast(state.count, wide) ** 0.25, real)
            normalised = _clip(xp, normalised, bound)
        mu_dtype = state.mu.dtype
        mu = cast(1 - b1, dtype) * normalised + cast(cast(b1, mu_dtype) * state.mu, dtype)
        direction = cast(1 - b1, dtype) * normalised + cast(b1, dtype) * mu if self.nesterov else mu
        new = AdoptState(cast(mu, mu_dtype), nu, increment(state.count))
        return new, cast(lr, dtype) * direction


def _clip(xp: Any, x: Any, bound: Any) -> Any:
    """Each element of ``x`` within ``[-bound, bound]``; real and imaginary parts apart."""
    if isdtype(xp, x.dtype, "complex floating"):
        re, im = xp.clip(xp.real(x), -bound, bound), xp.clip(xp.imag(x), -bound, bound)
        return cast(re, x.dtype) + xp.asarray(1j, dtype=x.dtype) * cast(im, x.dtype)
    return xp.clip(x, -bound, bound)
