"""Flax models with shared weights trained with optstate: an NNX model with a shared Variable, and
a linen parameter dict tied by hand.

**NNX.** A Variable held by two modules (here the encoder's kernel, which the decoder of a tied
autoencoder reads transposed) is one Variable: ``nnx.split`` and ``nnx.state`` give it once, and
the graph definition remembers where it goes. optstate trains that state as it trains any pytree,
inside ``jax.jit``, and ``nnx.merge`` / ``nnx.update`` put the one new value back in both
modules. The run is checked against optax on the same de-duplicated state: NNX has already made
the tie one parameter, so the two must agree (up to float32 rounding: optstate's Adam rounds
``1 - beta2`` in float32, optax in float64, see docs/rules.md).

**linen.** A linen parameter dict is a plain tree, and the same array may be put at two keys to
tie two layers: here a residual block applied twice, ``block`` and ``again`` sharing one kernel.
optstate finds the tie (the same array object), sums the two gradients and keeps one kernel;
optax per position keeps two states and the two kernels drift apart.

Both models learn scikit-learn's 8x8 digits (shipped with the package, no download), full batch:
the autoencoder reconstructs them, the linen network classifies them. Run
``python examples/flax_shared.py --help`` for the options; ``main(argv)`` returns the key figures
as a dict (the test suite calls it with few steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import optstate as ost

N_HIDDEN = 32


def load_data() -> tuple[jax.Array, jax.Array]:
    """All 1797 digits as 64 pixel intensities in [0, 1], and their labels."""
    digits = load_digits()
    return jnp.asarray(digits.data.astype(np.float32) / 16.0), jnp.asarray(digits.target)


def normal(rng: np.random.Generator) -> Callable[..., jax.Array]:
    """A Flax initialiser drawing with NumPy, scaled by ``1/sqrt(fan_in)``: a tiny script need
    not compile a random generator."""

    def init(key: Any, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.asarray(rng.normal(size=shape) * shape[0] ** -0.5, dtype=dtype)

    return init


# -- NNX: one Variable in two modules ------------------------------------------------------


class TiedAutoencoder(nnx.Module):
    """The decoder's weight is the encoder's kernel Variable itself, read transposed."""

    def __init__(self, n_in: int, rng: np.random.Generator) -> None:
        rngs = nnx.Rngs(0)  # unused: the initialiser draws with NumPy
        self.enc = nnx.Linear(n_in, N_HIDDEN, kernel_init=normal(rng), rngs=rngs)
        self.dec_kernel = self.enc.kernel  # the shared Variable
        self.dec_bias = nnx.Param(jnp.zeros(n_in))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(self.enc(x))
        return jax.nn.sigmoid(h @ self.dec_kernel[...].T + self.dec_bias[...][None, :])


def train_nnx(args: argparse.Namespace, x: jax.Array) -> dict[str, Any]:
    """optstate on the NNX state, and optax on the same state as the reference."""
    model = TiedAutoencoder(x.shape[1], np.random.default_rng(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params: Any) -> jax.Array:
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - x) ** 2)

    @jax.jit
    def optstate_step(state: ost.State, params: Any) -> tuple[ost.State, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params)
        state, params = ost.update(state, params, grads)
        return state, params, loss

    opt = optax.adam(args.lr)

    @jax.jit
    def optax_step(opt_state: Any, params: Any) -> tuple[Any, Any]:
        updates, opt_state = opt.update(jax.grad(loss_fn)(params), opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    state = ost.setup(ost.Adam(args.lr), params)
    ref, ref_state = params, opt.init(params)
    losses = []
    for _ in range(args.steps):
        state, params, loss = optstate_step(state, params)
        ref_state, ref = optax_step(ref_state, ref)
        losses.append(float(loss))
    nnx.update(model, params)  # the one new kernel goes to the encoder and the decoder
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(ref), strict=True)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs)
    scale = max(float(np.max(np.abs(np.asarray(b)))) for b in jax.tree.leaves(ref))
    return {
        "nnx_state": str(state),
        "nnx_initial_loss": losses[0],
        "nnx_train_loss": losses[-1],
        "nnx_shared_after_update": model.dec_kernel is model.enc.kernel,
        "nnx_max_rel_diff_to_reference": diff / scale,
    }


# -- linen: one array at two keys of the parameter dict ------------------------------------


class TwiceResidual(nn.Module):
    """A classifier with a residual block applied twice (``block`` and ``again``)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(nn.Dense(N_HIDDEN, name="inp")(x))
        h = h + jnp.tanh(nn.Dense(N_HIDDEN, name="block")(h))
        h = h + jnp.tanh(nn.Dense(N_HIDDEN, name="again")(h))
        return nn.Dense(10, name="out")(h)


def init_linen(rng: np.random.Generator, x: jax.Array) -> dict[str, Any]:
    """The parameter dict, drawn with NumPy, with ``again``'s kernel tied to ``block``'s."""
    shapes = jax.eval_shape(TwiceResidual().init, jax.random.key(0), x[:1])
    params = jax.tree.map(lambda s: normal(rng)(None, s.shape, s.dtype), shapes)
    params["params"]["again"]["kernel"] = params["params"]["block"]["kernel"]  # the tie
    return params


def linen_tie_drift(params: dict[str, Any]) -> float:
    p = params["params"]
    return float(np.max(np.abs(np.asarray(p["block"]["kernel"]) - p["again"]["kernel"])))


def train_linen(args: argparse.Namespace, x: jax.Array, y: jax.Array) -> dict[str, Any]:
    """optstate on the hand-tied dict, and optax per position on the same dict."""
    net = TwiceResidual()

    def loss_fn(params: Any) -> jax.Array:
        logits = net.apply(params, x)
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    @jax.jit
    def optstate_step(state: ost.State, params: Any) -> tuple[ost.State, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params)  # one gradient per key
        state, params = ost.update(state, params, grads)  # summed once for the tied kernel
        return state, params, loss

    opt = optax.adam(args.lr)

    @jax.jit
    def optax_step(opt_state: Any, params: Any) -> tuple[Any, Any]:
        updates, opt_state = opt.update(jax.grad(loss_fn)(params), opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    params = init_linen(np.random.default_rng(args.seed), x)
    state = ost.setup(ost.Adam(args.lr), params)
    untied, untied_state = params, opt.init(params)
    losses = []
    for _ in range(args.steps):
        state, params, loss = optstate_step(state, params)
        untied_state, untied = optax_step(untied_state, untied)
        losses.append(float(loss))
    drift = linen_tie_drift(params)
    params = ost.retie(state, params)  # jit returned two equal arrays: one object again
    p = params["params"]
    return {
        "linen_state": str(state),
        "linen_initial_loss": losses[0],
        "linen_train_loss": losses[-1],
        "linen_tie_drift": drift,
        "linen_one_array_after_retie": p["again"]["kernel"] is p["block"]["kernel"],
        "linen_optax_tie_drift": linen_tie_drift(untied),
    }


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
    """Train both models, print the comparison unless ``--quiet``, return the figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    x, y = load_data()
    figures = {**train_nnx(args, x), **train_linen(args, x, y)}
    figures["seconds"] = time.perf_counter() - start
    if not args.quiet:
        f = figures
        print(
            f"{len(x)} digits, {args.steps} full-batch Adam steps\n\n"
            f"NNX tied autoencoder, {f['nnx_state']}\n"
            f"  loss {f['nnx_initial_loss']:.4f} -> {f['nnx_train_loss']:.4f}; decoder and "
            f"encoder hold one Variable after nnx.update: {f['nnx_shared_after_update']}\n"
            f"  optstate vs optax on the same NNX state: max relative difference "
            f"{f['nnx_max_rel_diff_to_reference']:.1e} (float32 rounding)\n\n"
            f"linen dict tied by hand, {f['linen_state']}\n"
            f"  loss {f['linen_initial_loss']:.4f} -> {f['linen_train_loss']:.4f}\n"
            f"  max |block - again| kernel: optstate {f['linen_tie_drift']:.1f} (one array after "
            f"ost.retie: {f['linen_one_array_after_retie']}), optax per position "
            f"{f['linen_optax_tie_drift']:.1e}\n"
            f"({f['seconds']:.1f} s)"
        )
    return figures


if __name__ == "__main__":
    main()
