"""optax in both directions: an optax transformation as an optstate rule, and an optstate rule as
a tie-aware optax transformation.

optax is optional: nothing in optstate imports this module, so import it yourself,
``from optstate.interop import optax as ost_optax``.

**``from_optax(tx)``: optax's arithmetic, optstate's ties.** The rule keeps one optax state per
unique parameter and feeds optax the parameter's *summed* gradient, so any optax optimiser trains
a tied model as it would train the same model written with each weight once. All of the rule's
parameters go through one ``tx.update`` call together, so a transformation that looks across
parameters is right too: in ``optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))`` a
tied weight counts once in the global norm.

**``to_optax(rule, model)``: optstate inside an optax loop.** An
``optax.GradientTransformationExtraArgs`` whose state is an optstate ``State`` and whose updates
move every position of a tied weight to the one new value, so ``updates, opt_state =
tx.update(grads, opt_state, params)`` and ``optax.apply_updates(params, updates)`` keep the tie.
It takes optax's extra arguments, its ``inject_hyperparams``, ``tree.map_params``, ``MultiSteps``
and ``apply_if_finite``, and NNX's ``nnx.Optimizer`` (see ``to_optax``).

Examples:
    >>> import jax, jax.numpy as jnp, optax, optstate as ost
    >>> from optstate.interop import optax as ost_optax
    >>> w = jnp.ones((2, 3))
    >>> model = {"enc": w, "dec": ost.Transpose(w)}
    >>> state = ost.setup(ost_optax.from_optax(optax.sgd(0.25, momentum=0.9)), model)
    >>> state
    State(OptaxRule; 1 parameters, 1 tied)
    >>> grads = {"enc": jnp.ones((2, 3)), "dec": ost.Transpose(jnp.ones((2, 3)))}
    >>> state, model = ost.update(state, model, grads)
    >>> model["dec"].parent is model["enc"], float(model["enc"][0, 0])  # 1 - 0.25 * (1 + 1)
    (True, 0.5)
"""

from ._from_optax import OptaxRule as OptaxRule
from ._from_optax import from_optax as from_optax
from ._to_optax import to_optax as to_optax

__all__ = ["OptaxRule", "from_optax", "to_optax"]
