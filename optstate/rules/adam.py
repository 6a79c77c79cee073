"""Adam and AdamW."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from . import _fused
from ._contract import Rule, increment
from ._numerics import abs2, cast, moment_zeros, namespace, real_dtype, scalar_dtype, scalars
from ._validate import floating_dtype, hyper, static


class AdamState(NamedTuple):
    mu: Any  # first moment m, the parameter's dtype
    nu: Any  # second moment v, real-valued (the real dtype of a complex parameter)
    count: Any  # steps taken by this parameter, int32


def _init(rule: Rule, param: Any, mu_dtype: Any) -> AdamState:
    xp = namespace(param)
    return AdamState(
        mu=moment_zeros(rule, mu_dtype, param),
        nu=xp.zeros_like(param, dtype=real_dtype(xp, param)),
        count=xp.zeros((), dtype=xp.int32),
    )


def _direction(hyper: Any, state: AdamState, grad: Any) -> tuple[AdamState, Any]:
    """Advance the moments; return them and the bias-corrected ``m_hat / (sqrt(v_hat) + eps)``.

    The scalars (``1 - beta``, the bias corrections) are computed in at least float32 and only
    then cast to the parameter's dtype: in bfloat16, ``0.999`` rounds to 1 and ``1 - beta2**t``
    would be 0. The first moment is kept in its own dtype (``mu_dtype``).
    """
    xp = namespace(grad)
    dtype, real = grad.dtype, real_dtype(xp, grad)
    wide = scalar_dtype(xp, grad)
    beta1, beta2 = hyper["betas"]
    b1, b2, eps = scalars(xp, wide, beta1, beta2, hyper["eps"])
    count = increment(state.count)
    t = cast(count, wide)
    # The decay of m happens in m's own dtype, as in optax (it matters with ``mu_dtype``).
    mu = cast(cast(b1, state.mu.dtype) * state.mu, dtype) + cast(1 - b1, dtype) * grad
    nu = cast(b2, real) * state.nu + cast(1 - b2, real) * abs2(xp, grad)
    mu_hat = mu / cast(xp.asarray(1 - b1**t), dtype)
    nu_hat = nu / cast(xp.asarray(1 - b2**t), real)
    direction = mu_hat / cast(xp.sqrt(nu_hat) + cast(eps, real), dtype)
    return AdamState(cast(mu, state.mu.dtype), nu, count), direction


def _fused_(
    hyper: Any, states: list[AdamState], params: list[Any], grads: list[Any], decay: float | None
) -> bool:
    """Adam (AdamW with ``decay``) by torch's fused kernel, if the tensors allow it."""
    mus, nus = [s.mu for s in states], [s.nu for s in states]
    if not _fused.fits(params, grads, [mus, nus], [s.count for s in states]):
        return False
    beta1, beta2 = (float(b) for b in hyper["betas"])
    _fused.adam_(
        params, grads, mus, nus, [s.count for s in states],
        lr=float(hyper["lr"]), beta1=beta1, beta2=beta2, eps=float(hyper["eps"]), decay=decay,
    )  # fmt: skip
    return True


@dataclass(frozen=True)
class Adam(Rule):
    r"""Adam: ``Adam(lr=1e-3, betas=(0.9, 0.999), eps=1e-8)``.

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        v \leftarrow \beta_2 v + (1-\beta_2)\, |g|^2, \\
        p \leftarrow p - \eta\, \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\epsilon` = ``eps``,
    and :math:`t` the number of steps this parameter has taken (a parameter that receives no
    gradient does not advance). :math:`\epsilon` is added outside the square root. ``mu_dtype``
    (keyword-only) stores :math:`m` in another dtype, e.g. ``jnp.bfloat16`` to halve its memory,
    as optax's ``mu_dtype``. Reproduces
    ``torch.optim.Adam`` and ``optax.adam`` (whose arithmetic agrees); for complex parameters
    :math:`v` is real, as in optax.

    ``update_`` on contiguous torch tensors of one device and one float dtype (16-bit included)
    with moments in that dtype, where this rule is the step's only one, runs torch's fused kernel
    (``torch._fused_adam_``, as ``torch.optim.Adam(fused=True)``; see docs/pytorch.md).

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range (``lr < 0``, a beta outside [0, 1)).
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Adam(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> # first step: p - lr sign(g)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]
        (array([0.9, 2.1]), True)

    Reference: Kingma and Ba, *Adam: A Method for Stochastic Optimization* (ICLR 2015),
    https://arxiv.org/abs/1412.6980
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    _: KW_ONLY
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> AdamState:
        return _init(self, param, self.mu_dtype)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        state, direction = _direction(hyper, state, grad)
        (lr,) = scalars(namespace(grad), grad.dtype, hyper["lr"])
        return state, lr * direction

    def fused_(self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]) -> bool:
        return _fused_(hyper, states, params, grads, None)


@dataclass(frozen=True)
class AdamW(Rule):
    r"""Adam with decoupled weight decay:
    ``AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)``.

    .. math::
        p \leftarrow p - \eta \left( \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \lambda\, p \right)

    with :math:`\hat m, \hat v` the bias-corrected moments of ``Adam`` and :math:`\lambda` =
    ``weight_decay``; the decay acts on the parameter, not through the moments. Reproduces
    ``torch.optim.AdamW`` (default ``weight_decay=1e-2``) and ``optax.adamw``.

    ``update_``, where the tensors allow it (see ``Adam``), runs torch's fused kernel
    (``torch._fused_adamw_``, as ``torch.optim.AdamW(fused=True)``).

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, the decay rates of the two moments, each in [0, 1).
        eps: :math:`\epsilon`, added to the root of the second moment.
        weight_decay: :math:`\lambda`, multiplied by ``lr``.
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.AdamW(lr=0.1, weight_decay=0.5), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]  # p - lr (sign(g) + 0.5 p)
        (array([0.85, 2.  ]), True)

    Reference: Loshchilov and Hutter, *Decoupled Weight Decay Regularization* (ICLR 2019),
    https://arxiv.org/abs/1711.05101
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.999), min=0, below=1)
    eps: float = hyper(1e-8, min=0)
    weight_decay: float = hyper(1e-2, min=0)
    _: KW_ONLY
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> AdamState:
        return _init(self, param, self.mu_dtype)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        state, direction = _direction(hyper, state, grad)
        xp = namespace(grad)
        lr, decay = scalars(xp, grad.dtype, hyper["lr"], hyper["weight_decay"])
        return state, lr * (direction + decay * param)

    def fused_(self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]) -> bool:
        return _fused_(hyper, states, params, grads, float(hyper["weight_decay"]))
