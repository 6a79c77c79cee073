"""A tied-weight autoencoder on handwritten digits: optstate against optax applied per position.

The decoder of a tied autoencoder uses the encoder's weight transposed. With optstate the model
says exactly that, ``{"enc": {"w": W, ...}, "dec": {"w": ost.Transpose(W), ...}}``, and

* ``jax.grad`` returns one partial gradient per position (the encoder's and the decoder's);
* ``ost.update`` sums them into one gradient for ``W``, runs Adam once on it, and puts the one new
  ``W`` back at both positions, so the tie holds after every step.

The script trains four models with the same Adam settings, on scikit-learn's 8x8 digits (shipped
with the package, no download), full batch:

1. **optstate**: the tied model above, one step (``jax.grad`` then ``ost.update``) compiled with
   ``ost.jit``, which returns the tied weight as one array: after every step the decoder's
   ``Transpose`` holds the encoder's array itself (under a plain ``jax.jit`` it would hold an equal
   copy, until ``ost.retie``).
2. **single-W reference**: written by hand with ``W`` held once and the loss using ``W`` and
   ``W.T``, trained with ``optax.adam``. This is the right answer for the tied model; optstate
   reproduces it up to float32 rounding.
3. **optax per position**: the same start as optax sees it, ``W`` and ``W.T`` as two separate
   leaves. Each gets its own Adam state and its own step, so the two copies drift apart: from the
   first step on, this trains an *untied* model, with twice the weights.
4. **untied model**: what that comparison is fair to, an autoencoder with separate encoder and
   decoder weights (the decoder's initialised on its own), trained by ``optax.adam``.

A lower training loss for 3 than for 1 is that of a model with twice the free parameters; 4 shows
what such a model reaches when it is one on purpose. The script saves a figure of the four loss
curves and of the tie's drift (``--figure``, by default docs/images/tied_autoencoder.png).

Run ``python examples/tied_autoencoder.py --help`` for the options; ``main(argv)`` returns the key
figures as a dict (the test suite calls it with few steps).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
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
FIGURE = Path(__file__).resolve().parents[1] / "docs" / "images" / "tied_autoencoder.png"


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


def init_untied(key: jax.Array, n_in: int, n_hidden: int) -> Model:
    """An autoencoder of the same shape with separate weights, the decoder's drawn on its own from
    the distribution of the tied model's weight."""
    k_enc, k_dec = jax.random.split(key)
    return {
        "enc": {
            "w": jax.random.normal(k_enc, (n_in, n_hidden)) * n_in**-0.5,
            "b": jnp.zeros(n_hidden),
        },
        "dec": {"w": jax.random.normal(k_dec, (n_hidden, n_in)) * n_in**-0.5, "b": jnp.zeros(n_in)},
    }


def free_parameters(model: Model) -> int:
    """The numbers a training run may set on its own: a tied weight counts once."""
    return sum(int(np.size(p)) for p in {id(p): p for p in arrays(model)}.values())


def arrays(model: Model) -> list[jax.Array]:
    """The model's arrays; a ``Transpose`` stands for the array it holds."""
    return [
        p.parent if isinstance(p, ost.Transpose) else p
        for p in (model["enc"]["w"], model["enc"]["b"], model["dec"]["w"], model["dec"]["b"])
    ]


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


@ost.jit
def optstate_step(
    state: ost.State, model: Model, x: jax.Array
) -> tuple[ost.State, Model, jax.Array]:
    """One Adam step with optstate: structural gradient in, one update per parameter. Returns the
    loss before the step. ``ost.jit`` (not ``jax.jit``) so that ``W`` enters once and comes back
    as one array at both positions."""
    # One partial gradient per position; grads["dec"]["w"] is a Transpose holding the decoder's
    # part in W's orientation. update sums the two, runs Adam once and writes W to both places.
    loss, grads = jax.value_and_grad(loss_fn)(model, x)
    state, model = ost.update(state, model, grads)
    return state, model, loss


def make_optax_step(opt: optax.GradientTransformation, loss: Loss) -> Callable[..., Any]:
    """One jitted optax step for ``loss``: each leaf of ``params`` is updated on its own. Returns
    the loss before the step."""

    @jax.jit
    def step(opt_state: Any, params: Any, x: jax.Array) -> tuple[Any, Any, jax.Array]:
        value, grads = jax.value_and_grad(loss)(params, x)
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates), value

    return step


@jax.jit
def drift(model: Model) -> jax.Array:
    """``max |enc.w - dec.w.T|``, compiled: what ``tie_drift`` returns, as a 0-d array."""
    return jnp.max(jnp.abs(model["enc"]["w"] - model["dec"]["w"].T))


# -- the script ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="full-batch Adam steps")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the weights")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--figure",
        type=Path,
        default=FIGURE,
        metavar="PATH",
        help="where to save the figure of the losses and the tie's drift (PNG; default "
        "docs/images/tied_autoencoder.png of this checkout)",
    )
    parser.add_argument("--no-figure", action="store_true", help="save no figure")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the four models, save the figure, print the comparison, return the key figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    x_train, x_test = load_data(args.seed)
    key = jax.random.key(args.seed)
    model = init_tied(key, x_train.shape[1], N_HIDDEN)

    # 1. optstate: one Adam state for W, found from the Transpose without annotation.
    state = ost.setup(ost.Adam(args.lr), model)
    opt = optax.adam(args.lr)
    # 2. the single-W reference, optax.adam on W held once.
    ref = single_w(model)
    ref_state = opt.init(ref)
    ref_step = make_optax_step(opt, single_w_loss)
    # 3. optax per position: W and W.T are separate leaves with separate Adam states.
    per_position = untie(model)
    per_position_state = opt.init(per_position)
    per_position_step = make_optax_step(opt, loss_fn)
    # 4. an untied model of the same shape, its decoder's weight drawn on its own, optax.adam.
    untied = init_untied(jax.random.fold_in(key, 1), x_train.shape[1], N_HIDDEN)
    untied_state = opt.init(untied)
    untied_step = make_optax_step(opt, loss_fn)

    evaluate = jax.jit(loss_fn)
    initial_loss = float(evaluate(model, x_train))
    width = len(str(args.steps))

    def report(i: int) -> None:
        tqdm.write(
            f"step {i:>{width}}  train MSE: optstate {evaluate(model, x_train):.5f}, "
            f"optax per position {evaluate(per_position, x_train):.5f}, "
            f"untied {evaluate(untied, x_train):.5f}  "
            f"| optax per position's tie drift {tie_drift(per_position):.1e}"
        )

    print(f"{state}; {len(x_train)} train / {len(x_test)} test digits, {args.steps} Adam steps")
    report(0)
    checkpoints = {round(args.steps * k / 4) for k in range(1, 5)}
    losses: dict[str, list[jax.Array]] = {
        k: [] for k in ("optstate", "reference", "optax", "untied")
    }
    drifts = [drift(per_position)]
    one_array_every_step = True
    for i in tqdm(range(1, args.steps + 1), disable=args.quiet, ncols=80, leave=False):
        state, model, loss = optstate_step(state, model, x_train)
        losses["optstate"].append(loss)
        one_array_every_step &= model["dec"]["w"].parent is model["enc"]["w"]
        ref_state, ref, loss = ref_step(ref_state, ref, x_train)
        losses["reference"].append(loss)
        per_position_state, per_position, loss = per_position_step(
            per_position_state, per_position, x_train
        )
        losses["optax"].append(loss)
        drifts.append(drift(per_position))
        untied_state, untied, loss = untied_step(untied_state, untied, x_train)
        losses["untied"].append(loss)
        if i in checkpoints:
            report(i)

    ref_diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(single_w(model)), jax.tree.leaves(ref), strict=True)
    )
    ref_scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(ref))
    finals = {
        "optstate": evaluate(model, x_train),
        "reference": single_w_loss(ref, x_train),
        "optax": evaluate(per_position, x_train),
        "untied": evaluate(untied, x_train),
    }
    # Each curve: the training loss before every step, then after the last one.
    curves = {k: np.asarray(jnp.stack([*v, finals[k]])).tolist() for k, v in losses.items()}
    figures: dict[str, Any] = {
        "optstate_initial_loss": initial_loss,
        "optstate_train_loss": float(finals["optstate"]),
        "optstate_test_loss": float(evaluate(model, x_test)),
        "optax_train_loss": float(finals["optax"]),
        "optax_test_loss": float(evaluate(per_position, x_test)),
        "reference_train_loss": float(finals["reference"]),
        "reference_test_loss": float(single_w_loss(ref, x_test)),
        "untied_initial_loss": curves["untied"][0],
        "untied_train_loss": float(finals["untied"]),
        "untied_test_loss": float(evaluate(untied, x_test)),
        "tied_parameters": free_parameters(model),
        "optax_parameters": free_parameters(per_position),
        "untied_parameters": free_parameters(untied),
        "optstate_tie_drift": tie_drift(model),
        "optstate_one_array_every_step": one_array_every_step,
        "optax_tie_drift": tie_drift(per_position),
        "max_diff_to_reference": ref_diff,
        "max_rel_diff_to_reference": ref_diff / ref_scale,
        "curves": curves,
        "optax_tie_drift_curve": np.asarray(jnp.stack(drifts)).tolist(),
        "figure": None if args.no_figure else str(args.figure),
        "seconds": time.perf_counter() - start,
    }
    if not args.no_figure:
        plot(figures, args.figure)
    print_summary(figures)
    return figures


def print_summary(f: dict[str, Any]) -> None:
    """The final table, what makes the comparison fair, and the two checks: the tie, and the
    agreement with the reference."""
    rows = [
        ("optstate (tied)", "optstate", "tied", f"{f['optstate_tie_drift']:.1f}"),
        ("single-W reference", "reference", "tied", "- (W held once)"),
        ("optax per position", "optax", "optax", f"{f['optax_tie_drift']:.1e} (the tie is lost)"),
        ("untied model, optax", "untied", "untied", "- (two weights by design)"),
    ]
    print(f"\n{'':<21}{'weights':>8}{'train MSE':>11}{'test MSE':>10}   max|enc.w - dec.w.T|")
    for name, key, count, drift_text in rows:
        print(
            f"{name:<21}{f[count + '_parameters']:>8,}{f[key + '_train_loss']:>11.5f}"
            f"{f[key + '_test_loss']:>10.5f}   {drift_text}"
        )
    lower = "a lower" if f["optax_train_loss"] < f["optstate_train_loss"] else "its"
    print(
        f"\nWhy optax per position reaches {lower} training loss: Adam steps W and W.T as two "
        "arrays, so\nafter the first step the decoder's weight is no longer the encoder's and "
        f"the model has\n{f['optax_parameters']:,} free weights, not {f['tied_parameters']:,}. "
        "It is an untied autoencoder; trained as one from its own\ninitial weights, an untied "
        f"autoencoder of this size reaches {f['untied_train_loss']:.5f} (test "
        f"{f['untied_test_loss']:.5f}).\nThe tied model's fair comparison is the single-W "
        "reference, which optstate matches:"
    )
    print(
        f"max |difference| {f['max_diff_to_reference']:.1e}, relative "
        f"{f['max_rel_diff_to_reference']:.1e} (float32 rounding)."
    )
    kept = "every" if f["optstate_one_array_every_step"] else "NOT every"
    print(
        f"The tie: after {kept} step dec.w holds enc.w's array itself (ost.jit returns a tied "
        f"weight as one\narray; a plain jax.jit returns equal copies, which ost.retie makes one "
        f"again); values equal -> {f['optstate_tie_drift'] == 0.0}."
    )
    if f["figure"] is not None:
        print(f"Figure: {f['figure']}")
    print(f"({f['seconds']:.1f} s)")


def plot(f: dict[str, Any], path: Path) -> None:
    """Two panels: the four training losses by step, and the tie's drift by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = f["curves"]
    steps = np.arange(len(curves["optstate"]))
    fig, (loss_ax, drift_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    styles = [
        ("optstate", f"optstate, tied ({f['tied_parameters']:,} weights)", "tab:blue", "-"),
        ("reference", "single-W reference (optax.adam)", "tab:cyan", "--"),
        ("optax", f"optax per position (tie lost: {f['optax_parameters']:,})", "tab:red", "-"),
        ("untied", f"untied model, optax ({f['untied_parameters']:,})", "tab:gray", ":"),
    ]
    for key, label, colour, line in styles:
        loss_ax.plot(steps, curves[key], line, color=colour, label=label, linewidth=1.5)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("Adam step")
    loss_ax.set_ylabel("training MSE per pixel")
    loss_ax.set_title("Loss: a lower curve with twice the weights", fontsize=10)
    loss_ax.legend(fontsize=8)
    drift_ax.plot(steps, f["optax_tie_drift_curve"], color="tab:red", label="optax per position")
    drift_ax.plot(steps, np.zeros(len(steps)), color="tab:blue", label="optstate (0 at every step)")
    drift_ax.set_xlabel("Adam step")
    drift_ax.set_ylabel("max |enc.w - dec.w.T|")
    drift_ax.set_title("The tie's drift", fontsize=10)
    drift_ax.legend(fontsize=8)
    fig.suptitle("Tied autoencoder on scikit-learn's digits: optstate against optax", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
