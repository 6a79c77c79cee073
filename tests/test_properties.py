"""Properties over random tied trees, for every rule configuration of test_rule_properties.py.

A drawn example is a tree of dicts, lists and tuples (up to four levels) whose positions hold a
few unique parameters: the array itself, ``Transpose(p)``, ``Transpose(Transpose(p))``, and on
NumPy the views ``p.T`` and ``np.swapaxes(p, 0, 1)``; integer leaves that are not parameters; and
gradients that are missing at some positions or for whole branches, given at a ``Transpose``
either as a ``Transpose`` node or dense in the position's orientation.

The reference is the same rule on the de-duplicated model: one array per unique parameter, no
ties, fed the sum of that parameter's position gradients, each turned back to the parameter's
orientation by hand (``.T``, ``np.swapaxes``), added in the order of the positions. Properties:
``update`` on the tied model equals it exactly, every position holds the new array in its own
orientation, ``update_`` equals ``update``, and on JAX ``jax.jit(update)`` equals the eager step.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rules_under_test import RULES

import optstate as ost

# Derandomised: the examples are a fixed function of each test, so CI runs the same cases on
# every machine and a failure reproduces; the database is off so no run depends on an earlier one.
# The numbers of examples keep this file to about 20 s on two cores.
NUMPY_PROFILE = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
JAX_PROFILE = settings(NUMPY_PROFILE, max_examples=2)  # each JAX example compiles three programs

SHAPES = [(), (3,), (2, 3), (3, 3), (2, 3, 4)]  # (3, 3): a transpose of the same shape
STEPS = 2


@dataclasses.dataclass(frozen=True)
class Position:
    """What a position holds: parameter ``param`` as ``kind``, or (``param`` None) an integer."""

    param: int | None
    kind: str  # array, transpose, transpose2, view_t, swap; int, int_array
    grad: str  # none, node (a Transpose node), dense


def orient(x, kind):
    """The parameter's array as the position ``kind`` sees it (for gradients: in its own
    orientation). ``np.transpose`` reverses all axes, as ``.T`` and ``Transpose`` do."""
    if kind in ("transpose", "view_t"):
        return np.transpose(x)
    if kind == "swap":
        return np.swapaxes(x, 0, 1)
    return x


def back(g, kind):
    """A gradient in the position's orientation, turned to the parameter's: the inverses of
    ``orient`` (both are their own inverse)."""
    return orient(g, kind)


@st.composite
def layouts(draw, numpy):
    """(shapes, positions in tree order, tree skeleton, seed)."""
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    positions = []
    for p, shape in enumerate(shapes):
        kinds = ["array", "transpose", "transpose2"]
        views = (["view_t"] + (["swap"] if len(shape) >= 2 else [])) if numpy else []
        # The parameter's own array is always in the model, so its orientation is the one the
        # de-duplicated model holds (a NumPy parameter seen only through views would take a view's).
        first = draw(st.sampled_from(kinds))
        more = draw(st.lists(st.sampled_from(kinds + views), max_size=2))
        for kind in [first, *more]:
            form = ["none", "node", "dense"] if kind.startswith("transpose") else ["none", "dense"]
            positions.append(Position(p, kind, draw(st.sampled_from(form))))
    for _ in range(draw(st.integers(0, 2))):
        positions.append(Position(None, draw(st.sampled_from(["int", "int_array"])), "none"))
    positions = draw(st.permutations(positions))
    skeleton = draw(nest(len(positions), depth=0))
    seed = draw(st.integers(0, 2**32 - 1))
    return shapes, positions, skeleton, seed


@st.composite
def nest(draw, n, depth):
    """A skeleton holding leaves 0..n-1 in order: a leaf index, or (container, children, None
    branch). Containers are dicts, lists and tuples, four levels at most; some are empty."""
    if n == 1 and (depth >= 4 or draw(st.booleans())):
        return 0
    kind = draw(st.sampled_from(["dict", "list", "tuple"]))
    if depth >= 3:  # no deeper than four levels of containers: one container of leaves
        sizes = [1] * n
    elif n == 1:
        sizes = [1]
    else:
        cuts = sorted(draw(st.lists(st.integers(1, n - 1), max_size=min(n - 1, 3), unique=True)))
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
    children = [draw(nest(size, depth + 1)) for size in sizes]
    if draw(st.integers(0, 5)) == 0:
        children.append(("list", [], False))  # an empty node: no positions at all
    return (kind, children, draw(st.integers(0, 4)) == 0)  # the last: a None gradient branch


def build(skeleton, leaves, for_grads=False):
    """The tree of ``skeleton`` with ``leaves`` in order; for gradients, None for a None branch."""
    it = iter(leaves)

    def go(node):
        if node == 0:
            return next(it)
        kind, children, none_branch = node
        built = [go(c) for c in children]
        if for_grads and none_branch:
            return None
        if kind == "dict":
            # Keys that sort as they were made: the positions are listed in that order, and
            # pytrees flatten a dict by sorted key ("k10" would come before "k2").
            return {f"k{i:04d}": c for i, c in enumerate(built)}
        return built if kind == "list" else tuple(built)

    tree = go(skeleton)
    assert next(it, None) is None
    return tree


def none_branches(skeleton, n):
    """Per leaf (in order): does a None branch above it hide its gradient?"""
    hidden = []

    def go(node, hide):
        if node == 0:
            hidden.append(hide)
            return
        _, children, none_branch = node
        for c in children:
            go(c, hide or none_branch)

    go(skeleton, False)
    assert len(hidden) == n
    return hidden


class Case:
    """A drawn layout made concrete for one backend: fresh models and the gradients of a step."""

    def __init__(self, layout, xp, dtype):
        self.shapes, self.positions, self.skeleton, seed = layout
        self.xp, self.dtype = xp, dtype
        rng = np.random.default_rng(seed)
        self.values = [rng.normal(size=s).astype(dtype) for s in self.shapes]
        self.grads = [
            [
                rng.normal(size=orient(np.zeros(self.shapes[p.param]), p.kind).shape).astype(dtype)
                if p.param is not None
                else None
                for p in self.positions
            ]
            for _ in range(STEPS)
        ]
        self.hidden = none_branches(self.skeleton, len(self.positions))
        # The de-duplicated model lists parameters in the order of their first positions.
        firsts = {}
        for i, p in enumerate(self.positions):
            if p.param is not None:
                firsts.setdefault(p.param, i)
        self.order = sorted(firsts, key=firsts.get)

    def model(self):
        """A fresh tied model (new arrays, so ``update_`` may write them)."""
        bases = [self.xp.asarray(v.copy()) for v in self.values]
        leaves = []
        for p in self.positions:
            if p.param is None:
                leaves.append(7 if p.kind == "int" else self.xp.arange(3))
                continue
            w = bases[p.param]
            if p.kind == "transpose":
                w = ost.Transpose(w)
            elif p.kind == "transpose2":
                w = ost.Transpose(ost.Transpose(w))
            elif p.kind in ("view_t", "swap"):
                w = orient(w, p.kind)  # a NumPy view of the parameter's array
            leaves.append(w)
        return build(self.skeleton, leaves)

    def single(self):
        """The de-duplicated model: one fresh array per unique parameter."""
        return {f"p{i}": self.xp.asarray(self.values[p].copy()) for i, p in enumerate(self.order)}

    def step_grads(self, step):
        """The structural gradient of ``step``, and per parameter the hand-summed gradient."""
        leaves, sums = [], {}
        for p, g, hidden in zip(self.positions, self.grads[step], self.hidden, strict=True):
            if p.param is None:
                leaves.append(None if hidden else np.ones(3))  # ignored: not a parameter
                continue
            if p.grad == "none":
                leaves.append(None)
                continue
            given = self.xp.asarray(g)
            if p.grad == "node":  # jax.grad's form: the gradient in the parameter's orientation
                parent = self.xp.asarray(back(g, p.kind))
                given = ost.Transpose(parent if p.kind == "transpose" else ost.Transpose(parent))
            leaves.append(given)
            if not hidden:
                turned = back(g, p.kind)
                total = sums.get(p.param)
                sums[p.param] = turned if total is None else total + turned
        grads = build(self.skeleton, leaves, for_grads=True)
        single = {f"p{i}": sums.get(p) for i, p in enumerate(self.order)}
        single = {k: (None if g is None else self.xp.asarray(g)) for k, g in single.items()}
        return grads, single

    def check_positions(self, model, single, same_objects):
        """Every position holds its parameter's new value, in its own orientation."""
        leaves = jax.tree_util.tree_leaves(
            model, is_leaf=lambda x: isinstance(x, ost.Transpose) or x is None
        )
        index = {p: i for i, p in enumerate(self.order)}
        held, views = {}, []
        for p, leaf in zip(self.positions, leaves, strict=True):
            if p.param is None:
                continue
            expected = np.asarray(single[f"p{index[p.param]}"])
            array = leaf
            for _ in range({"transpose": 1, "transpose2": 2}.get(p.kind, 0)):
                assert isinstance(array, ost.Transpose)
                array = array.parent
            if p.kind in ("view_t", "swap"):
                expected = orient(expected, p.kind)
            np.testing.assert_array_equal(array, expected)
            if p.kind in ("view_t", "swap"):
                views.append((p.param, array))
            elif same_objects:
                assert held.setdefault(p.param, array) is array, "a tie came back as two arrays"
        for param, view in views:  # a view of the parameter's one array, not a copy
            assert np.shares_memory(view, held[param])


def run(case, rule, update, reference=ost.update):
    """Two steps of ``update`` on the tied model against ``reference`` on the de-duplicated one
    (``update_`` against ``update_``: on NumPy its in-place forms round apart from the pure ones,
    which tests/test_inplace.py compares)."""
    tied, single = case.model(), case.single()
    state, ref_state = ost.setup(rule, tied), ost.setup(rule, single)
    for step in range(STEPS):
        grads, summed = case.step_grads(step)
        state, tied = update(state, tied, grads)
        ref_state, single = reference(ref_state, single, summed)
    return tied, single


@NUMPY_PROFILE
@given(layout=layouts(numpy=True))
def test_numpy_tied_trees_equal_the_deduplicated_model_for_every_rule(layout):
    case = Case(layout, np, np.float64)
    for name in RULES:
        rule, _ = RULES[name]
        tied, single = run(case, rule, ost.update)
        case.check_positions(tied, single, same_objects=True)
        in_place, in_place_single = run(case, rule, ost.update_, ost.update_)
        case.check_positions(in_place, in_place_single, same_objects=True)


@pytest.mark.parametrize("name", list(RULES))
@JAX_PROFILE
@given(layout=layouts(numpy=False))
def test_jax_tied_trees_equal_the_deduplicated_model(name, layout):
    rule, _ = RULES[name]
    case = Case(layout, jnp, np.float32)
    tied, single = run(case, rule, ost.update)
    case.check_positions(tied, single, same_objects=True)
    in_place, _ = run(case, rule, ost.update_)
    case.check_positions(in_place, single, same_objects=True)
    jitted, _ = run(case, rule, jax.jit(ost.update))
    case.check_positions(jitted, single, same_objects=False)  # jit returns equal copies
