"""Schedule-free SGD and AdamW: the parameter is an interpolation between an averaged point and
the point the base step moves; ``optstate.eval_params`` gives the averaged point."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import abs2, cast, namespace, real_dtype, scalar_dtype, scalars
from ._validate import Hyper, hyper, static


class ScheduleFreeState(NamedTuple):
    z: Any  # the point the base step moves, in the parameter's dtype
    nu: Any  # AdamW's second moment (real-valued); () for SGD
    count: Any  # steps taken by this parameter, int32
    weight_sum: Any  # the sum of the averaging weights so far (a 0-d real array)
    max_lr: Any  # the largest learning rate so far (a 0-d real array)


def _warmup(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be None or a positive integer, got {value!r}")
    if value < 1:
        raise ValueError(f"must be None or a positive integer, got {value!r}")


def _init(param: Any, adam: bool) -> ScheduleFreeState:
    xp = namespace(param)
    wide = scalar_dtype(xp, param)
    return ScheduleFreeState(
        z=xp.asarray(param, copy=True),  # its own array: a step may donate both
        nu=xp.zeros_like(param, dtype=real_dtype(xp, param)) if adam else (),
        count=xp.zeros((), dtype=xp.int32),
        weight_sum=xp.zeros((), dtype=wide),
        max_lr=xp.zeros((), dtype=wide),
    )


def _rates(xp: Any, lr: Any, count: Any, warmup: int | None) -> tuple[Any, Any]:
    """The learning rate of the base step, and the one that weighs the average. With a warmup
    they are ``lr min(n, W)/W`` and ``lr min(n + 1, W)/W`` for ``n`` steps taken before, as
    optax evaluates its warmup schedule at its base step's count and at its own count (which
    starts at 1)."""
    if warmup is None:
        return lr, lr
    top = xp.asarray(warmup, dtype=count.dtype)
    before = xp.astype(xp.minimum(count, top), lr.dtype)
    after = xp.astype(xp.minimum(count + xp.asarray(1, dtype=count.dtype), top), lr.dtype)
    scale = xp.asarray(warmup, dtype=lr.dtype)
    return lr * before / scale, lr * after / scale


def _step(
    xp: Any,
    state: ScheduleFreeState,
    param: Any,
    base: Any,
    nu: Any,
    lr: Any,
    b1: Any,
    power: Any,
    warmup: int | None,
) -> tuple[ScheduleFreeState, Any]:
    """The schedule-free step around a base direction ``base`` (the new ``z`` is
    ``z - lr base``): the new state and ``p - p_new``."""
    dtype = param.dtype
    base_lr, weight_lr = _rates(xp, lr, state.count, warmup)
    max_lr = xp.maximum(state.max_lr, weight_lr)
    weight = max_lr**power
    total = state.weight_sum + weight
    ratio = weight / total
    # As optax: 0 where the ratio is 0/0 (a zero learning rate so far), NaN where a weight is.
    undefined = xp.logical_or(xp.isnan(weight), xp.isnan(total))
    ck = xp.where(undefined, ratio, xp.where(xp.isnan(ratio), xp.zeros_like(ratio), ratio))
    z = cast(state.z - cast(base_lr, dtype) * base, dtype)
    b1_, ck_ = cast(b1, dtype), cast(ck, dtype)
    x = (param - (1 - b1_) * state.z) / b1_  # the averaged point, recomputed as optax does
    x = (1 - ck_) * x + ck_ * z
    new = b1_ * x + (1 - b1_) * z
    # 0-d results as arrays: NumPy makes them scalars
    new_state = ScheduleFreeState(
        z, nu, increment(state.count), xp.asarray(total), xp.asarray(max_lr)
    )
    return new_state, param - new


def _eval_point(b1: Any, state: ScheduleFreeState, param: Any) -> Any:
    xp = namespace(param)
    (b1,) = scalars(xp, param.dtype, b1)
    return cast((param - (1 - b1) * state.z) / b1, param.dtype)


@dataclass(frozen=True)
class ScheduleFreeSGD(Rule):
    r"""Schedule-free SGD: ``ScheduleFreeSGD(lr=1.0, beta=0.9, weight_decay=0.0,
    weight_lr_power=2.0; warmup_steps=None)``.

    .. math::
        z \leftarrow z - \eta_t (g + \lambda y), \qquad
        c_t = \frac{\eta_{\max}^r}{\sum_{i \le t} \eta_{\max,i}^r}, \\
        x \leftarrow (1 - c_t)\, x + c_t\, z, \qquad y \leftarrow \beta x + (1 - \beta)\, z

    The parameter is :math:`y`, where gradients are taken; :math:`x`, the average of the
    :math:`z` iterates, is the point at which to evaluate the model:
    ``ost.eval_params(state, model)`` returns it, :math:`x = (y - (1-\beta) z)/\beta`, ties kept.
    :math:`\eta` = ``lr``, :math:`\beta` = ``beta`` (in :math:`(0, 1]`), :math:`\lambda` =
    ``weight_decay``, :math:`r` = ``weight_lr_power``, :math:`\eta_{\max}` the largest
    learning rate so far. With ``warmup_steps`` :math:`W` (keyword-only) the learning rate rises
    linearly, :math:`\eta_t = \eta \min(t-1, W)/W` in the step and
    :math:`\eta \min(t, W)/W` in the weight, as in optax; without it, a schedule given as ``lr``
    is used for both at the rule's step count (optax evaluates the weight's one step later).
    The state keeps :math:`z` beside the parameter: the memory of momentum, without a schedule.

    Reproduces ``optax.contrib.schedule_free_sgd`` (``b1`` is ``beta``), and
    ``optax.contrib.schedule_free_eval_params`` with ``eval_params``.

    Args:
        lr: the learning rate :math:`\eta`.
        beta: :math:`\beta`, the interpolation between :math:`x` and :math:`z`, in (0, 1].
        weight_decay: :math:`\lambda`, applied at :math:`y`.
        weight_lr_power: :math:`r`, the power of the learning rate in the averaging weights.
        warmup_steps: :math:`W`, the steps of a linear warm-up (``None``: none; keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"w": np.array([1.0, 2.0])}
        >>> state = ost.setup(ost.ScheduleFreeSGD(0.5), model)
        >>> for _ in range(2):  # z moves by lr g; x averages the z; y lies between
        ...     state, model = ost.update(state, model, {"w": np.array([1.0, 1.0])})
        >>> model["w"], ost.eval_params(state, model)["w"]
        (array([0.225, 1.225]), array([0.25, 1.25]))

    Reference: Defazio et al., *The Road Less Scheduled* (NeurIPS 2024),
    https://arxiv.org/abs/2405.15682
    """

    lr: float = hyper(1.0, min=0)
    beta: float = hyper(0.9, above=0, max=1)
    weight_decay: float = hyper(0.0, min=0)
    weight_lr_power: float = hyper(2.0, min=0)
    _: KW_ONLY
    warmup_steps: int | None = static(None, check=_warmup)

    def init(self, param: Any) -> ScheduleFreeState:
        return _init(param, adam=False)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        lr, b1, power, decay = scalars(
            xp,
            scalar_dtype(xp, grad),
            hyper["lr"],
            hyper["beta"],
            hyper["weight_lr_power"],
            hyper["weight_decay"],
        )
        base = grad + cast(decay, grad.dtype) * param
        return _step(xp, state, param, base, (), lr, b1, power, self.warmup_steps)

    def eval_point(self, hyper: Any, state: Any, param: Any) -> Any:
        """The point at which to evaluate the model, :math:`x = (y - (1-\\beta) z)/\\beta`."""
        return _eval_point(hyper["beta"], state, param)


@dataclass(frozen=True)
class ScheduleFreeAdamW(Rule):
    r"""Schedule-free AdamW: ``ScheduleFreeAdamW(lr=0.0025, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0.0, weight_lr_power=2.0; warmup_steps=None)``.

    ``ScheduleFreeSGD`` (see there for :math:`x`, :math:`y`, :math:`z`, the weights and the
    warmup) around an Adam step without momentum:

    .. math::
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \qquad
        z \leftarrow z - \eta_t \left( \frac{g}{\sqrt{v/(1-\beta_2^t)} + \epsilon}
        + \lambda y \right)

    with :math:`(\beta_1, \beta_2)` = ``betas`` (:math:`\beta_1` the interpolation weight, in
    :math:`(0, 1]`), :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``.
    ``ost.eval_params(state, model)`` returns :math:`x`, the model to evaluate.

    Reproduces ``optax.contrib.schedule_free_adamw`` (and its ``schedule_free_eval_params``).

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: the interpolation weight, in (0, 1], and the decay
            rate of :math:`v`, in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        weight_decay: :math:`\lambda`, applied at :math:`y`.
        weight_lr_power: :math:`r`, the power of the learning rate in the averaging weights.
        warmup_steps: :math:`W`, the steps of a linear warm-up (``None``: none; keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> model = {"w": np.zeros(2)}
        >>> state = ost.setup(ost.ScheduleFreeAdamW(0.1), model)
        >>> for _ in range(2):
        ...     state, model = ost.update(state, model, {"w": np.array([2.0, -1.0])})
        >>> np.round(model["w"], 4), np.round(ost.eval_params(state, model)["w"], 4)
        (array([-0.155,  0.155]), array([-0.15,  0.15]))

    Reference: Defazio et al., *The Road Less Scheduled* (NeurIPS 2024),
    https://arxiv.org/abs/2405.15682
    """

    lr: float = hyper(0.0025, min=0)
    betas: tuple[float, float] = hyper(
        (0.9, 0.999), elements=(Hyper(above=0, max=1), Hyper(min=0, below=1))
    )
    eps: float = hyper(1e-8, min=0)
    weight_decay: float = hyper(0.0, min=0)
    weight_lr_power: float = hyper(2.0, min=0)
    _: KW_ONLY
    warmup_steps: int | None = static(None, check=_warmup)

    def init(self, param: Any) -> ScheduleFreeState:
        return _init(param, adam=True)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        dtype, real = grad.dtype, real_dtype(xp, grad)
        wide = scalar_dtype(xp, grad)
        beta1, beta2 = hyper["betas"]
        lr, b1, b2, eps, power, decay = scalars(
            xp,
            wide,
            hyper["lr"],
            beta1,
            beta2,
            hyper["eps"],
            hyper["weight_lr_power"],
            hyper["weight_decay"],
        )
        nu = cast(1 - b2, real) * abs2(xp, grad) + cast(b2, real) * state.nu
        t = cast(increment(state.count), wide)
        nu_hat = nu / cast(xp.asarray(1 - b2**t), real)
        scaling = 1 / (xp.sqrt(nu_hat) + cast(eps, real))
        base = cast(scaling, dtype) * grad + cast(decay, dtype) * param
        return _step(xp, state, param, base, nu, lr, b1, power, self.warmup_steps)

    def eval_point(self, hyper: Any, state: Any, param: Any) -> Any:
        """The point at which to evaluate the model, :math:`x = (y - (1-\\beta_1) z)/\\beta_1`."""
        return _eval_point(hyper["betas"][0], state, param)
