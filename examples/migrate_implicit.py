"""From implicit to explicit gradients, on a script-style model: both ways give the same training.

The model is built the way a notebook builds it, without any class: a list of layers, each a dict
of arrays, a deep autoencoder whose two decoder layers reuse the encoder's weights through
``ost.Transpose`` (two tied parameters, each at two positions).

It is trained twice from the same start, with the same ``ost.Adam``:

1. **implicit**, the migration bridge: a zero-argument loss closure over the model,
   ``implicit.params`` and ``implicit.value_and_gradient`` (one total gradient per parameter,
   keyed by the array), then ``grads.to_tree(model)``, which puts each total at *one* position so
   that ``ost.update`` counts it once;
2. **explicit**, where the migration ends: ``jax.grad(loss)(model, x)`` gives one partial gradient
   per position and ``ost.update`` sums each tied weight's two partials itself.

The two runs are identical to the last bit (max abs diff 0.0): for each tied weight JAX adds the
same two partial gradients in both runs (inside the backward pass in the first, in ``update`` in
the second; two floats add the same either way round), and everything else is the same code.

Run ``python examples/migrate_implicit.py --help`` for the options; ``main(argv)`` returns the key
figures as a dict (the test suite calls it with few steps).
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optstate as ost
from optstate import implicit

SIZES = (24, 12, 6)  # input, hidden, code: the decoder mirrors the encoder


def make_data(rng: np.random.Generator, n: int = 256) -> jax.Array:
    """Points near a 4-dimensional subspace of R^24: something an autoencoder can learn."""
    codes = rng.standard_normal((n, 4)) @ rng.standard_normal((4, SIZES[0]))
    x = np.tanh(codes / 2) + 0.05 * rng.standard_normal((n, SIZES[0]))
    return jnp.asarray(x, dtype=jnp.float32)


def build_model(rng: np.random.Generator) -> list[dict[str, Any]]:
    """Script style: weights made one by one, the decoder reusing them transposed."""
    layers: list[dict[str, Any]] = []
    for n_in, n_out in itertools.pairwise(SIZES):
        w = jnp.asarray(rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), dtype=jnp.float32)
        layers.append({"w": w, "b": jnp.zeros(n_out)})
    for layer in reversed(layers[:]):
        w = layer["w"]
        layers.append({"w": ost.Transpose(w), "b": jnp.zeros(w.shape[0])})
    return layers


@jax.jit  # compiled once; jax.grad and the bridge's tracing both go through it
def loss_fn(layers: list[dict[str, Any]], x: jax.Array) -> jax.Array:
    """Mean squared reconstruction error; tanh between layers, none after the last."""
    h = x
    for i, layer in enumerate(layers):
        h = h @ layer["w"] + layer["b"][None, :]
        if i < len(layers) - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - x) ** 2)


def train_implicit(model: list[dict[str, Any]], x: jax.Array, steps: int, lr: float) -> Any:
    """The bridge: loss closure, ``params``, gradients by parameter, ``to_tree``, ``update``."""
    state = ost.setup(ost.Adam(lr), model)

    def loss() -> jax.Array:  # implicit style: reads the current model from the enclosing scope
        return loss_fn(model, x)

    for _ in range(steps):
        ps = implicit.params(model)  # again each step: a pure update returns new arrays
        _, grads = implicit.value_and_gradient(loss, ps)
        state, model = ost.update(state, model, grads.to_tree(model))
    return model


def train_explicit(model: list[dict[str, Any]], x: jax.Array, steps: int, lr: float) -> Any:
    """Where the migration ends: the structural gradient of the model goes straight to update."""
    state = ost.setup(ost.Adam(lr), model)
    for _ in range(steps):
        grads = jax.grad(loss_fn)(model, x)
        state, model = ost.update(state, model, grads)
    return model


def max_abs_diff(a: Any, b: Any) -> float:
    return max(
        float(np.max(np.abs(np.asarray(u) - np.asarray(v))))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def tie_kept(model: list[dict[str, Any]]) -> bool:
    """Every decoder weight is still the very encoder array, transposed."""
    half = len(model) // 2
    return all(model[-1 - i]["w"].parent is model[i]["w"] for i in range(half))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="full-batch Adam steps per run")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the weights")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both ways from the same start, print the comparison, return the key figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    x = make_data(rng)
    model = build_model(rng)
    initial = float(loss_fn(model, x))
    print(f"{ost.setup(ost.Adam(args.lr), model)}: {implicit.params(model)}")

    via_bridge = train_implicit(model, x, args.steps, args.lr)
    explicit = train_explicit(model, x, args.steps, args.lr)

    figures: dict[str, Any] = {
        "steps": args.steps,
        "initial_loss": initial,
        "implicit_loss": float(loss_fn(via_bridge, x)),
        "explicit_loss": float(loss_fn(explicit, x)),
        "max_abs_diff": max_abs_diff(via_bridge, explicit),
        "ties_kept": tie_kept(via_bridge) and tie_kept(explicit),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"{args.steps} Adam steps each; MSE {initial:.5f} -> implicit bridge "
        f"{figures['implicit_loss']:.5f}, explicit {figures['explicit_loss']:.5f}\n"
        f"max |implicit - explicit| over all weights: {figures['max_abs_diff']}; "
        f"ties kept: {figures['ties_kept']}; {figures['seconds']:.1f} s"
    )
    return figures


if __name__ == "__main__":
    main()
