"""``setup``: walk the model, find its ties, and give each unique parameter one rule state."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from . import _arrays, _copies, _models
from ._errors import GroupSplitWarning, StructureError, TieError
from ._state import Plan, State
from ._ties import Param, find_ties
from ._walk import Key, flatten, path_strings, position_keys, unwrap
from .rules._contract import Rule
from .schedules import Schedule

# A rule; a function of a position's path, or of its path and its leaf; or a tree prefix of rules.
RuleSpec = Rule | Callable[[tuple[Key, ...]], Rule | None] | Callable[..., Rule | None] | Any


def setup(rule: RuleSpec, model: Any) -> State:
    """The optimiser state of ``model``: one rule state per unique parameter.

    ``model`` is any pytree (dicts, lists, tuples, namedtuples, registered dataclasses, Equinox
    modules, Flax parameter dicts). Its parameters are its floating and complex arrays (NumPy,
    JAX or torch); everything else passes through ``update`` untouched. A parameter found at
    several positions (the same array object, ``Transpose(p)``, or a NumPy or torch view such as
    ``W.T`` or ``W.t()``) gets a single state, and ``update`` sums its gradients before the rule
    sees them.

    ``rule`` is one rule for every parameter; or a tree of rules that is a prefix of the model
    (``{"encoder": Adam(1e-3), "decoder": Descent(0.1)}``), each rule for the parameters below it;
    or a function from a position's path (a tuple of keys such as ``("dec", "b")``) to a rule;
    or a function of two arguments, the path and the position's leaf as the model holds it (an
    array, a ``Transpose``, a view), to select by shape:
    ``lambda path, x: Muon(0.02) if x.ndim == 2 and "emb" not in path else AdamW(3e-4)``.
    ``None`` in place of a rule leaves those parameters untrained. A tied parameter whose
    positions would get different rules is an error. A rule that refuses a parameter (``Muon`` a
    parameter that is not 2-D) raises its error here, naming the parameter.

    Separate weights with equal values, up to a permutation of their axes, are separate
    parameters (equality is never a tie), but most often a mistake: JAX's ``W.T`` is a copy, not a
    view. ``setup`` then warns with an ``optstate.CopyWarning`` naming both positions (arrays of
    two axes or more; constant arrays never count). A copy made on purpose is silenced with
    ``warnings.simplefilter("ignore", optstate.CopyWarning)``.

    Call ``setup`` outside ``jax.jit`` or inside ``optstate.jit``: inside a plain ``jax.jit`` every
    position is a fresh tracer and ties cannot be seen (``setup`` warns where it can tell that a
    tie was lost). The returned state carries the tie plan, so a jitted ``update`` keeps applying
    it.

    Args:
        rule: a rule, a tree of rules that is a prefix of the model, or a function of a position's
            path (or of its path and leaf) returning a rule or ``None`` (see above).
        model: the model, a pytree whose floating and complex arrays are its parameters (or a
            torch ``nn.Module``).

    Returns:
        The ``State``: one rule state per unique parameter, the hyper-parameters as arrays, the
        step count at 0, and the tie plan.

    Examples:
        >>> import numpy as np, optstate as ost
        >>> w = np.ones((2, 3))
        >>> ost.setup(ost.Momentum(0.1), {"enc": w, "dec": ost.Transpose(w)})
        State(Momentum; 1 parameters, 1 tied)
        >>> ost.setup(lambda path: ost.Descent(0.1) if path[-1] == "b" else ost.Adam(),
        ...           {"w": w, "b": np.zeros(3)})
        State(Descent, Adam; 2 parameters, 0 tied)

    Warns:
        CopyWarning: separate weights with equal values (see above); inside a plain ``jax.jit``,
            a ``Transpose`` whose parent is at no other position beside a parameter of its shape.

    Raises:
        TypeError: ``rule`` is not a rule, a tree of rules or a function giving rules.
        StructureError: a tree of rules that is not a prefix of the model.
        TieError: two leaves overlap in memory in a way that is not a tie (a slice or reshape),
            or one parameter would get two different rules.
        ValueError: a rule refuses a parameter (the message names it).

    A torch ``nn.Module`` is set up as its named-parameter dict
    (``optstate.interop.torch.parameters``): a Parameter under two names is one parameter.
    """
    model = _models.positions(model)  # a module as its named parameters
    with _collection_deferred():
        return _setup(rule, model)


@contextlib.contextmanager
def _collection_deferred() -> Iterator[None]:
    """Python's cyclic garbage collector paused while ``setup`` builds its plan and states.

    ``setup`` creates several small objects per leaf (the slots and parameters of the plan, each
    rule state), so on a model of many leaves the collector would run full collections over every
    object of the process meanwhile (measured: 5 of about 160 ms each in a benchmark process, for
    10,000 leaves). Those objects hold no reference cycles: nothing is left for the collector to
    find, and it resumes, as it was, afterwards."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _setup(rule: RuleSpec, model: Any) -> State:
    """``setup`` of a model that is a pytree."""
    leaves, treedef = flatten(model)
    for pos, leaf in enumerate(leaves):
        x = unwrap(leaf)[0]
        why = _arrays.unusable(x) if _arrays.is_trainable(x) else None
        if why is not None:
            raise TypeError(f"{path_strings(model)[pos]} is {why}")
    slots, params = find_ties(leaves, lambda: path_strings(model))
    per_position = rules_per_position(rule, model, [s is not None for s in slots])
    per_param = _assign(per_position, params, lambda: path_strings(model))
    groups, param_rules, param_variants = _grouped(per_param)
    _warn_split(groups, param_rules, params, lambda: path_strings(model))

    bases = [_arrays.detached(unwrap(leaves[p.primary])[0]) for p in params]
    _check_computable(bases, params, lambda: path_strings(model))
    like = bases[0] if bases else None
    hyper = [tuple(hyper_arrays(v.hyper(), like) for v in variants) for variants in groups]
    clocks = [
        jax.tree_util.tree_map(lambda _: _arrays.counter(like), variants[0].clocks())
        for variants in groups
    ]
    states = _init_states(per_param, param_rules, bases, params, lambda: path_strings(model))
    structures = tuple(variants[0].structure() for variants in groups)
    plan = Plan(treedef, slots, params, structures, param_rules, None, param_variants)
    _copies.warn_copies(bases, params, slots, lambda: path_strings(model), stacklevel=3)
    return State(states, hyper, clocks, _arrays.counter(like), plan)


def hyper_arrays(tree: Any, like: Any) -> Any:
    """A rule's hyper-parameters as 0-d arrays in the namespace of ``like`` (the model's arrays):
    numbers as floats, and the step counts of schedules as int32, so that schedules count exactly
    (see ``optstate.schedules``)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Schedule):
            return value.map_numbers(
                lambda v: _arrays.hyper_array(v, like), lambda v: _arrays.count_array(v, like)
            )
        return _arrays.hyper_array(value, like)

    return jax.tree_util.tree_map(convert, tree, is_leaf=lambda v: isinstance(v, Schedule))


def _grouped(
    per_param: list[Rule | None],
) -> tuple[list[list[Rule]], tuple[int, ...], tuple[int, ...]]:
    """The rule groups (each a list of variants: the distinct rules of its parameters), and per
    parameter its group and variant (-1 for an untrained parameter)."""
    keys: dict[Any, int] = {}
    groups: list[list[Rule]] = []
    param_rules, param_variants = [], []
    for rule in per_param:
        if rule is None:
            param_rules.append(-1)
            param_variants.append(-1)
            continue
        r = keys.setdefault(rule.group_key(), len(groups))
        if r == len(groups):
            groups.append([])
        variants = groups[r]
        v = next((i for i, known in enumerate(variants) if _same(known, rule)), len(variants))
        if v == len(variants):
            variants.append(rule)
        param_rules.append(r)
        param_variants.append(v)
    return groups, tuple(param_rules), tuple(param_variants)


def _same(a: Rule, b: Rule) -> bool:
    try:
        return a is b or bool(a == b)
    except (TypeError, ValueError):  # a rule holding arrays: compared by identity
        return False


def _warn_split(
    groups: list[list[Rule]],
    param_rules: tuple[int, ...],
    params: tuple[Param, ...],
    paths: Callable[[], list[str]],
) -> None:
    """A ``GroupSplitWarning`` when rules that look across parameters run in several groups."""
    across = [r for r, variants in enumerate(groups) if variants[0].looks_across()]
    if len(across) < 2:
        return
    names = paths()
    lines = []
    for r in across:
        members = [k for k, g in enumerate(param_rules) if g == r]
        example = names[params[members[0]].primary]
        lines.append(f"{groups[r][0].name()} over {len(members)} parameter(s) ({example}, ...)")
    warnings.warn(
        GroupSplitWarning(
            "rules that look across parameters run once per group of parameters with one rule "
            f"structure, and this setup makes {len(across)} such groups: "
            + "; ".join(lines)
            + ". Each group computes its own global norm or finiteness test. For one over all "
            "parameters, give them rules of the same structure that differ only in "
            "hyper-parameter values (e.g. a function of the path returning "
            "OptimiserChain(ClipGlobalNorm(c), AdamW(lr, weight_decay=...)) for every path); "
            "if separate groups are what you want, silence this warning with "
            "warnings.simplefilter('ignore', optstate.GroupSplitWarning)"
        ),
        stacklevel=4,
    )


def _check_computable(
    bases: list[Any], params: tuple[Param, ...], paths: Callable[[], list[str]]
) -> None:
    """NumPy computes only with its own dtypes: a NumPy array of one of ml_dtypes' floats (such as
    ``bfloat16``) cannot run a rule, while the same dtype as a JAX array can."""
    for base, param in zip(bases, params, strict=True):
        if _arrays.is_numpy(base) and base.dtype.kind not in "fc":
            raise TypeError(
                f"{paths()[param.primary]} is a NumPy array of {base.dtype}, a dtype NumPy cannot "
                "compute with; train it as a JAX array (jnp.asarray(x)), which supports "
                f"{base.dtype}, or as float32 NumPy"
            )


def _not_a_rule(spec: Any) -> TypeError:
    hint = " (a rule class: call it, e.g. Adam())" if isinstance(spec, type) else ""
    return TypeError(
        "setup expects an optstate rule such as optstate.Adam(1e-3), a tree of rules matching "
        f"the model, or a function from a path to a rule{hint}; got {spec!r} of type "
        f"{type(spec).__name__}"
    )


def rules_per_position(spec: Any, model: Any, trainable: list[bool]) -> list[Rule | None]:
    if isinstance(spec, Rule):
        return [spec] * len(trainable)
    if isinstance(spec, type):
        raise _not_a_rule(spec)
    if callable(spec):
        keys = position_keys(model)
        leaves = flatten(model)[0] if _takes_leaf(spec) else None
        out: list[Rule | None] = []
        for pos, key in enumerate(keys):
            if not trainable[pos]:
                chosen = None
            else:
                chosen = spec(key) if leaves is None else spec(key, leaves[pos])
            if chosen is not None and not isinstance(chosen, Rule):
                raise TypeError(
                    f"the rule function returned {chosen!r} for the path {key}; "
                    "it must return an optstate rule or None"
                )
            out.append(chosen)
        return out

    def is_rule_leaf(x: Any) -> bool:
        return x is None or isinstance(x, Rule)

    flat, rules_def_ = jax.tree_util.tree_flatten_with_path(spec, is_leaf=is_rule_leaf)
    rules_def: Any = rules_def_
    if not any(isinstance(r, Rule) for _, r in flat):
        raise _not_a_rule(spec)
    for path, r in flat:
        if not is_rule_leaf(r):
            raise TypeError(
                f"rules{jax.tree_util.keystr(path)} is {r!r}; a tree of rules holds optstate "
                "rules (or None for parameters left untrained)"
            )
    try:
        subtrees = rules_def.flatten_up_to(model)
    except (ValueError, TypeError) as err:
        raise StructureError(
            f"the tree of rules is not a prefix of the model's structure: {err}. Rules: "
            f"{rules_def}; model: {jax.tree_util.tree_structure(model)}"
        ) from None
    return [r for (_, r), sub in zip(flat, subtrees, strict=True) for _ in flatten(sub)[0]]


def _takes_leaf(fn: Callable[..., Any]) -> bool:
    """A rule function of two arguments (path and leaf) rather than of the path alone: exactly
    two positional parameters without defaults."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: a function of the path
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.kind in positional and p.default is p.empty]
    return len(required) == 2


def _assign(
    per_position: list[Rule | None], params: tuple[Param, ...], paths: Callable[[], list[str]]
) -> list[Rule | None]:
    """Each parameter's rule (``None``: untrained); one parameter's positions must agree."""
    out: list[Rule | None] = []
    for param in params:
        first = param.positions[0]
        rule = per_position[first]
        for pos in param.positions[1:]:
            if per_position[pos] != rule:
                names = paths()
                raise TieError(
                    f"{names[first]} and {names[pos]} hold one parameter but were given "
                    f"different rules: {rule!r} and {per_position[pos]!r}"
                )
        out.append(rule)
    return out


# Creating a state array eagerly costs one dispatch per array (about 0.1 ms here); a compiled
# ``init`` creates the state arrays of a chunk of parameters in one call, but compiling it costs
# about as much as 200 eager creations. So parameters are grouped by rule, shape, dtype and
# sharding, and the parameters of a group at least this large are created by compiled calls of
# this many parameters each (and one for the rest), one compilation per chunk size.
_COMPILED_INIT_MIN_GROUP = 64


def _init_states(
    per_param: list[Rule | None],
    param_rules: tuple[int, ...],
    bases: list[Any],
    params: tuple[Param, ...],
    paths: Callable[[], list[str]],
) -> list[Any]:
    """Each parameter's initial rule state (``()`` for an untrained one). A rule's error for a
    parameter it refuses names the parameter."""
    with _naming(params, paths) as current:
        return _init_each(per_param, param_rules, bases, current)


@contextlib.contextmanager
def _naming(params: tuple[Param, ...], paths: Callable[[], list[str]]) -> Iterator[list[int]]:
    """A ``TypeError`` or ``ValueError`` raised meanwhile, prefixed with the path of the
    parameter ``current[0]`` (unless the message names it already)."""
    current = [0]
    try:
        yield current
    except (TypeError, ValueError) as err:
        if type(err) not in (TypeError, ValueError) or not params:
            raise
        name = paths()[params[current[0]].primary]
        if name in str(err):
            raise
        raise type(err)(f"{name}: {err}") from err


def _init_each(
    per_param: list[Rule | None], param_rules: tuple[int, ...], bases: list[Any], current: list[int]
) -> list[Any]:
    states: list[Any] = [()] * len(bases)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for k, (rule, base) in enumerate(zip(per_param, bases, strict=True)):
        if rule is None:
            continue
        # NumPy has no dispatch to save, and tracers (``setup`` inside ``jit``) no compiled init.
        if _arrays.is_jax(base) and not _arrays.is_tracer(base):
            key = (param_rules[k], base.shape, base.dtype, base.sharding)
            groups.setdefault(key, []).append(k)
        else:
            current[0] = k
            states[k] = rule.init(base)
    size = _COMPILED_INIT_MIN_GROUP
    for (_, shape, dtype, sharding), members in groups.items():
        rule = per_param[members[0]]
        assert rule is not None
        current[0] = members[0]  # the members share rule, shape and dtype: and any refusal
        chunks = [members[i : i + size] for i in range(0, len(members), size)]
        inits = (
            []
            if len(members) < size
            else [_compiled_init(rule, shape, dtype, sharding, len(ks)) for ks in chunks]
        )
        ready = [init for init in inits if init is not None]
        if inits and len(ready) == len(inits):  # one dispatch per chunk
            for ks, init in zip(chunks, ready, strict=True):
                for k, state in zip(ks, init([bases[k] for k in ks]), strict=True):
                    states[k] = state
        else:
            for k in members:
                current[0] = k
                states[k] = rule.init(bases[k])
    return states


Init = Callable[[list[Any]], list[Any]]


def _compiled_init(rule: Rule, shape: Any, dtype: Any, sharding: Any, n: int) -> Init | None:
    """``_compiled_once`` for a hashable rule; ``None`` (the eager init) for one that is not."""
    try:
        hash(rule)
    except TypeError:  # a rule holding an array, say
        return None
    return _compiled_once(rule, shape, dtype, sharding, n)


@functools.lru_cache(maxsize=256)
def _compiled_once(rule: Rule, shape: Any, dtype: Any, sharding: Any, n: int) -> Init | None:
    """``rule.init`` of ``n`` parameters of this shape, dtype and sharding, compiled into one
    call, creating each state array with the sharding the eager ``init`` would give it: the
    parameter's for arrays of the parameter's shape, replicated on the same devices otherwise.
    ``None`` for a sharding it does not know how to replicate."""
    replicated: Any
    if isinstance(sharding, SingleDeviceSharding):
        replicated = sharding
    elif isinstance(sharding, NamedSharding):
        replicated = NamedSharding(sharding.mesh, PartitionSpec())  # type: ignore[no-untyped-call]
    else:
        return None
    like = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # type: ignore[no-untyped-call]
    out = jax.eval_shape(rule.init, like)
    shardings = jax.tree_util.tree_map(
        lambda s: sharding if tuple(s.shape) == tuple(shape) else replicated, out
    )
    return jax.jit(lambda ps: [rule.init(p) for p in ps], out_shardings=[shardings] * n)
