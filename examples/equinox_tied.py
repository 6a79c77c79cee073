"""An Equinox model that uses one layer twice, trained with optstate, against optax per position.

Equinox models are pytrees, and a pytree holds no references: a layer assigned to two fields
appears twice among the model's leaves. Equinox's FAQ warns that with optax the two copies then
"drift apart": optax keeps one state per leaf and updates each copy on its own. optstate sees that
the two fields hold the same arrays, keeps one state for them, sums their gradients and puts one
new array back in both fields.

The model is a small classifier of scikit-learn's 8x8 digits (shipped with the package, no
download) with a residual block applied twice, ``block`` and ``again`` being one
``eqx.nn.Linear``. Its activation is a field too: a leaf that is not an array, which
``eqx.filter_grad`` gives no gradient and optstate passes through. Three runs from the same
initial weights, full batch, the same Adam settings:

1. **optstate**: ``eqx.filter_value_and_grad`` then ``ost.update`` in ``eqx.filter_jit``. There the
   arrays are tracers without identity and the state's tie plan carries the tie; the model that
   comes back holds equal copies in ``block`` and ``again``, which ``ost.retie`` makes one
   object again at the end.
2. **optax per position**: ``optax.adam`` on ``eqx.filter(model, eqx.is_array)`` and
   ``eqx.apply_updates``, the usual Equinox loop: the two copies of the block drift apart.
3. **reference**: the same network written with the block held once and called twice, trained
   with ``optax.adam``; autodiff sums the block's two gradients. optstate reproduces it up to
   float32 rounding (its Adam rounds ``1 - beta2`` in float32, optax in float64: see
   docs/rules.md).

Run ``python examples/equinox_tied.py --help`` for the options; ``main(argv)`` returns the key
figures as a dict (the test suite calls it with few steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optstate as ost

WIDTH = 32


class TwiceNet(eqx.Module):
    """``inp``, a residual ``block`` applied twice (``again`` is the same layer), ``out``."""

    inp: eqx.nn.Linear
    block: eqx.nn.Linear
    again: eqx.nn.Linear
    out: eqx.nn.Linear
    activation: Callable[[jax.Array], jax.Array]  # a leaf that is not an array

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.inp(x))
        h = h + self.activation(self.block(h))
        h = h + self.activation(self.again(h))
        return self.out(h)


class OnceNet(eqx.Module):
    """The reference: the same network with the block held once and called twice."""

    inp: eqx.nn.Linear
    block: eqx.nn.Linear
    out: eqx.nn.Linear
    activation: Callable[[jax.Array], jax.Array]

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.inp(x))
        h = h + self.activation(self.block(h))
        h = h + self.activation(self.block(h))
        return self.out(h)


def load_data() -> tuple[jax.Array, jax.Array]:
    """All 1797 digits as 64 pixel intensities in [0, 1], and their labels. The example is about
    the optimiser, so it reports the training loss only."""
    digits = load_digits()
    return jnp.asarray(digits.data.astype(np.float32) / 16.0), jnp.asarray(digits.target)


def linear(rng: np.random.Generator, n_in: int, n_out: int) -> eqx.nn.Linear:
    """An ``eqx.nn.Linear`` with Equinox's default initialisation, weight and bias uniform in
    ``±1/sqrt(n_in)``, drawn with NumPy: a tiny script need not compile a random generator."""
    shell = eqx.filter_eval_shape(eqx.nn.Linear, n_in, n_out, key=jax.random.key(0))
    bound = n_in**-0.5
    weight = rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32)
    bias = rng.uniform(-bound, bound, n_out).astype(np.float32)
    arrays = (jnp.asarray(weight), jnp.asarray(bias))
    return eqx.tree_at(lambda layer: (layer.weight, layer.bias), shell, arrays)


def init(seed: int, n_in: int, n_out: int) -> TwiceNet:
    rng = np.random.default_rng(seed)
    block = linear(rng, WIDTH, WIDTH)
    return TwiceNet(
        inp=linear(rng, n_in, WIDTH),
        block=block,
        again=block,  # the same layer: the case of Equinox's FAQ
        out=linear(rng, WIDTH, n_out),
        activation=jax.nn.tanh,
    )


def once(model: TwiceNet) -> OnceNet:
    return OnceNet(model.inp, model.block, model.out, model.activation)


def loss_fn(model: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of the class scores."""
    logits = jax.vmap(model)(x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def max_difference(a: Any, b: Any) -> float:
    """``max |a - b|`` over the arrays of two pytrees of one structure (in NumPy: no compiling)."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in pairs)


def tie_drift(model: TwiceNet) -> float:
    """``max |block - again|`` over weight and bias: 0.0 while the tie holds."""
    return max_difference(model.block, model.again)


@eqx.filter_jit
def optstate_step(
    state: ost.State, model: TwiceNet, x: jax.Array, y: jax.Array
) -> tuple[ost.State, TwiceNet, jax.Array]:
    """One Adam step with optstate, and the loss before it. Inside ``filter_jit`` the arrays
    are tracers and there is no identity: the state's plan knows that ``block`` and ``again``
    are one parameter."""
    # One gradient per position (block and again each get theirs), None for the activation.
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    state, model = ost.update(state, model, grads)
    return state, model, loss


def make_optax_step(opt: optax.GradientTransformation) -> Callable[..., Any]:
    """The usual Equinox and optax loop: one optax state per leaf of the filtered model."""

    @eqx.filter_jit
    def step(opt_state: Any, model: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, Any]:
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
        updates, opt_state = opt.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return opt_state, eqx.apply_updates(model, updates), loss

    return step


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="full-batch Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the three models, print the comparison unless ``--quiet``, return the figures."""
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    x, y = load_data()
    model = init(args.seed, x.shape[1], 10)

    state = ost.setup(ost.Adam(args.lr), model)  # block/again found as one parameter
    opt = optax.adam(args.lr)
    untied, untied_state = model, opt.init(eqx.filter(model, eqx.is_array))
    untied_step = make_optax_step(opt)
    ref = once(model)
    ref_state = opt.init(eqx.filter(ref, eqx.is_array))
    ref_step = make_optax_step(opt)

    say(f"{state}; {len(x)} digits, {args.steps} full-batch Adam steps")
    losses = []  # per step, before it: optstate, optax per position, reference
    for i in range(1, args.steps + 1):
        state, model, loss = optstate_step(state, model, x, y)
        untied_state, untied, untied_loss = untied_step(untied_state, untied, x, y)
        ref_state, ref, ref_loss = ref_step(ref_state, ref, x, y)
        losses.append((float(loss), float(untied_loss), float(ref_loss)))
        if i == args.steps or i % max(1, args.steps // 4) == 0:
            say(
                f"step {i:>4}  loss: optstate {loss:.4f}, optax per position {untied_loss:.4f}"
                f"  | optax tie drift {tie_drift(untied):.1e}"
            )

    one_object_after_jit = model.again.weight is model.block.weight
    model = ost.retie(state, model)  # one array object in both fields again
    arrays = eqx.filter(once(model), eqx.is_array), eqx.filter(ref, eqx.is_array)
    diff = max_difference(*arrays)
    scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(arrays[1]))
    figures: dict[str, Any] = {
        "optstate_initial_loss": losses[0][0],
        "optstate_train_loss": losses[-1][0],  # at the last step, before it
        "optax_train_loss": losses[-1][1],
        "reference_train_loss": losses[-1][2],
        "optstate_tie_drift": tie_drift(model),
        "optax_tie_drift": tie_drift(untied),
        "optstate_one_object_after_jit": one_object_after_jit,
        "optstate_one_object_after_retie": model.again.weight is model.block.weight,
        "max_diff_to_reference": diff,
        "max_rel_diff_to_reference": diff / scale,
        "seconds": time.perf_counter() - start,
    }
    say(
        f"\nloss at the last step: optstate {figures['optstate_train_loss']:.4f}, reference "
        f"{figures['reference_train_loss']:.4f}, optax per position "
        f"{figures['optax_train_loss']:.4f}\n"
        f"max |block - again|: optstate {figures['optstate_tie_drift']:.1f}, optax per position "
        f"{figures['optax_tie_drift']:.1e}\n"
        f"optstate vs reference: max |difference| {figures['max_diff_to_reference']:.1e} "
        f"(relative {figures['max_rel_diff_to_reference']:.1e}, float32 rounding)\n"
        f"again is block: {one_object_after_jit} after filter_jit, "
        f"{figures['optstate_one_object_after_retie']} after ost.retie  "
        f"({figures['seconds']:.1f} s)"
    )
    return figures


if __name__ == "__main__":
    main()
