"""Muon: momentum orthogonalised by a Newton-Schulz iteration, for matrices."""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, NamedTuple

from ._contract import Rule
from ._numerics import abs2, cast, isdtype, namespace, real_dtype, scalar_dtype, scalars
from ._validate import flag, hyper, one_of, static

# Keller Jordan's coefficients, which torch.optim.Muon and optax.contrib.muon use by default.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


class MuonDimensions(NamedTuple):
    """Which axes of a parameter form the matrix that ``Muon`` orthogonalises, as optax's
    ``MuonDimensionNumbers`` (an instance of which is accepted in its place).

    The matrix has the product of the ``reduction_axis`` lengths as its rows (the inputs, *fan in*)
    and the product of the ``output_axis`` lengths as its columns (*fan out*); every other axis is
    a batch axis, each of whose slices is orthogonalised on its own. A convolution kernel of
    JAX's layout ``(height, width, in, out)`` is ``MuonDimensions((0, 1, 2), 3)``; one of torch's
    layout ``(out, in, height, width)`` is ``MuonDimensions((1, 2, 3), 0)``.

    Attributes:
        reduction_axis: the axis or axes whose lengths multiply to the matrix's rows (*fan in*).
        output_axis: the axis or axes whose lengths multiply to its columns (*fan out*).

    Examples:
        >>> import numpy as np, optstate as ost
        >>> kernel = np.ones((3, 3, 4, 8))
        >>> rule = ost.Muon(0.02, dimension_numbers=ost.MuonDimensions((0, 1, 2), 3))
        >>> ost.setup(rule, {"conv": kernel})
        State(Muon; 1 parameters, 0 tied)
    """

    reduction_axis: int | tuple[int, ...] = 0
    output_axis: int | tuple[int, ...] = 1


class MuonState(NamedTuple):
    momentum: Any  # B, the momentum buffer, in the parameter's dtype


def _ns_steps(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"must be an integer from 1 to 99, got {value!r}")
    if not 1 <= value < 100:
        raise ValueError(f"must be an integer from 1 to 99, got {value!r}")


def _axes(value: Any) -> tuple[int, ...]:
    """An axis or a sequence of axes as a tuple of ints (TypeError otherwise)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,)
    if isinstance(value, tuple | list) and all(
        isinstance(a, int) and not isinstance(a, bool) for a in value
    ):
        return tuple(value)
    raise TypeError(f"an axis must be an int or a tuple of ints, got {value!r}")


def _dimension_numbers(value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, tuple) and len(value) == 2):
        raise TypeError(
            "must be None (2-D parameters) or MuonDimensions(reduction_axis, output_axis), "
            f"got {value!r}"
        )
    for axes in value:
        _axes(axes)


@dataclass(frozen=True)
class Muon(Rule):
    r"""Muon, momentum orthogonalised by Newton-Schulz:
    ``Muon(lr=1e-3, weight_decay=0.1, momentum=0.95)``.

    .. math::
        B \leftarrow \mu B + (1-\mu)\, G, \qquad
        \tilde B = \begin{cases} (1-\mu)\, G + \mu B & \text{nesterov} \\ B & \text{else}
        \end{cases} \\
        O = \mathrm{NS}^{(a,b,c)}_k(\tilde B; \varepsilon), \qquad
        W \leftarrow W - \eta \lambda W - \eta\, s(A, B)\, O

    with :math:`\eta` = ``lr``, :math:`\lambda` = ``weight_decay``, :math:`\mu` = ``momentum``,
    :math:`(a, b, c)` = ``ns_coefficients``, :math:`k` = ``ns_steps`` and :math:`\varepsilon` =
    ``eps``. :math:`\mathrm{NS}` divides :math:`X = \tilde B` (transposed if it has more rows
    than columns) by :math:`\max(\lVert X \rVert_F, \varepsilon)` and then :math:`k` times sets
    :math:`X \leftarrow aX + (bXX^* + c(XX^*)^2)X`, which drives every singular value towards
    one. The scale :math:`s` of a parameter of shape :math:`A \times B` is
    :math:`\sqrt{\max(1, A/B)}` for ``adjust_lr_fn="original"`` (Keller Jordan's) and
    :math:`0.2\sqrt{\max(A, B)}` for ``"match_rms_adamw"`` (Moonshot's, so that AdamW's learning
    rate and weight decay carry over); ``None`` is ``"original"``, as in torch.

    Reproduces ``torch.optim.Muon`` (torch 2.13), whose defaults these are, except that the
    Newton-Schulz iteration runs in the parameter's dtype, as ``optax.contrib.muon`` runs it,
    where torch rounds it to bfloat16 (a ``float64`` run agrees with a ``float64`` torch run
    with that rounding taken out to 1e-10; in ``float32`` the two differ by bfloat16's rounding,
    measured at 2 % of the step of a 32 x 64 weight). Complex parameters are orthogonalised
    with :math:`X^*`, the conjugate transpose, as optax does; torch refuses them.

    A tied weight is one parameter, orthogonalised once: its gradients, from a plain position and
    from a ``Transpose``, are summed in the parameter's orientation first (orthogonalising each
    position's gradient apart and adding the results gives another step).

    Muon is for matrices, the hidden layers' weights: ``setup`` refuses a parameter that is not
    2-D, naming it. Give embeddings, output layers, gains and biases another rule, for instance
    ``ost.setup(lambda path, x: ost.Muon(0.02) if x.ndim == 2 and "emb" not in path else
    ost.AdamW(3e-4), model)`` (docs/rules.md, "Muon and AdamW"). A convolution kernel is trained
    as a matrix with ``dimension_numbers=MuonDimensions(reduction_axis, output_axis)``, optax's
    dimension numbers: then :math:`A` and :math:`B` above are the output and reduction sizes
    (*fan out* and *fan in*), so that the default ``None`` equals
    ``MuonDimensions(reduction_axis=1, output_axis=0)``, torch's ``(out, in)`` layout.

    Args:
        lr: the learning rate :math:`\eta`.
        weight_decay: decoupled weight decay :math:`\lambda`, multiplied by ``lr`` (not by the
            adjusted rate), as in torch.
        momentum: :math:`\mu`.
        nesterov: use :math:`\tilde B = (1-\mu)G + \mu B` (keyword-only, default ``True``).
        ns_coefficients: :math:`(a, b, c)` of the quintic iteration.
        eps: :math:`\varepsilon`, the floor of the norm that scales :math:`X` first.
        ns_steps: :math:`k`, from 1 to 99.
        adjust_lr_fn: ``"original"`` (or ``None``) or ``"match_rms_adamw"``.
        dimension_numbers: ``None`` for 2-D parameters, or a ``MuonDimensions``.

    Raises:
        ValueError: (from ``setup``, naming the parameter) a parameter that is not 2-D, or whose
            axes do not fit ``dimension_numbers``.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.eye(3)
        >>> state = ost.setup(ost.Muon(0.1, weight_decay=0.0), {"w": w, "wt": ost.Transpose(w)})
        >>> g = np.diag([3.0, 2.0, 1.0])  # orthogonalised: every singular value near one
        >>> state, model = ost.update(state, {"w": w, "wt": ost.Transpose(w)},
        ...                           {"w": g, "wt": ost.Transpose(g)})
        >>> np.round(np.diag(model["w"]), 2)
        array([0.89, 0.93, 0.93])

    References:
        Jordan et al., *Muon: An optimizer for hidden layers in neural networks* (2024),
        https://kellerjordan.github.io/posts/muon/ ; Liu et al., *Muon is Scalable for LLM
        Training* (2025), https://arxiv.org/abs/2502.16982
    """

    lr: float = hyper(1e-3, min=0)
    weight_decay: float = hyper(0.1, min=0)
    momentum: float = hyper(0.95, min=0)
    _: KW_ONLY
    nesterov: bool = static(True, check=flag)
    ns_coefficients: tuple[float, float, float] = hyper(NS_COEFFICIENTS)
    eps: float = hyper(1e-7, min=0)
    ns_steps: int = static(5, check=_ns_steps)
    adjust_lr_fn: str | None = static("original", check=one_of(None, "original", "match_rms_adamw"))
    dimension_numbers: Any = static(None, check=_dimension_numbers)

    def init(self, param: Any) -> MuonState:
        self._layout(tuple(param.shape))  # refuses a parameter Muon cannot take, before a step
        return MuonState(namespace(param).zeros_like(param))

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        dtype = grad.dtype
        wide = scalar_dtype(xp, grad)
        lr, decay, mu = scalars(xp, wide, hyper["lr"], hyper["weight_decay"], hyper["momentum"])
        mu_c, one_minus = cast(mu, dtype), cast(1 - mu, dtype)
        buffer = state.momentum + one_minus * (grad - state.momentum)
        direction = grad + mu_c * (buffer - grad) if self.nesterov else buffer
        forward, backward, shape = self._layout(tuple(param.shape))
        matrices = xp.reshape(xp.permute_dims(direction, forward), shape)
        coefficients = scalars(xp, dtype, *hyper["ns_coefficients"])
        (eps,) = scalars(xp, real_dtype(xp, grad), hyper["eps"])  # compared with a norm
        ortho = _newton_schulz(xp, matrices, coefficients, self.ns_steps, eps)
        unflat = tuple(param.shape[a] for a in forward)
        ortho = xp.permute_dims(xp.reshape(ortho, unflat), backward)
        scale = _scale(self.adjust_lr_fn, shape[1], shape[2])
        step = cast(lr * decay, dtype) * param + cast(lr * scale, dtype) * ortho
        return MuonState(buffer), step

    def _layout(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], Any]:
        """The permutation that puts batch, reduction and output axes in that order, its
        inverse, and the ``(batch, fan_in, fan_out)`` shape of the matrices."""
        ndim = len(shape)
        if self.dimension_numbers is None:
            if ndim != 2:
                raise ValueError(
                    f"Muon orthogonalises matrices and takes 2-D parameters; this one has shape "
                    f"{shape} ({ndim}-D). Give it another rule (setup takes a function of the "
                    "path and the array: lambda path, x: Muon(...) if x.ndim == 2 else "
                    "AdamW(...)), or, for a convolution kernel, "
                    "Muon(dimension_numbers=MuonDimensions(reduction_axis, output_axis))"
                )
            reduction: tuple[int, ...] = (1,)  # torch's (out, in) layout
            output: tuple[int, ...] = (0,)
        else:
            if ndim < 2:
                raise ValueError(
                    f"Muon with dimension_numbers takes parameters of 2 or more axes; this one "
                    f"has shape {shape}. Give it another rule"
                )
            reduction_axes, output_axes = self.dimension_numbers
            try:
                reduction = tuple(_in_range(a, ndim) for a in _axes(reduction_axes))
                output = tuple(_in_range(a, ndim) for a in _axes(output_axes))
            except IndexError as err:
                raise ValueError(
                    f"Muon(dimension_numbers={self.dimension_numbers!r}) does not fit a "
                    f"parameter of shape {shape}: {err}"
                ) from None
            if set(reduction) & set(output) or len(set(reduction)) < len(reduction):
                raise ValueError(
                    f"Muon(dimension_numbers={self.dimension_numbers!r}): the reduction and "
                    f"output axes must be distinct, for a parameter of shape {shape}"
                )
        batch = tuple(a for a in range(ndim) if a not in reduction and a not in output)
        forward = batch + reduction + output
        backward = tuple(forward.index(a) for a in range(ndim))
        sizes = (
            math.prod(shape[a] for a in batch),
            math.prod(shape[a] for a in reduction),
            math.prod(shape[a] for a in output),
        )
        return forward, backward, sizes


def _in_range(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise IndexError(f"axis {axis} is out of range for {ndim} axes")
    return axis % ndim


def _scale(adjust_lr_fn: str | None, fan_in: int, fan_out: int) -> float:
    """The factor of the learning rate for a ``fan_in x fan_out`` matrix (torch's ``A x B``
    is ``fan_out x fan_in``)."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_in, fan_out))
    return math.sqrt(max(1.0, fan_out / fan_in)) if fan_in else 1.0


def _newton_schulz(xp: Any, x: Any, coefficients: Any, steps: int, eps: Any) -> Any:
    """The quintic Newton-Schulz iteration on a stack of matrices ``x`` (``(..., m, n)``)."""
    a, b, c = coefficients
    tall = x.shape[-2] > x.shape[-1]  # iterate on the smaller Gram matrix, as torch and optax do
    if tall:
        x = xp.matrix_transpose(x)
    complex_ = isdtype(xp, x.dtype, "complex floating")
    norm = xp.sqrt(xp.sum(abs2(xp, x), axis=(-2, -1), keepdims=True))
    x = x / cast(xp.maximum(norm, eps), x.dtype)
    for _ in range(steps):
        adjoint = xp.matrix_transpose(xp.conj(x) if complex_ else x)
        gram = xp.matmul(x, adjoint)
        x = a * x + xp.matmul(b * gram + c * xp.matmul(gram, gram), x)
    return xp.matrix_transpose(x) if tall else x
