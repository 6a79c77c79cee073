"""Adafactor: second moments kept as row and column factors for parameters of rank >= 2."""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from .._arrays import reduced_zeros
from ._contract import Rule, increment
from ._numerics import cast, finfo, isdtype, namespace, scalars
from ._validate import Hyper, flag, hyper, one_of, positive_int, static


class AdafactorState(NamedTuple):
    row: Any  # factored: mean of g^2 over the column axis, kept as a length-1 axis; else None
    col: Any  # factored: mean of g^2 over the row axis, kept as a length-1 axis; else None
    v: Any  # unfactored: the full second moment, the parameter's shape; else None
    count: Any  # steps taken by this parameter, int32


@dataclass(frozen=True)
class Adafactor(Rule):
    r"""Adafactor: ``Adafactor(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
    weight_decay=0.0, *, relative_step=True, factor_axes="last", min_dim_size_to_factor=1)``.

    At step :math:`t` of a parameter with :math:`n` elements, :math:`\hat\beta_t = 1 - t^{\tau}`,
    :math:`\rho_t = \min(\eta, 1/\sqrt t)` and
    :math:`\alpha_t = \max(\epsilon_2, \operatorname{RMS}(p))\, \rho_t`. A parameter of rank >= 2
    keeps row and column factors of its second moment: with :math:`G = g^2` averaged over the
    column axis (one value per row) or the row axis (one per column),

    .. math::
        R \leftarrow \hat\beta_t R + (1-\hat\beta_t) \operatorname{mean}_{\text{col}} G, \qquad
        C \leftarrow \hat\beta_t C + (1-\hat\beta_t) \operatorname{mean}_{\text{row}} G, \qquad
        V = \frac{R\, C}{\max(\operatorname{mean}_{\text{row}} R,\ \epsilon_1)}

    (any other axes are batch axes); for rank < 2,
    :math:`V \leftarrow \hat\beta_t V + (1-\hat\beta_t)\, g^2`. Then

    .. math::
        U = \frac{g}{\sqrt{\max(V, \epsilon_1^2)}}, \qquad
        p \leftarrow p - \eta \lambda\, p
            - \frac{\alpha_t}{\max\big(1, \operatorname{RMS}(U) / d\big)}\, U

    with :math:`\eta` = ``lr``, :math:`\tau` = ``beta2_decay``, :math:`(\epsilon_1, \epsilon_2)` =
    ``eps`` (:math:`\epsilon_1` = ``None`` is the machine epsilon of the parameter's dtype),
    :math:`d` = ``d`` and :math:`\lambda` = ``weight_decay``. RMS and the factors are taken over one
    whole (unique) parameter: a tied weight keeps one pair of factors. The scalars
    (:math:`t^\tau, \rho_t, \alpha_t` and the clipping divisor) are computed in the
    hyper-parameters' precision (float64 for NumPy), as torch computes them in Python.

    Reproduces ``torch.optim.Adafactor`` (same arguments and defaults; it factors the last two
    axes of every parameter of rank >= 2). Options taking optax's conventions
    (``optax.adafactor``): ``relative_step=False`` makes :math:`\rho_t = \eta`;
    ``factor_axes="largest"`` factors the two largest axes instead of the last two; and
    ``min_dim_size_to_factor`` (optax's default is 128) keeps a full second moment when the
    smaller of the two factored axes is shorter. With these three, ``eps=(eps1, 1e-3)`` and
    ``weight_decay = w / lr``, this is ``optax.adafactor(lr, min_dim_size_to_factor,
    decay_rate=-beta2_decay, clipping_threshold=d, weight_decay_rate=w)`` up to where
    :math:`\epsilon` acts (optax adds 1e-30 to :math:`g^2`; here :math:`\epsilon_1` bounds the
    denominators), which matters only for squared gradients below :math:`\epsilon_1^2`. Not
    exposed: optax's ``momentum``, ``decay_offset`` and ``multiply_by_parameter_scale=False``.
    Complex parameters are refused, as torch refuses them.

    Args:
        lr: the learning rate :math:`\eta` (the bound of :math:`\rho_t` with ``relative_step``).
        beta2_decay: :math:`\tau`, the exponent of the decay :math:`1 - t^{\tau}`, at most 0.
        eps: :math:`(\epsilon_1, \epsilon_2)`: the floor of the second moment's root (``None``:
            the dtype's machine epsilon) and of the parameter's RMS.
        d: the clipping threshold :math:`d` of :math:`\operatorname{RMS}(U)`.
        weight_decay: :math:`\lambda`, multiplied by ``lr``.
        relative_step: :math:`\rho_t = \min(\eta, 1/\sqrt t)`; ``False``: :math:`\rho_t = \eta`
            (keyword-only).
        factor_axes: ``"last"`` (torch) or ``"largest"`` (optax): which two axes are factored
            (keyword-only).
        min_dim_size_to_factor: the shortest factored axis; a parameter with a shorter one keeps a
            full second moment (keyword-only).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Adafactor(), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: V = g^2, U = sign(g), alpha = RMS(p) lr = sqrt(2.5) * 0.01 = 0.0158114
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.984189, 2.015811]), True)

    Reference: Shazeer and Stern, *Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost* (ICML 2018), https://arxiv.org/abs/1804.04235
    """

    lr: float = hyper(1e-2, min=0)
    beta2_decay: float = hyper(-0.8, max=0)
    eps: tuple[float | None, float] = hyper(
        (None, 1e-3), elements=(Hyper(min=0, optional=True), Hyper(min=0))
    )
    d: float = hyper(1.0, min=1)
    weight_decay: float = hyper(0.0, min=0)
    _: KW_ONLY
    relative_step: bool = static(True, check=flag)
    factor_axes: Literal["last", "largest"] = static("last", check=one_of("last", "largest"))
    min_dim_size_to_factor: int = static(1, check=positive_int)

    def _factored_axes(self, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The (row, column) axes to factor over, or ``None`` for a full second moment."""
        if len(shape) < 2:
            return None
        if self.factor_axes == "last":
            row, col = len(shape) - 2, len(shape) - 1
        else:  # optax's choice: the largest axis is the column, the second largest the row
            order = np.argsort(shape)
            row, col = int(order[-2]), int(order[-1])
        if min(shape[row], shape[col]) < self.min_dim_size_to_factor:
            return None
        return row, col

    def init(self, param: Any) -> AdafactorState:
        xp = namespace(param)
        if isdtype(xp, param.dtype, "complex floating"):
            raise TypeError(
                f"Adafactor does not support complex parameters (nor does torch.optim.Adafactor); "
                f"got {param.dtype}{list(param.shape)}"
            )
        count = xp.zeros((), dtype=xp.int32)
        shape = tuple(param.shape)
        axes = self._factored_axes(shape)
        if axes is None:
            return AdafactorState(None, None, xp.zeros_like(param), count)
        row, col = axes
        row_shape = tuple(1 if i == col else n for i, n in enumerate(shape))
        col_shape = tuple(1 if i == row else n for i, n in enumerate(shape))
        return AdafactorState(
            reduced_zeros(param, row_shape, param.dtype),
            reduced_zeros(param, col_shape, param.dtype),
            None,
            count,
        )

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        dtype = grad.dtype
        # The scalar schedule in the hyper-parameters' precision (torch computes it in Python).
        wide = xp.asarray(hyper["lr"]).dtype
        lr, tau, d, decay = scalars(
            xp, wide, hyper["lr"], hyper["beta2_decay"], hyper["d"], hyper["weight_decay"]
        )
        eps1, eps2 = hyper["eps"]
        eps1, eps2 = scalars(xp, wide, finfo(xp, dtype).eps if eps1 is None else eps1, eps2)
        root_n = math.sqrt(math.prod(grad.shape))

        count = increment(state.count)
        t = cast(count, wide)
        rho = xp.minimum(lr, 1 / xp.sqrt(t)) if self.relative_step else lr
        param_rms = cast(xp.asarray(xp.linalg.vector_norm(param)), wide) / root_n
        alpha = xp.maximum(eps2, param_rms) * rho
        weight = cast(t**tau, dtype)  # 1 - beta2_t

        square = grad * grad
        axes = self._factored_axes(tuple(grad.shape))
        if axes is None:
            v = state.v + weight * (square - state.v)
            row = col = None
            variance = v
        else:
            r, c = axes
            row = state.row + weight * (xp.mean(square, axis=c, keepdims=True) - state.row)
            col = state.col + weight * (xp.mean(square, axis=r, keepdims=True) - state.col)
            v = None
            row_mean = xp.mean(row, axis=r, keepdims=True)
            variance = row * col / xp.maximum(row_mean, cast(eps1, dtype))
        update = (1 / xp.sqrt(xp.maximum(variance, cast(eps1 * eps1, dtype)))) * grad
        update_norm = cast(xp.asarray(xp.linalg.vector_norm(update)), wide)
        (one,) = scalars(xp, wide, 1)
        rate = alpha / xp.maximum(one, update_norm / (root_n * d))
        step = cast(rate, dtype) * update + cast(lr * decay, dtype) * param
        return AdafactorState(row, col, v, count), step
