"""What ``from_optax`` cannot run, refused before any step with the reason and the way out.

An optstate rule's step gets the gradients and nothing else, and keeps its state per parameter.
Two kinds of optax transformation do not fit: those whose ``update`` needs keyword arguments
besides the gradients (the loss's value for ``optax.contrib.reduce_on_plateau`` and
``optax.polyak_sgd``, the loss function for ``optax.lbfgs``'s line search), and
``optax.lookahead``, whose slow weights live in the parameters. Without these checks both fail
at the first step inside optax, with optax's own message.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import optax  # type: ignore[import-untyped]


def refuse_unrunnable(transformation: Any, state: Any, one: tuple[tuple[int, ...], Any]) -> None:
    """Refuses ``transformation`` if it cannot run as an optstate rule; ``state`` is what its
    ``init`` made for a parameter of shape and dtype ``one``."""
    refuse_lookahead(state)
    refuse_extra_arguments(transformation, one)


def refuse_lookahead(state: Any) -> None:
    """``optax.lookahead`` keeps its slow weights in the parameters, which a rule cannot."""
    nodes = jax.tree_util.tree_leaves(state, is_leaf=_is_lookahead)
    if any(map(_is_lookahead, nodes)):
        raise TypeError(
            "from_optax cannot run optax.lookahead: it keeps the slow weights in the parameters "
            "(optax.LookaheadParams(fast, slow)) and returns updates for both, while an "
            "optstate rule keeps its state per parameter and returns one update for it. Run "
            "from_optax(fast_optimizer) and keep the slow weights beside the model: every "
            "sync_period steps, slow = slow + slow_step_size * (model - slow), then train on "
            "slow (ost.retie(state, slow) puts one array back at each tie)"
        )


def _is_lookahead(x: Any) -> bool:
    return isinstance(x, optax.LookaheadState)


@functools.lru_cache(maxsize=256)
def refuse_extra_arguments(transformation: Any, one: tuple[tuple[int, ...], Any]) -> None:
    """Refuses a transformation whose ``update`` needs keyword arguments besides the gradients
    (``value=``, ``value_fn=``, ...), found by running it abstractly on one parameter of this
    shape and dtype: ``optstate.update`` passes gradients only."""
    box = [jax.ShapeDtypeStruct(*one)]  # type: ignore[no-untyped-call]
    try:
        jax.eval_shape(lambda p: transformation.update(p, transformation.init(p), p), box)
    except TypeError as err:
        found = re.search(r"(\S+)\(\) missing \d+ required keyword-only arguments?: (.*)", str(err))
        if found is None:
            return
        names = ", ".join(re.findall(r"'(\w+)'", found.group(2)))
        raise TypeError(
            f"from_optax cannot run this transformation: its update ({found.group(1)}) needs "
            f"the keyword arguments {names} besides the gradients (optax's reduce_on_plateau "
            "and polyak_sgd need the loss's value, lbfgs's line search the loss function), "
            "and optstate.update(state, model, grads) passes gradients only. Run it with optax "
            "on the de-duplicated parameters; for a learning rate that follows the loss, wrap "
            "the optimiser in optax.inject_hyperparams and set the rate between steps with "
            "optstate.adjust(state, learning_rate=...)"
        ) from None
    except Exception:  # another failure: the step reports it with the parameters at hand
        return
