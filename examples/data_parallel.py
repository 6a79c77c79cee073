"""Data-parallel training of a tied autoencoder across the devices of a ``jax.sharding.Mesh``.

The model is the tied autoencoder of ``tied_autoencoder.py`` (the decoder's weight is
``ost.Transpose`` of the encoder's) on scikit-learn's 8x8 digits. Each step:

* the batch is sharded along the mesh's ``"data"`` axis: every device holds a slice of it;
* the parameters are replicated (``--model-axis 1``, the default) or, with ``--model-axis 2``,
  the tied weight and the encoder's bias are also split along the hidden units over a ``"model"``
  axis;
* one jitted function computes the structural gradient (``jax.grad``; XLA adds up the devices'
  contributions) and runs ``ost.update``, which sums the tied weight's two partial gradients and
  steps it once. The parameters and the optimiser state keep their shardings from step to step;
  the state is donated, so its buffers are reused in place.

A jitted step returns a separate array for every position of the tie (equal to the last bit);
``ost.retie`` makes them one array again at the end.

When run as a script without ``XLA_FLAGS`` set, it asks XLA for 4 CPU devices (on a machine with
accelerators, ``jax.devices()`` are those instead). ``main(argv)`` returns the key figures as a
dict; ``--json PATH`` also writes them.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # before JAX is imported: simulate 4 devices on a CPU-only machine
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse
import functools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from sklearn.datasets import load_digits

import optstate as ost

Model = dict[str, Any]
N_HIDDEN = 32


def make_mesh(model_axis: int) -> Mesh:
    """All devices as a ``("data", "model")`` mesh with ``model_axis`` devices along "model"."""
    devices = np.array(jax.devices())
    if devices.size % model_axis:
        raise ValueError(f"--model-axis {model_axis} does not divide {devices.size} devices")
    return Mesh(devices.reshape(-1, model_axis), ("data", "model"))


def init_model(key: jax.Array, mesh: Mesh, n_in: int, n_hidden: int) -> Model:
    """The tied autoencoder, placed on the mesh: the weight split along its hidden units over
    "model" (replicated when that axis has one device), the output bias replicated."""
    w = jax.random.normal(key, (n_in, n_hidden)) * n_in**-0.5
    w = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    b_enc = jax.device_put(jnp.zeros(n_hidden), NamedSharding(mesh, P("model")))
    b_dec = jax.device_put(jnp.zeros(n_in), NamedSharding(mesh, P()))
    return {"enc": {"w": w, "b": b_enc}, "dec": {"w": ost.Transpose(w), "b": b_dec}}


def loss_fn(model: Model, x: jax.Array) -> jax.Array:
    """Mean squared reconstruction error per pixel."""
    h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
    y = jax.nn.sigmoid(h @ model["dec"]["w"] + model["dec"]["b"][None, :])
    return jnp.mean((y - x) ** 2)


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: ost.State, model: Model, x: jax.Array) -> tuple[ost.State, Model, jax.Array]:
    """One Adam step on the sharded batch ``x``: gradient, then ``ost.update``, one program."""
    loss, grads = jax.value_and_grad(loss_fn)(model, x)
    state, model = ost.update(state, model, grads)
    return state, model, loss


Placement = list[tuple[Any, int]]


def placement(tree: Any) -> Placement:
    """The sharding and rank of every array in ``tree``, in leaf order."""
    return [(x.sharding, x.ndim) for x in jax.tree.leaves(tree)]


def kept(before: Placement, after: Placement) -> bool:
    """Every array is laid out over the devices as it was."""
    return all(a.is_equivalent_to(b, ndim) for (a, ndim), (b, _) in zip(before, after, strict=True))


def moments(state: ost.State) -> list[Any]:
    """Adam's first and second moments of every parameter."""
    return [s.mu for s in state.states] + [s.nu for s in state.states]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="Adam steps")
    parser.add_argument("--batch", type=int, default=256, help="global batch (all devices)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--model-axis", type=int, default=1, help="devices along 'model'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print only the summary")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train data-parallel, print the loss and the tie, and return the key figures."""
    args = parse_args(argv)
    start = time.perf_counter()
    mesh = make_mesh(args.model_axis)
    n_data = mesh.shape["data"]
    if args.batch % n_data:
        raise SystemExit(f"--batch {args.batch} must be a multiple of the {n_data} data shards")
    images = load_digits().data.astype(np.float32) / 16.0
    rng = np.random.default_rng(args.seed)
    batch_sharding = NamedSharding(mesh, P("data", None))

    model = init_model(jax.random.key(args.seed), mesh, images.shape[1], N_HIDDEN)
    state = ost.setup(ost.Adam(args.lr), model)  # mu and nu get each parameter's sharding
    params_at_start, moments_at_start = placement(model), placement(moments(state))
    usable = len(images) // n_data * n_data  # every data shard holds as many rows
    everything = jax.device_put(images[:usable], batch_sharding)  # for the full-data loss
    evaluate = jax.jit(loss_fn)
    initial_loss = float(evaluate(model, everything))

    print(
        f"{len(jax.devices())} {jax.default_backend()} devices, mesh {dict(mesh.shape)}; "
        f"{state}; global batch {args.batch} ({args.batch // n_data} per data shard)"
    )
    losses = []
    report_every = max(1, args.steps // 5)
    for i in range(1, args.steps + 1):
        batch = images[rng.choice(len(images), args.batch, replace=False)]
        x = jax.device_put(batch, batch_sharding)
        state, model, loss = train_step(state, model, x)
        losses.append(float(loss))
        if not args.quiet and (i % report_every == 0 or i == 1):
            drift = float(jnp.max(jnp.abs(model["enc"]["w"] - model["dec"]["w"].parent)))
            print(f"step {i:4d}  batch loss {losses[-1]:.5f}  tie drift {drift:.1e}")

    drift = float(jnp.max(jnp.abs(model["enc"]["w"] - model["dec"]["w"].parent)))
    model = ost.retie(state, model)  # one array at both positions again
    tied = model["dec"]["w"].parent is model["enc"]["w"]
    final_loss = float(evaluate(model, everything))
    figures: dict[str, Any] = {
        "devices": len(jax.devices()),
        "mesh": dict(mesh.shape),
        "steps": args.steps,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "first_batch_loss": losses[0],
        "last_batch_loss": losses[-1],
        "tie_drift": drift,
        "tied_after_retie": tied,
        "param_shardings_kept": kept(params_at_start, placement(model)),
        "moment_shardings_kept": kept(moments_at_start, placement(moments(state))),
        "moment_specs": [str(x.sharding.spec) for x in moments(state)],
        "weight_spec": str(model["enc"]["w"].sharding.spec),
        "seconds": time.perf_counter() - start,
    }
    print(
        f"full-data loss {initial_loss:.5f} -> {final_loss:.5f} in {args.steps} steps; "
        f"tie drift {drift:.1e}, one array after retie: {tied}; weight sharding "
        f"{figures['weight_spec']}, kept: {figures['param_shardings_kept']}, optimiser moments "
        f"kept theirs: {figures['moment_shardings_kept']} ({figures['seconds']:.1f} s)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
