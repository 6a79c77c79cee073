"""The rule contract, and the small array helpers rules share.

A rule is a frozen dataclass. It knows nothing of trees or ties: it sees one parameter and its
summed gradient at a time, and turns them into the *step* that is subtracted from the parameter,
``p_new = p - step`` (so ``Descent`` returns ``lr * g``).

* ``hyper()``: the hyper-parameters, a small tree of numbers. ``setup`` stores them in the state as
  0-d arrays, so they can change between compiled steps without recompiling.
* ``init(param)``: the rule's state for one parameter (a tuple of arrays, possibly empty).
* ``apply(hyper, state, param, grad)``: ``(new_state, step)``. It reads hyper-parameters from
  ``hyper``, never from ``self``, and computes with the functions of the arrays' own namespace
  (``xp = namespace(grad)``), so one implementation serves NumPy, JAX and PyTorch.

``update`` calls ``update_all`` once per rule with every parameter that has a gradient this step.
By default it applies ``apply`` to each and subtracts the step; a rule that looks across
parameters (``ClipGlobalNorm``, ``SkipNonFinite``) overrides ``apply_all``, and one that makes the
new parameter itself (``MixedPrecision``) overrides ``update_all``.

``update_`` on mutable arrays (NumPy, torch) first asks ``in_place``: a rule that has an in-place
form (``Descent``, ``Momentum``, ``Nesterov``, ``Adam``, ``AdamW``) says yes where the arrays allow
it, and ``update_all_`` then writes the new state and parameters into the arrays they already
have, with the list operations of ``_inplace`` (one multi-tensor kernel per operation on torch).
The pure ``apply`` stays the definition: the tests check that both forms agree.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import cast, namespace
from ..schedules import Schedule

__all__ = ["Rule", "cast", "namespace"]


class Rule:
    """Base class of every rule (see the module docstring for the contract)."""

    hyper_names: ClassVar[tuple[str, ...]] = ()

    def hyper(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.hyper_names}

    def structure(self) -> Rule:
        """The rule with its hyper-parameters taken out: the static part of a state."""
        return dataclasses.replace(self, **{name: None for name in self.hyper_names})  # type: ignore[type-var]

    def init(self, param: Any) -> Any:
        del param
        return ()

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def apply_all(
        self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """``apply`` for every parameter of this rule at once: ``(new_states, steps)``."""
        out = [self.apply(hyper, s, p, g) for s, p, g in zip(states, params, grads, strict=True)]
        return [new for new, _ in out], [step for _, step in out]

    def update_all(
        self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        """``(new_states, new_params)``: the steps of ``apply_all`` subtracted, dtypes kept."""
        states, steps = self.apply_all(hyper, states, params, grads)
        return states, [cast(p - step, p.dtype) for p, step in zip(params, steps, strict=True)]

    def in_place(self, states: list[Any], params: list[Any], grads: list[Any]) -> bool:
        """Whether ``update_all_`` can step these parameters (no rule can, unless it says so)."""
        del states, params, grads
        return False

    def update_all_(
        self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]
    ) -> None:
        """``update_all`` written into the arrays: the new parameters into ``params``, the new
        rule states into the arrays of ``states``. Called only where ``in_place`` said yes, after
        every other group of the step has been computed; it must not fail on such inputs, so a
        failed step still leaves everything as it was."""
        raise NotImplementedError(f"{self.name()} has no in-place form")

    def ready(self, state: Any) -> Any:
        """``None``, or a 0-d boolean computed from the new state: ``False`` while the rule is
        still gathering (``AccumGrad``). An ``OptimiserChain`` then holds the rules after it."""
        del state
        return None

    def name(self) -> str:
        return type(self).__name__

    def _check(self) -> None:
        """Every hyper-parameter is a real number or a schedule (``None`` in a ``structure()``)."""
        for name in self.hyper_names:
            value = getattr(self, name)
            flat = value if isinstance(value, tuple) else (value,)
            if value is None or all(v is None for v in flat):
                continue
            if not all(_is_hyper(v) for v in flat):
                raise TypeError(
                    f"{type(self).__name__}({name}=...) must be a real number or a schedule"
                    f"{' or a tuple of them' if isinstance(value, tuple) else ''}, got {value!r}"
                )


class AcrossParameters(Rule):
    """A rule that looks at all its parameters together: it defines ``apply_all``, and ``apply``
    is that for a single parameter."""

    def apply(self, hyper: Any, state: Any, param: Any, grad: Any) -> tuple[Any, Any]:
        (new,), (step,) = self.apply_all(hyper, [state], [param], [grad])
        return new, step

    def apply_all(
        self, hyper: Any, states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        raise NotImplementedError


def check_member(rule: Any, container: str) -> None:
    """``rule`` may stand inside ``container`` (a chain or a wrapper), or a TypeError says why."""
    if not isinstance(rule, Rule):
        raise TypeError(
            f"{container} takes optstate rules, got {rule!r} of type {type(rule).__name__}"
        )
    if getattr(rule, "outermost_only", False):
        raise TypeError(
            f"{rule.name()} must be the outermost rule, not inside {container}: wrap it around"
        )


def _is_hyper(value: Any) -> bool:
    return isinstance(value, Schedule) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool)
    )


def finfo(xp: Any, dtype: Any) -> Any:
    """``xp.finfo(dtype)``, also for NumPy arrays of ml_dtypes' 16-bit and 8-bit floats (such as
    bfloat16), which NumPy's own ``finfo`` does not know."""
    try:
        return xp.finfo(dtype)
    except (ValueError, TypeError, AttributeError):
        return jnp.finfo(dtype)  # type: ignore[no-untyped-call]


def isdtype(xp: Any, dtype: Any, kind: str) -> bool:
    """``xp.isdtype(dtype, kind)``, also for ml_dtypes' floats in NumPy arrays (see ``finfo``)."""
    try:
        return bool(xp.isdtype(dtype, kind))
    except (ValueError, TypeError):
        return bool(jnp.isdtype(dtype, kind))


def moment_zeros(rule: Rule, mu_dtype: Any, param: Any) -> Any:
    """The first-moment buffer: zeros in ``mu_dtype``, or in the parameter's dtype for ``None``."""
    xp = namespace(param)
    if mu_dtype is None:
        return xp.zeros_like(param)
    if isdtype(xp, param.dtype, "complex floating"):
        raise TypeError(
            f"{rule.name()}(mu_dtype={mu_dtype!r}) stores the first moment in a real dtype, but "
            f"the parameter is {param.dtype}; use mu_dtype=None for complex parameters"
        )
    if type(mu_dtype).__module__ != "torch":
        mu_dtype = np.dtype(mu_dtype)  # names such as "bfloat16" as dtypes every namespace takes
    return xp.zeros_like(param, dtype=mu_dtype)


def real_dtype(xp: Any, x: Any) -> Any:
    """``float32`` for ``complex64``, the dtype itself for real arrays."""
    dtype = finfo(xp, x.dtype).dtype
    return getattr(xp, dtype) if isinstance(dtype, str) else dtype  # torch's finfo gives a name


def scalar_dtype(xp: Any, x: Any) -> Any:
    """The real dtype, at least float32, in which to compute scalars derived from hyper-parameters
    (``1 - beta``, bias corrections) before casting them to a 16-bit parameter's dtype."""
    real = real_dtype(xp, x)
    return xp.float32 if finfo(xp, real).bits < 32 else real


def scalars(xp: Any, dtype: Any, *values: Any) -> tuple[Any, ...]:
    """Hyper-parameters as 0-d arrays of ``dtype``, so arithmetic keeps the parameter's dtype."""
    return tuple(xp.asarray(v, dtype=dtype) for v in values)


def abs2(xp: Any, g: Any) -> Any:
    """``|g|**2``, real-valued also for complex ``g``."""
    if isdtype(xp, g.dtype, "complex floating"):
        return xp.real(g) ** 2 + xp.imag(g) ** 2
    return g * g


def select(xp: Any, flag: Any, new: Any, old: Any) -> Any:
    """``new`` where the 0-d boolean ``flag`` holds, else ``old``, leaf by leaf (works under jit,
    where a Python ``if`` on an array cannot)."""
    return jax.tree_util.tree_map(lambda n, o: xp.where(flag, n, o), new, old)
