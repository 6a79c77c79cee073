"""Schedules: hyper-parameters that are functions of the step count.

Pass a schedule wherever a rule takes a number, ``Adam(lr=ost.schedules.warmup_cosine(...))``.
A schedule is a small pytree whose numbers ``setup`` stores as 0-d arrays in the state, beside
the other hyper-parameters, and ``update`` evaluates it inside the compiled step at the number of
steps its rule has taken (0 on the first step; see docs/rules.md, "Schedules"): changing its
numbers with ``adjust`` does not recompile. Every schedule reproduces the optax schedule of the same
meaning, which the tests check.

Step arithmetic is exact at any step a run can reach: step counts, boundaries and lengths are
integers and stay integers (``count - begin``, ``count >= boundary``, the clipping to a
schedule's length) until a fraction of at most one is formed, so a schedule past step ``2**24``
does not drift as a float32 count would. A schedule can also be called directly with a Python or
NumPy integer, ``schedule(100)``.
"""

from ._schedules import Schedule as Schedule
from ._schedules import constant as constant
from ._schedules import cosine_decay as cosine_decay
from ._schedules import exponential_decay as exponential_decay
from ._schedules import join as join
from ._schedules import linear as linear
from ._schedules import piecewise_constant as piecewise_constant
from ._schedules import warmup_cosine as warmup_cosine

__all__ = [
    "Schedule",
    "constant",
    "cosine_decay",
    "exponential_decay",
    "join",
    "linear",
    "piecewise_constant",
    "warmup_cosine",
]
