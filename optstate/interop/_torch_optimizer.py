"""``Optimizer``: optstate as a ``torch.optim.Optimizer``, for the training loop torch users have.

The optimiser holds an optstate ``State`` for a module (or a tree of tensors) and steps it with
``update_`` on the ``.grad`` totals. Everything torch's own machinery reads is mirrored in
``param_groups``: one group per set of hyper-parameter values of the state (a rule group's
variant), holding the unique Parameters that use it and the hyper-parameters under the rules'
names, which are torch's (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``...). A value
written there (by a learning-rate scheduler or by hand) reaches the state through ``adjust`` at
the next ``step``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import torch
from torch import nn

from .._adjust import adjust, hyperparams
from .._setup import setup
from .._state import State
from .._update import update_
from .._walk import flatten, path_strings, position_keys, skeleton, unwrap
from ..rules import Rule
from ._dtensor import check_not_dtensor
from ._torch_bridge import grad_totals
from ._torch_state_dict import (
    FORMAT,
    copied,
    flat,
    is_schedule,
    mismatch,
    named_leaves,
    plain,
    plain_copy,
    restored,
    same_length,
    saved_meta,
)

__all__ = ["Optimizer"]

_EAGER = (
    "optstate.interop.torch.Optimizer.step runs eagerly, outside torch.compile: its walk over the "
    "model (ties, rule groups, checks) is Python over JAX pytrees, which Dynamo does not trace. "
    "Under torch.compile it is a graph break (the rest of the function is still compiled); with "
    "fullgraph=True, call opt.step() outside the compiled function"
)


class Optimizer(torch.optim.Optimizer):
    """An optstate rule as a ``torch.optim.Optimizer``: ``Optimizer(module_or_params, rule)``.

    ``module_or_params`` is an ``nn.Module`` (trained as its named-parameter dict, ties by
    Parameter identity) or a tree of tensors such as ``{"embed": W, "unembed": W.t()}`` (ties
    also by views, a transposed tie included). ``rule`` is a rule, or a function of a
    parameter's path giving its rule (``None`` for no training), as ``optstate.setup`` takes it.

    The loop is torch's: ``opt.zero_grad()``, ``loss.backward()``, ``opt.step()``. ``step``
    reads each Parameter's ``.grad`` (autograd's total over every use, so a tied Parameter is
    counted once) and applies ``update_``: the Parameters are written in place, stay the same
    objects and stay tied. ``step(closure)`` calls ``closure`` with gradients enabled first and
    returns its loss, as ``torch.optim`` does.

    ``param_groups`` has one group per set of hyper-parameter values: with one rule, one group;
    with a rule per path, one group per distinct rule. A group holds its unique Parameters
    (``params``; ``param_names`` has the path of each, ``"emb.weight"`` or ``"dec/w"``) and the
    hyper-parameters by name;
    of a chain, every member's names (a name two members share shows the first member's value,
    and a value written to it goes to both, as ``adjust`` does). A value changed there, by hand
    or by any ``torch.optim.lr_scheduler``, is checked and applied with ``optstate.adjust`` at
    the next ``step`` (no recompilation, no new state). A hyper-parameter that is an optstate
    schedule shows its value for the next step and follows the schedule until it is
    overwritten.

    ``state_dict()`` holds tensors and plain Python values only (``torch.load(...,
    weights_only=True)`` reads it back); ``load_state_dict`` restores it into an ``Optimizer``
    made for the same model and rules, so that the run continues exactly. Its ``"state"``
    holds the live state tensors, as ``torch.optim``'s does: save it (``torch.save``) or copy it
    before stepping on. ``ost_state`` is the optstate ``State`` itself (for ``ost.hyperparams``,
    ``ost.save``...); ``state`` is a read-only view of it by Parameter, as in ``torch.optim``.

    Example:
        >>> import torch, optstate as ost
        >>> from optstate.interop.torch import Optimizer
        >>> lm = torch.nn.Sequential(torch.nn.Embedding(4, 2), torch.nn.Linear(2, 4, bias=False))
        >>> lm[1].weight = lm[0].weight                  # tied input and output embedding
        >>> opt = Optimizer(lm, ost.Lion(1e-3))
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        >>> lm(torch.tensor([0, 3])).logsumexp(-1).sum().backward()
        >>> opt.step(); sched.step()
        >>> opt.param_groups[0]["lr"], lm[1].weight is lm[0].weight
        (0.0005, True)

    Args:
        module_or_params: the ``nn.Module`` to train (a ``DistributedDataParallel`` wrapper
            included), or a tree of tensors whose leaves are autograd leaves or views of them.
        rule: the rule for every parameter, or a function of a parameter's path (and, as
            ``setup`` allows, its tensor) giving its rule or ``None``; tied positions must get
            one rule.

    Raises:
        TypeError: ``module_or_params`` is neither a module nor a tree holding tensors (an
            iterator such as ``model.parameters()`` has no names: pass the module).
        ValueError: a parameter that is a view of a tensor outside the model; in ``step``, a
            hyper-parameter written to a group that its rule refuses (a negative ``lr``...),
            or groups added or removed by hand; nothing is changed.
    """

    def __init__(self, module_or_params: Any, rule: Rule | Callable[..., Any]) -> None:
        self._built = False
        self._model = _model(module_or_params)
        tree = (
            dict(self._model.named_parameters(remove_duplicate=False))
            if isinstance(self._model, nn.Module)
            else self._model
        )
        state = setup(rule, self._model)
        plan = state.plan
        leaves, _ = flatten(tree)
        names = path_strings(tree)
        keys = position_keys(skeleton(plan.treedef))
        values = hyperparams(state)
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (r, v) in enumerate(zip(plan.param_rules, plan.param_variants, strict=True)):
            if r >= 0:
                groups.setdefault((r, v), []).append(k)
        if not groups:
            raise ValueError("the rule gives no parameter of the model a rule: nothing to train")
        param_groups: list[dict[str, Any]] = []
        self._members: list[list[int]] = []  # per group: its parameters (indices into the plan)
        self._paths: list[frozenset[tuple[Any, ...]]] = []  # per group: its positions' paths
        self._shown: list[dict[str, Any]] = []  # per group: the values the state holds
        self._scheduled: list[set[str]] = []  # per group: names whose value is a schedule
        self._keys: list[str] = []  # per group: its first parameter's key in ``hyperparams``
        for (r, v), members in groups.items():
            primary = plan.params[members[0]].primary
            self._keys.append("/".join(str(key) for key in keys[primary]))
            shown = flat(values[self._keys[-1]])
            raw = flat(state.hyper[r][v])
            tensors = [_leaf_tensor(plan.params[k].positions, leaves, names) for k in members]
            positions = [pos for k in members for pos in plan.params[k].positions]
            param_groups.append({"params": tensors, **shown})
            self._members.append(members)
            self._paths.append(frozenset(keys[pos] for pos in positions))
            self._shown.append(dict(shown))
            self._scheduled.append({n for n, x in raw.items() if is_schedule(x)})
        self._state = state
        self._names = names
        self._rules = [repr(r) for r in plan.rules]
        super().__init__(param_groups, {})
        for group, members in zip(self.param_groups, self._members, strict=True):
            group["param_names"] = [
                "/".join(str(key) for key in keys[plan.params[k].primary]) for k in members
            ]
        # What a group added after construction would get (torch's meaning of ``defaults``).
        self.defaults = dict(self._shown[0])
        self._built = True

    # -- torch's interface ----------------------------------------------------------------------

    @torch.compiler.disable(reason=_EAGER)  # type: ignore[untyped-decorator, no-untyped-call]
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimisation step with the ``.grad`` totals; ``closure`` (if given) is called first
        with gradients enabled, and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        state, changes = self._adjusted(self._state)
        state, _ = update_(state, self._model, grad_totals(self._model))
        self._commit(state, changes)
        return loss

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the groups are the state's, fixed by the model and rule.
        To train more Parameters, make a new ``Optimizer`` for the module."""
        if not self._built:
            super().add_param_group(param_group)
            return
        raise ValueError(
            "optstate.interop.torch.Optimizer cannot take a param group after it is made: its "
            f"groups are the {len(self.param_groups)} of its optstate state, which was set up "
            "once for the whole model and rule (ties and per-path rules found there). Give the "
            "rule for these Parameters when making the Optimizer (a function of the path), or "
            "make a new Optimizer for the module; nothing was changed"
        )

    def state_dict(self) -> dict[str, Any]:
        """The optimiser's state as tensors and plain Python values: ``"state"`` by parameter
        index (the order of ``param_groups``), each a dict of the rule state's tensors by name
        (``mu``, ``nu``, ``count``; ``1.mu`` for a chain's second member); ``"param_groups"`` as
        in ``torch.optim`` (values, and ``params`` as indices); and ``"optstate"`` with the
        rules, the parameter names, the schedules' clocks and the step count. Hooks registered
        with ``register_state_dict_pre_hook`` / ``_post_hook`` run as in ``torch.optim``."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self._state
        out: dict[int, dict[str, torch.Tensor]] = {}
        for i, k in enumerate(self._order()):
            out[i] = dict(named_leaves(state.states[k]))
        groups = []
        first = 0
        for group in self.param_groups:
            saved = {key: plain_copy(value) for key, value in group.items() if key != "params"}
            saved["params"] = list(range(first, first + len(group["params"])))
            first += len(group["params"])
            groups.append(saved)
        meta = {
            "format": FORMAT,
            "rules": list(self._rules),
            "names": list(self._names),
            "scheduled": [sorted(s) for s in self._scheduled],
            "clocks": jax.tree_util.tree_leaves(state.clocks),
            "step": state.step,
        }
        result: dict[str, Any] = {"state": out, "param_groups": groups, "optstate": meta}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            changed = post_hook(self, result)
            result = result if changed is None else changed
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict()`` of an ``Optimizer`` made for the same model (names, shapes,
        dtypes) and rules. Everything is checked before anything changes; the tensors are
        copied onto the devices of this optimiser's state. Hooks registered with torch's
        ``register_load_state_dict_pre_hook`` / ``_post_hook`` run as in ``torch.optim``.

        Raises:
            CheckpointMismatchError: the state_dict is not one of this class, or is for another
                model, other rules or other groups; the message names the first difference.
            ValueError, TypeError: a hyper-parameter value its rule refuses.
        """
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = pre_hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        meta = saved_meta(state_dict)
        if meta["rules"] != self._rules:
            raise mismatch(f"is for the rules {meta['rules']}, this optimizer has {self._rules}")
        groups = self._check_saved_layout(state_dict, meta)
        order = self._order()
        states = list(self._state.states)
        for i, k in enumerate(order):
            name = self._names[self._state.plan.params[k].primary]
            states[k] = restored(self._state.states[k], state_dict["state"].get(i), i, name)
        clocks_now, clock_def = jax.tree_util.tree_flatten(self._state.clocks)
        clocks = [
            copied(saved, now, f"state_dict['optstate']['clocks'][{j}]")
            for j, (saved, now) in enumerate(same_length(meta["clocks"], clocks_now, "clocks"))
        ]
        step = copied(meta["step"], self._state.step, "state_dict['optstate']['step']")
        state = self._state.replace(
            states=tuple(states), clocks=jax.tree_util.tree_unflatten(clock_def, clocks), step=step
        )
        scheduled = [set(s) for s in meta["scheduled"]]
        for g, saved in enumerate(groups):
            changes = {
                name: plain(saved.get(name), f"state_dict['param_groups'][{g}][{name!r}]")
                for name in self._shown[g]
                if not (name in scheduled[g] and name in self._scheduled[g])
            }
            if changes:
                state = self._adjust(state, g, changes, "state_dict['param_groups']")
        # Every check has passed: commit.
        self._state = state
        for g, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            params = group["params"]
            group.clear()
            group.update({key: value for key, value in saved.items() if key != "params"})
            group["params"] = params
            self._shown[g] = {name: plain(group[name], "") for name in self._shown[g]}
            self._scheduled[g] &= scheduled[g]
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _check_saved_layout(self, state_dict: dict[str, Any], meta: dict[str, Any]) -> Any:
        """The saved state's model and param groups are this optimizer's (or a mismatch error
        naming the first difference); the saved param groups."""
        if meta["names"] != self._names:
            saved = list(meta["names"])
            pairs = zip(saved, self._names, strict=False)  # the first difference, if any
            diff = next(
                (f"{a} where this model has {b}" for a, b in pairs if a != b),
                f"{len(saved)} parameter positions, this model has {len(self._names)}",
            )
            raise mismatch(f"is for another model: it has {diff}")
        groups = state_dict["param_groups"]
        if not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise mismatch(
                f"has {len(groups) if isinstance(groups, list) else groups!r} param groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        first = 0
        for g, (saved, group) in enumerate(zip(groups, self.param_groups, strict=True)):
            expected = list(range(first, first + len(group["params"])))
            first += len(group["params"])
            if not isinstance(saved, Mapping):
                raise mismatch(f"has a {type(saved).__name__} as param_groups[{g}], not a dict")
            if saved.get("params") != expected:
                raise mismatch(
                    f"param_groups[{g}]['params'] is {saved.get('params')!r}, this optimizer's "
                    f"is {expected}: the Parameters are grouped differently"
                )
        return groups

    @property
    def ost_state(self) -> State:
        """The optstate ``State`` this optimiser steps (read-only: it changes at every step)."""
        return self._state

    @property  # type: ignore[override]
    def state(self) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
        """The rule state of each Parameter by name (``mu``, ``nu``, ``count``...), made from
        ``ost_state`` when read; writing into it does not change the optimiser."""
        out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
        if not hasattr(self, "_state"):
            return out
        order = iter(self._order())
        for group in self.param_groups:
            for p in group["params"]:
                out[p] = dict(named_leaves(self._state.states[next(order)]))
        return out

    @state.setter
    def state(self, value: Any) -> None:
        del value  # torch's __init__ sets an empty dict; the state is optstate's

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError(
            "optstate.interop.torch.Optimizer is not pickled; save opt.state_dict() with "
            "torch.save and restore it with load_state_dict into an Optimizer made for the module"
        )

    # -- between param_groups and the state ------------------------------------------------------

    def _order(self) -> list[int]:
        """The plan's parameter indices in ``param_groups`` order (torch's parameter indices)."""
        return [k for members in self._members for k in members]

    def _adjusted(self, state: State) -> tuple[State, list[dict[str, Any]]]:
        """``state`` with every value written into ``param_groups`` since the last step applied
        (pure: a refused value raises before anything changes)."""
        if len(self.param_groups) != len(self._members):
            raise ValueError(
                f"param_groups has {len(self.param_groups)} groups, the optimizer made "
                f"{len(self._members)}: groups cannot be added or removed (see add_param_group)"
            )
        all_changes = []
        for g, group in enumerate(self.param_groups):
            changes = {}
            for name, shown in self._shown[g].items():
                if name not in group:
                    raise ValueError(f"param_groups[{g}] lost its {name!r}: put it back")
                value = plain(group[name], f"param_groups[{g}][{name!r}]")
                if value != shown:
                    changes[name] = value
            if changes:
                state = self._adjust(state, g, changes, "param_groups")
            all_changes.append(changes)
        return state, all_changes

    def _adjust(self, state: State, g: int, changes: dict[str, Any], where: str) -> State:
        paths = self._paths[g]
        try:
            return adjust(state, lambda path: tuple(path) in paths, **changes)
        except (ValueError, TypeError) as err:
            plan = state.plan
            members = self._members[g]
            names = ", ".join(self._names[plan.params[k].primary] for k in members[:3])
            more = " ..." if len(members) > 3 else ""
            values = ", ".join(f"{k}={v!r}" for k, v in changes.items())
            raise type(err)(
                f"{where}[{g}] (the group of {names}{more}) was given {values}, which is "
                f"refused: {err}. Nothing was changed"
            ) from None

    def _commit(self, state: State, changes: list[dict[str, Any]]) -> None:
        """Keep the stepped state; show the values it now holds (schedules moved on)."""
        self._state = state
        values: dict[str, Any] | None = None
        for g, group in enumerate(self.param_groups):
            self._shown[g].update(changes[g])
            self._scheduled[g] -= set(changes[g])
            if not self._scheduled[g]:
                continue
            if values is None:
                values = hyperparams(state)
            now = flat(values[self._keys[g]])
            for name in self._scheduled[g]:
                group[name] = self._shown[g][name] = now[name]


# -- helpers -------------------------------------------------------------------------------------


def _model(module_or_params: Any) -> Any:
    if isinstance(module_or_params, nn.Module):
        return module_or_params
    if isinstance(module_or_params, torch.Tensor | Iterator):
        raise TypeError(
            "Optimizer takes an nn.Module or a tree of tensors (a dict by name, say), got "
            f"{type(module_or_params).__name__}: optstate finds ties and applies rules by path, "
            "so it needs the names; pass the module itself rather than model.parameters()"
        )

    leaves = jax.tree_util.tree_leaves(module_or_params)
    if not any(isinstance(x, torch.Tensor) for x in leaves):
        raise TypeError(
            "Optimizer takes an nn.Module or a tree of torch tensors; "
            f"{type(module_or_params).__name__} holds no tensor"
        )
    for name, x in zip(path_strings(module_or_params), leaves, strict=True):
        check_not_dtensor(x, name)
    return module_or_params


def _leaf_tensor(positions: tuple[int, ...], leaves: list[Any], names: list[str]) -> Any:
    """The autograd leaf that holds a parameter (its ``.grad`` is the total): the tensor at one
    of its positions that is a leaf (another position may hold a view of it)."""
    for pos in positions:
        x = unwrap(leaves[pos])[0]
        if isinstance(x, torch.Tensor) and x.is_leaf:
            return x
    raise ValueError(
        f"{names[positions[0]]} is not a leaf tensor (it was computed, or is a view of a tensor "
        "that is not in the model): autograd keeps .grad only for leaf tensors, so put the "
        "tensor itself (an nn.Parameter, or a tensor made with requires_grad=True) in the model"
    )
