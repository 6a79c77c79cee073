"""The implicit-parameters bridge: ``params``, ``gradient`` and ``Grads``, for training code written
in the implicit style, and the way from there to optstate's explicit structural gradients.

Implicit-style code has a zero-argument loss closure over a model, a collection of the model's
parameter arrays, and gradients keyed by the arrays themselves (Flux's ``params(m)`` and
``gradient(() -> loss(m(x), y), ps)``; PyTorch's ``parameters()`` and ``.grad``)::

    ps = implicit.params(model)                       # the unique arrays, aliases resolved
    grads = implicit.gradient(lambda: loss(model, x), ps)
    grads[W]                                          # W's total gradient over all its uses
    state, model = ost.update(state, model, grads.to_tree(model))   # counted once per parameter

The conventions, and why:

* **One parameter per array.** ``W``, ``Transpose(W)`` and a NumPy view such as ``W.T`` are one
  parameter, found as ``setup`` finds ties. ``params([W, Transpose(W)])`` has one element, and
  ``Transpose(W) in ps`` is true.
* **Totals.** Every place the loss can reach ``W`` gets one traced value during ``gradient`` (in
  the place's orientation), so JAX adds up all uses: ``grads[W]`` is the total gradient.
  Looking it up through an alias gives the same total in the alias's orientation
  (``grads[Transpose(W)]`` is ``grads[W].T``).
* **Untouched parameters get zeros**, as ``jax.grad`` gives them, so that the bridge and the
  explicit ``jax.grad`` path feed ``update`` the same numbers. A loss that reaches *no* parameter
  is an error: it is a closure that does not see the model it trains.
* **Arrays are followed by identity, at the positions recorded by ``params``.** An array replaced
  afterwards (``model["w"] = new``) is an error naming the position, never a silent miss: take
  ``params(model)`` again after changing the model (after every pure ``update``).

Where ``gradient`` substitutes traced values: at every position of the model given to ``params``
and, because implicit code closes over variables, everywhere the loss function can read one: its
closure variables, default arguments and the globals its code names, and from there, recursively,
dicts, lists and tuples (their subclasses too), pytrees, attributes (``__dict__`` and
``__slots__``), the closures and defaults of functions held anywhere, partials, bound methods,
class attributes, the attributes of the user's modules and the functions of the user's modules
(not the globals of the standard library or installed packages). A jitted function that reads a
parameter from its closure runs as its Python function for the call (``jit`` would freeze the
value into its cache). Mutable places are changed in place and immutable pytrees rebuilt;
everything is restored when the loss returns or raises (meanwhile those places hold traced
values: do not read them from another thread). A place that holds a parameter but can be neither
changed nor rebuilt is an error naming it: ``gradient`` never returns part of a gradient.

Examples:
    >>> import jax.numpy as jnp, optstate as ost
    >>> from optstate import implicit
    >>> w = jnp.array([[1.0, 2.0]])
    >>> model = {"enc": w, "dec": ost.Transpose(w)}
    >>> ps = implicit.params(model)
    >>> len(ps), ps.where(w)
    (1, ("model['dec']", "model['enc']"))
    >>> grads = implicit.gradient(lambda: jnp.sum(model["enc"] @ model["dec"]), ps)
    >>> grads[w]                     # d/dw sum(w @ w.T) = 2w: both uses
    Array([[2., 4.]], dtype=float32)
    >>> grads[model["dec"]]          # the same total, in the Transpose's orientation
    Array([[2.],
           [4.]], dtype=float32)
    >>> tree = grads.to_tree(model)  # the total at one position, None at the others
    >>> tree["dec"] is None
    True
"""

from .._errors import StaleParamsError as StaleParamsError
from ._gradient import gradient as gradient
from ._gradient import value_and_gradient as value_and_gradient
from ._grads import Grads as Grads
from ._params import Params as Params
from ._params import params as params

__all__ = ["Grads", "Params", "StaleParamsError", "gradient", "params", "value_and_gradient"]
