"""Bridges to other libraries, each imported on its own so that its library stays optional:

* ``optstate.interop.optax``: optax transformations as optstate rules, and optstate rules as
  tie-aware optax transformations;
* ``optstate.interop.torch``: PyTorch modules, ``.grad`` gradients, and ``Optimizer``, a
  ``torch.optim.Optimizer`` that steps with optstate.
"""

__all__: list[str] = []  # the bridges are imported as submodules: optstate.interop.optax, .torch
