"""Rules that step by the sign of something: Lion, Signum, SignDecay and Rprop."""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule, increment
from ._numerics import cast, isdtype, moment_zeros, namespace, real_dtype, scalars
from ._validate import Hyper, floating_dtype, hyper, static


def _wider(a: Any, b: Any) -> Any:
    """The more precise of two dtypes of the same kind: where a moment of another dtype meets the
    gradient, arithmetic happens in this one (optax's promotion)."""
    return a if a.itemsize >= b.itemsize else b


def _ema(xp: Any, beta: Any, moment: Any, grad: Any, wide: Any) -> Any:
    """``(1 - beta) * grad + beta * moment`` in ``wide``; each product in its array's own dtype,
    as optax's weakly typed Python scalars compute it."""
    (c,) = scalars(xp, grad.dtype, 1 - beta)
    (b,) = scalars(xp, moment.dtype, beta)
    return cast(c * grad, wide) + cast(b * moment, wide)


def _sign(xp: Any, x: Any) -> Any:
    """``sign(x)``; for complex ``x``, ``x / |x|`` (0 at 0, without dividing by it)."""
    if not isdtype(xp, x.dtype, "complex floating"):
        return xp.sign(x)
    magnitude = xp.abs(x)
    zero = magnitude == 0
    safe = cast(xp.where(zero, xp.ones_like(magnitude), magnitude), x.dtype)
    return xp.where(zero, xp.zeros_like(x), x / safe)


class LionState(NamedTuple):
    mu: Any  # the momentum m, in mu_dtype (the parameter's dtype by default)


@dataclass(frozen=True)
class Lion(Rule):
    r"""Lion, evolved sign momentum:
    ``Lion(lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-3, *, mu_dtype=None)``.

    .. math::
        c \leftarrow \beta_1 m + (1-\beta_1)\, g, \qquad
        p \leftarrow p - \eta \left( \operatorname{sign}(c) + \lambda\, p \right), \qquad
        m \leftarrow \beta_2 m + (1-\beta_2)\, g

    with :math:`\eta` = ``lr``, :math:`(\beta_1, \beta_2)` = ``betas``, :math:`\lambda` =
    ``weight_decay`` (multiplied by the learning rate, decoupled from the momentum) and :math:`m`
    starting at zero. The step interpolates with :math:`\beta_1`, the momentum tracks with
    :math:`\beta_2`. ``mu_dtype`` stores :math:`m` in another dtype (e.g. ``"bfloat16"``);
    arithmetic happens in the wider of it and the parameter's dtype.

    Reproduces ``optax.lion`` (its ``b1, b2, weight_decay, mu_dtype``), including complex
    parameters, where :math:`\operatorname{sign}(z) = z / |z|`. Defaults: optax's betas and decay;
    optax has no default learning rate, 1e-3 is Optimisers.jl's (the paper advises 3-10 times
    smaller than AdamW's). torch.optim has no Lion.

    Args:
        lr: the learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`: the interpolation of the step and the decay of the
            momentum, each in [0, 1).
        weight_decay: :math:`\lambda`, multiplied by ``lr``.
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Lion(lr=0.1, weight_decay=0.0), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]  # p - lr sign(g)
        (array([0.9, 2.1]), True)

    Reference: Chen et al., *Symbolic Discovery of Optimization Algorithms* (NeurIPS 2023),
    https://arxiv.org/abs/2302.06675
    """

    lr: float = hyper(1e-3, min=0)
    betas: tuple[float, float] = hyper((0.9, 0.99), min=0, max=1)
    weight_decay: float = hyper(1e-3, min=0)
    _: KW_ONLY
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> LionState:
        return LionState(moment_zeros(self, self.mu_dtype, param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        mu = state.mu
        wide = _wider(grad.dtype, mu.dtype)
        beta1, beta2 = hyper["betas"]
        (decay,) = scalars(xp, param.dtype, hyper["weight_decay"])
        (lr,) = scalars(xp, wide, hyper["lr"])
        direction = _sign(xp, _ema(xp, beta1, mu, grad, wide)) + cast(decay * param, wide)
        new_mu = cast(_ema(xp, beta2, mu, grad, wide), mu.dtype)
        return LionState(new_mu), cast(lr * direction, grad.dtype)


class SignumState(NamedTuple):
    mu: Any  # the momentum m, in mu_dtype (the parameter's dtype by default)


@dataclass(frozen=True)
class Signum(Rule):
    r"""Sign of momentum: ``Signum(lr=0.01, beta=0.9, *, mu_dtype=None)``.

    .. math::
        m \leftarrow \beta\, m + (1-\beta)\, g, \qquad
        p \leftarrow p - \eta\, \operatorname{sign}(m)

    with :math:`\eta` = ``lr``, :math:`\beta` = ``beta`` and :math:`m` starting at zero (no bias
    correction: it would not change the sign). ``beta=0`` is signSGD. ``mu_dtype`` stores
    :math:`m` in another dtype; the sign is taken before :math:`m` is rounded to it.

    Reproduces ``optax.signum`` (``beta``; ``mu_dtype`` is its ``accumulator_dtype``), including
    complex parameters, where :math:`\operatorname{sign}(z) = z / |z|`. optax has no default
    learning rate; 0.01 is that of the authors' MXNet ``Signum``. torch.optim has no Signum.

    Args:
        lr: the learning rate :math:`\eta`.
        beta: :math:`\beta`, the decay rate of the momentum, in [0, 1).
        mu_dtype: the dtype of :math:`m` (``None``: the parameter's).

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Signum(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> np.round(model["enc"], 6), model["dec"] is model["enc"]  # m = 0.1 g: p - lr sign(g)
        (array([0.9, 2.1]), True)

    Reference: Bernstein et al., *signSGD: Compressed Optimisation for Non-Convex Problems*
    (ICML 2018), https://arxiv.org/abs/1802.04434
    """

    lr: float = hyper(0.01, min=0)
    beta: float = hyper(0.9, min=0, max=1)
    _: KW_ONLY
    mu_dtype: Any = static(None, check=floating_dtype)

    def init(self, param: Any) -> SignumState:
        return SignumState(moment_zeros(self, self.mu_dtype, param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        wide = _wider(grad.dtype, state.mu.dtype)
        mu = _ema(xp, hyper["beta"], state.mu, grad, wide)
        (lr,) = scalars(xp, wide, hyper["lr"])
        return SignumState(cast(mu, state.mu.dtype)), cast(lr * _sign(xp, mu), grad.dtype)


@dataclass(frozen=True)
class SignDecay(Rule):
    r"""L1 decay added to the gradient: ``SignDecay(weight_decay=1e-3)``.

    .. math:: g \leftarrow g + \lambda \operatorname{sign}(p)

    with :math:`\lambda` = ``weight_decay``: the gradient of :math:`\lambda \lVert p \rVert_1`
    (for complex :math:`p`, of :math:`\lambda \sum |p_i|`, with
    :math:`\operatorname{sign}(z) = z / |z|`). Passes the gradient on, so it goes first in an
    ``OptimiserChain``: ``OptimiserChain(SignDecay(1e-3), Adam())`` is Adam on the L1-penalised
    loss. Reproduces Optimisers.jl's ``SignDecay(λ)`` (same default); neither optax nor
    torch.optim has it. The field is named like ``WeightDecay``'s, its L2 counterpart.

    Args:
        weight_decay: :math:`\lambda`.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.SignDecay(0.5), ost.Descent(0.1)), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # p - lr (g + 0.5 sign(p))
        (array([0.85, 2.15]), True)
    """

    weight_decay: float = hyper(1e-3, min=0)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        (decay,) = scalars(xp, grad.dtype, hyper["weight_decay"])
        return state, grad + decay * _sign(xp, param)


class RpropState(NamedTuple):
    prev: Any  # the previous gradient, zeroed where its sign flipped (parameter's dtype)
    step_size: Any  # per-element step sizes (real and imaginary parts separately if complex)
    count: Any  # steps taken by this parameter, int32 (the first step starts from lr)


@dataclass(frozen=True)
class Rprop(Rule):
    r"""Resilient backpropagation:
    ``Rprop(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0))``.

    Per element, with :math:`s = \operatorname{sign}(g\, g_{\text{prev}})`:

    .. math::
        \Delta \leftarrow \operatorname{clip}\!\big(\Delta \cdot
            \{\eta^+ \text{ if } s > 0;\ \eta^- \text{ if } s < 0;\ 1 \text{ otherwise}\},\
            \Delta_{\min}, \Delta_{\max}\big), \\
        g \leftarrow 0 \text{ where } s < 0, \qquad
        p \leftarrow p - \Delta \operatorname{sign}(g), \qquad g_{\text{prev}} \leftarrow g

    with :math:`(\eta^-, \eta^+)` = ``etas``, :math:`(\Delta_{\min}, \Delta_{\max})` =
    ``step_sizes``, :math:`\Delta` starting at ``lr`` (read at the parameter's first step only)
    and :math:`g_{\text{prev}}` at zero. A complex parameter is two real ones (real and imaginary
    parts each have their own step sizes).

    Reproduces ``torch.optim.Rprop`` (same arguments and defaults), complex parameters included.
    ``optax.rprop`` (0.2.8) differs: it applies each step one update late (its first update is
    zero) and does not clip ``lr`` at the first step.

    Args:
        lr: the first step size :math:`\Delta` of every element.
        etas: :math:`(\eta^-, \eta^+)`, the factors of the step size when the gradient changes
            sign or keeps it.
        step_sizes: :math:`(\Delta_{\min}, \Delta_{\max})`, the bounds of the step size.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.Rprop(lr=0.1), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> for _ in range(2):
        ...     state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # steps of 0.1, then 0.1 * 1.2
        (array([0.78, 2.22]), True)

    Reference: Riedmiller and Braun, *A direct adaptive method for faster backpropagation
    learning: the RPROP algorithm* (IEEE ICNN 1993), https://doi.org/10.1109/ICNN.1993.298623
    """

    lr: float = hyper(1e-2, min=0)
    etas: tuple[float, float] = hyper(
        (0.5, 1.2), elements=(Hyper(above=0, below=1), Hyper(above=1))
    )
    step_sizes: tuple[float, float] = hyper((1e-6, 50.0), min=0)

    def init(self, param: Any) -> RpropState:
        xp = namespace(param)
        # Two buffers, not one array twice: a donated state must not hold a buffer twice.
        return RpropState(xp.zeros_like(param), xp.zeros_like(param), xp.zeros((), dtype=xp.int32))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        del param
        xp = namespace(grad)
        real = real_dtype(xp, grad)
        lr, lo, hi = scalars(xp, real, hyper["lr"], *hyper["step_sizes"])
        minus, plus = scalars(xp, real, *hyper["etas"])
        first = state.count == 0

        def one_part(g: Any, prev: Any, size: Any) -> tuple[Any, Any, Any]:
            size = xp.where(first, lr, size)
            s = xp.sign(g * prev)
            size = size * xp.where(s > 0, plus, xp.where(s < 0, minus, xp.ones_like(size)))
            size = xp.minimum(xp.maximum(size, lo), hi)
            g = xp.where(s < 0, xp.zeros_like(g), g)
            return g, size, xp.sign(g) * size

        count = increment(state.count)
        if not isdtype(xp, grad.dtype, "complex floating"):
            prev, size, step = one_part(grad, state.prev, state.step_size)
            return RpropState(prev, size, count), step
        parts = [
            one_part(part(grad), part(state.prev), part(state.step_size))
            for part in (xp.real, xp.imag)
        ]
        one_j = xp.asarray(1j, dtype=grad.dtype)
        prev, size, step = (
            cast(re, grad.dtype) + one_j * cast(im, grad.dtype)
            for re, im in zip(*parts, strict=True)
        )
        return RpropState(prev, size, count), step
