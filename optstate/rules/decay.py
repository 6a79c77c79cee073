"""Weight decay added to the gradient (L2 regularisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._contract import Rule
from ._numerics import namespace, scalars
from ._validate import hyper


@dataclass(frozen=True)
class WeightDecay(Rule):
    r"""Weight decay as an L2 term: ``WeightDecay(weight_decay=5e-4)``.

    .. math:: g \leftarrow g + \lambda\, p

    with :math:`\lambda` = ``weight_decay``. Chained before a rule, it gives that rule an L2
    penalty: ``OptimiserChain(WeightDecay(5e-4), Momentum(0.1))`` is
    ``torch.optim.SGD(lr=0.1, momentum=0.9, weight_decay=5e-4)``. For decay decoupled from Adam's
    moments use ``AdamW``. Reproduces
    ``optax.add_decayed_weights(weight_decay)``.

    Args:
        weight_decay: :math:`\lambda`.

    Raises:
        ValueError: a hyper-parameter outside its range.
        TypeError: a hyper-parameter that is neither a real number nor a schedule.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.array([1.0, 2.0])
        >>> model = {"enc": w, "dec": w}  # one parameter at two positions
        >>> state = ost.setup(ost.OptimiserChain(ost.WeightDecay(0.5), ost.Descent(0.1)), model)
        >>> grads = {"enc": np.array([0.5, -1.0]), "dec": np.array([0.5, -1.0])}  # g = [1, -2]
        >>> state, model = ost.update(state, model, grads)
        >>> model["enc"], model["dec"] is model["enc"]  # p - lr (g + 0.5 p)
        (array([0.85, 2.1 ]), True)
    """

    weight_decay: float = hyper(5e-4, min=0)

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        xp = namespace(grad)
        (decay,) = scalars(xp, grad.dtype, hyper["weight_decay"])
        return state, grad + decay * param
