"""A tied-weight autoencoder on handwritten digits: optstate against optax applied per position.

The decoder of a tied autoencoder uses the encoder's weight transposed. With optstate the model
says exactly that, ``{"enc": {"w": W, ...}, "dec": {"w": ost.Transpose(W), ...}}``, and

* ``jax.grad`` returns one partial gradient per position (the encoder's and the decoder's);
* ``ost.update`` sums them into one gradient for ``W``, runs Adam once on it, and puts the one new
  ``W`` back at both positions, so the tie holds after every step.

The script trains three models from the same initial weights with the same Adam settings, on
scikit-learn's 8x8 digits (shipped with the package, no download), full batch:

1. **optstate**: the tied model above, one jitted step (``jax.grad`` then ``ost.update``), and
   ``ost.retie`` at the end so that the decoder's ``Transpose`` again holds the encoder's array.
2. **optax per position**: the same model as optax sees it, ``W`` and ``W.T`` as two separate
   leaves. Each gets its own Adam state and its own step, so the two copies drift apart.
3. **single-W reference**: written by hand with ``W`` held once and the loss using ``W`` and
   ``W.T``, trained with ``optax.adam``. This is the right answer; optstate reproduces it up to
   float32 rounding.

Run ``python examples/tied_autoencoder.py --help`` for the options; ``main(argv)`` returns the key
figures as a dict (the test suite calls it with few steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import optstate as ost

Model = dict[str, Any]
Loss = Callable[[Any, jax.Array], jax.Array]

N_HIDDEN = 32


# -- data and model --------------------------------------------------------------------------


def load_data(seed: int) -> tuple[jax.Array, jax.Array]:
    """The digits as 64 pixel intensities in [0, 1], split 80/20 into train and test."""
    images = load_digits().data.astype(np.float32) / 16.0
    train, test = train_test_split(images, test_size=0.2, random_state=seed)
    return jnp.asarray(train), jnp.asarray(test)


def init_tied(key: jax.Array, n_in: int, n_hidden: int) -> Model:
    """The tied model: the decoder's weight is the encoder's, transposed (one array, no copy)."""
    w = jax.random.normal(key, (n_in, n_hidden)) * n_in**-0.5
    return {
        "enc": {"w": w, "b": jnp.zeros(n_hidden)},
        "dec": {"w": ost.Transpose(w), "b": jnp.zeros(n_in)},
    }


def reconstruct(model: Model, x: jax.Array) -> jax.Array:
    """Encode, decode. ``model["dec"]["w"]`` may be a ``Transpose`` or a plain array."""
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    return jax.nn.sigmoid(h @ model["dec"]["w"] + model["dec"]["b"][None, :])


def loss_fn(model: Model, x: jax.Array) -> jax.Array:
    """Mean squared reconstruction error per pixel."""
    return jnp.mean((reconstruct(model, x) - x) ** 2)


def untie(model: Model) -> Model:
    """What an optimiser that works per leaf sees: ``W`` and a separate array ``W.T``."""
    w = model["enc"]["w"]
    return {"enc": {"w": w, "b": model["enc"]["b"]}, "dec": {"w": w.T, "b": model["dec"]["b"]}}


def single_w(model: Model) -> dict[str, jax.Array]:
    """The hand-written formulation: ``W`` held once, the biases beside it."""
    return {"w": model["enc"]["w"], "b_enc": model["enc"]["b"], "b_dec": model["dec"]["b"]}


def single_w_loss(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """The same loss written with ``W`` and ``W.T``, so autodiff sums the two contributions."""
    w = params["w"]
    model = {"enc": {"w": w, "b": params["b_enc"]}, "dec": {"w": w.T, "b": params["b_dec"]}}
    return loss_fn(model, x)


def tie_drift(model: Model) -> float:
    """``max |enc.w - dec.w.T|``: 0.0 while the tie holds."""
    return float(jnp.max(jnp.abs(model["enc"]["w"] - model["dec"]["w"].T)))


# -- training steps --------------------------------------------------------------------------


@jax.jit
def optstate_step(state: ost.State, model: Model, x: jax.Array) -> tuple[ost.State, Model]:
    """One Adam step with optstate: structural gradient in, one update per parameter."""
    # One partial gradient per position; grads["dec"]["w"] is a Transpose holding the decoder's
    # part in W's orientation. update sums the two, runs Adam once and writes W to both places.
    grads = jax.grad(loss_fn)(model, x)
    return ost.update(state, model, grads)


def make_optax_step(opt: optax.GradientTransformation, loss: Loss) -> Callable[..., Any]:
    """One jitted optax step for ``loss``: each leaf of ``params`` is updated on its own."""

    @jax.jit
    def step(opt_state: Any, params: Any, x: jax.Array) -> tuple[Any, Any]:
        grads = jax.grad(loss)(params, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    return step


# -- the script ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the three models, print the comparison, and return the key figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, x_test = load_data(args.seed)
    model = init_tied(jax.random.key(args.seed), x_train.shape[1], N_HIDDEN)

    # 1. optstate: one Adam state for W, found from the Transpose without annotation.
    state = ost.setup(ost.Adam(args.lr), model)
    # 2. optax per position: W and W.T are separate leaves with separate Adam states.
    opt = optax.adam(args.lr)
    untied = untie(model)
    untied_state = opt.init(untied)
    untied_step = make_optax_step(opt, loss_fn)
    # 3. the single-W reference, also optax.adam.
    ref = single_w(model)
    ref_state = opt.init(ref)
    ref_step = make_optax_step(opt, single_w_loss)

    evaluate = jax.jit(loss_fn)
    initial_loss = float(evaluate(model, x_train))
    width = len(str(args.steps))

    def report(i: int) -> None:
        tqdm.write(
            f"step {i:>{width}}  train MSE: optstate {evaluate(model, x_train):.5f}, "
            f"optax per position {evaluate(untied, x_train):.5f}  "
            f"| optax tie drift {tie_drift(untied):.1e}"
        )

    print(f"{state}; {len(x_train)} train / {len(x_test)} test digits, {args.steps} Adam steps")
    report(0)
    checkpoints = {round(args.steps * k / 4) for k in range(1, 5)}
    for i in tqdm(range(1, args.steps + 1), disable=args.quiet, ncols=80, leave=False):
        state, model = optstate_step(state, model, x_train)
        untied_state, untied = untied_step(untied_state, untied, x_train)
        ref_state, ref = ref_step(ref_state, ref, x_train)
        if i in checkpoints:
            report(i)

    # A jitted step returns a separate array per output position; retie makes them one again.
    one_array_after_jit = model["dec"]["w"].parent is model["enc"]["w"]
    model = ost.retie(state, model)
    ref_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(single_w(model)), jax.tree.leaves(ref), strict=True)
    )
    ref_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref))
    figures: dict[str, Any] = {
        "optstate_initial_loss": initial_loss,
        "optstate_train_loss": float(evaluate(model, x_train)),
        "optstate_test_loss": float(evaluate(model, x_test)),
        "optax_train_loss": float(evaluate(untied, x_train)),
        "optax_test_loss": float(evaluate(untied, x_test)),
        "reference_train_loss": float(single_w_loss(ref, x_train)),
        "reference_test_loss": float(single_w_loss(ref, x_test)),
        "optstate_tie_drift": tie_drift(model),
        "optstate_one_array_after_jit": one_array_after_jit,
        "optstate_one_array_after_retie": model["dec"]["w"].parent is model["enc"]["w"],
        "optax_tie_drift": tie_drift(untied),
        "max_diff_to_reference": ref_diff,
        "max_rel_diff_to_reference": ref_diff / ref_scale,
        "seconds": time.perf_counter() - start,
    }
    print_summary(figures)
    return figures


def print_summary(f: dict[str, Any]) -> None:
    """The final table and the two checks: the tie, and agreement with the reference."""
    rows = [
        ("optstate (tied)", "optstate", f"{f['optstate_tie_drift']:.1f}"),
        ("optax per position", "optax", f"{f['optax_tie_drift']:.1e}  (now an untied model)"),
        ("single-W reference", "reference", "- (W held once)"),
    ]
    print(f"\n{'':<20}{'train MSE':>10}{'test MSE':>10}   max|enc.w - dec.w.T|")
    for name, key, drift in rows:
        print(f"{name:<20}{f[key + '_train_loss']:>10.5f}{f[key + '_test_loss']:>10.5f}   {drift}")
    print(
        f"\noptstate vs single-W reference: max |difference| {f['max_diff_to_reference']:.1e}, "
        f"relative {f['max_rel_diff_to_reference']:.1e} (float32 rounding)"
    )
    print(
        f"tie: dec.w.parent is enc.w -> {f['optstate_one_array_after_jit']} after the jitted "
        f"steps, {f['optstate_one_array_after_retie']} after ost.retie; "
        f"values equal -> {f['optstate_tie_drift'] == 0.0}"
    )
    print(f"({f['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
