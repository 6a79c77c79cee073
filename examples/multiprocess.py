"""Two processes, one mesh: ``jax.distributed`` on localhost, training a tied model with optstate.

``python examples/multiprocess.py`` starts two worker processes of this script on this machine.
They meet at a coordinator on ``127.0.0.1`` (a free port), each contributes its 2 simulated CPU
devices (by default), and together they see one mesh of 4 devices. Each worker then, as on a
real cluster:

* builds the same tied autoencoder (``ost.Transpose`` ties the decoder's weight to the
  encoder's), replicated over the global mesh, and ``ost.setup``;
* feeds only its own half of every global batch
  (``jax.make_array_from_process_local_data``): the batch is sharded along ``"data"``;
* runs the same jitted step (``jax.grad``, then ``ost.update``); XLA adds the gradients of
  both processes' devices (over Gloo, JAX's CPU collectives);
* at the end calls ``ost.retie`` and prints its figures, including a checksum of the weight it
  holds, as one JSON line.

The launcher checks that both workers report the same loss and the same weights and returns the
figures (``main(argv)`` returns them as a dict; ``--json PATH`` also writes them). Each worker has
a time limit (``--timeout``), after which the launcher ends it. On GPUs or TPUs the worker code is
the same; only the coordinator address and ``num_processes`` come from the cluster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULT = "RESULT "  # the prefix of a worker's one line of figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="Adam steps")
    parser.add_argument("--batch", type=int, default=128, help="global batch (all processes)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    parser.add_argument("--processes", type=int, default=2, help="worker processes")
    parser.add_argument("--local-devices", type=int, default=2, help="CPU devices per worker")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per worker")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument("--worker", type=int, metavar="ID", help=argparse.SUPPRESS)
    parser.add_argument("--coordinator", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the launcher ------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: argparse.Namespace) -> dict[str, Any]:
    """Start the workers, wait for them (each within ``--timeout``), and check their figures."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.local_devices}",
        "JAX_PLATFORMS": "cpu",
    }
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
    common += ["--processes", str(args.processes), "--coordinator", coordinator]
    workers = [
        subprocess.Popen(
            [sys.executable, __file__, *common, "--worker", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(args.processes)
    ]
    start = time.perf_counter()
    outputs = []
    try:
        for worker in workers:
            left = max(1.0, args.timeout - (time.perf_counter() - start))
            outputs.append(worker.communicate(timeout=left))
    finally:
        for worker in workers:  # only on a timeout or an error: the workers started here
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    results = []
    for i, (worker, (out, err)) in enumerate(zip(workers, outputs, strict=True)):
        found = [line[line.index(RESULT) :] for line in out.splitlines() if RESULT in line]
        if worker.returncode != 0 or not found:
            raise RuntimeError(f"worker {i} failed (exit {worker.returncode}):\n{out}\n{err}")
        for line in out.splitlines():
            if RESULT not in line and "peer ranks" not in line:  # Gloo reports each connection
                print(f"[worker {i}] {line}")
        results.append(json.loads(found[0].removeprefix(RESULT)))

    first = results[0]
    figures = {
        **{k: first[k] for k in ("processes", "global_devices", "initial_loss", "final_loss")},
        "local_devices": [r["local_devices"] for r in results],
        "same_loss_everywhere": all(r["final_loss"] == first["final_loss"] for r in results),
        "same_weights_everywhere": all(r["checksum"] == first["checksum"] for r in results),
        "tied_after_retie": all(r["tied_after_retie"] for r in results),
        "tie_drift": max(r["tie_drift"] for r in results),
        "moment_specs": first["moment_specs"],
        "seconds": time.perf_counter() - start,
    }
    print(
        f"{figures['processes']} processes x {figures['local_devices']} devices: loss "
        f"{figures['initial_loss']:.5f} -> {figures['final_loss']:.5f}; same loss and weights in "
        f"every process: {figures['same_loss_everywhere'] and figures['same_weights_everywhere']}"
        f"; tie drift {figures['tie_drift']:.1e}, one array after retie: "
        f"{figures['tied_after_retie']} ({figures['seconds']:.1f} s)"
    )
    return figures


# -- a worker ----------------------------------------------------------------------------------


def work(args: argparse.Namespace) -> None:
    """One process of the job: join, train on its half of every batch, print its figures."""
    import jax  # after the launcher has set XLA_FLAGS and JAX_PLATFORMS for this process

    jax.distributed.initialize(
        args.coordinator,
        num_processes=args.processes,
        process_id=args.worker,
        initialization_timeout=int(args.timeout),
    )
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from sklearn.datasets import load_digits

    import optstate as ost

    mesh = Mesh(np.array(jax.devices()), ("data",))  # every process's devices
    replicated, by_row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data", None))
    images = load_digits().data.astype(np.float32) / 16.0
    n_in, n_hidden = images.shape[1], 32

    # Every process builds the same initial values (same seed); device_put places each one on
    # all devices of the global mesh.
    w = np.asarray(jax.random.normal(jax.random.key(0), (n_in, n_hidden))) * n_in**-0.5
    w = jax.device_put(w.astype(np.float32), replicated)
    model = {
        "enc": {"w": w, "b": jax.device_put(np.zeros(n_hidden, np.float32), replicated)},
        "dec": {"w": ost.Transpose(w), "b": jax.device_put(np.zeros(n_in, np.float32), replicated)},
    }
    state = ost.setup(ost.Adam(args.lr), model)

    def loss_fn(model: Any, x: Any) -> Any:
        h = jnp.tanh(x @ model["enc"]["w"] + model["enc"]["b"][None, :])
        y = jax.nn.sigmoid(h @ model["dec"]["w"] + model["dec"]["b"][None, :])
        return jnp.mean((y - x) ** 2)

    @jax.jit
    def train_step(state: Any, model: Any, x: Any) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(model, x)
        return (*ost.update(state, model, grads), loss)

    evaluate = jax.jit(loss_fn)
    rng = np.random.default_rng(0)  # the same global batches in every process
    n_proc, me = jax.process_count(), jax.process_index()
    local = args.batch // n_proc

    def global_batch(rows: Any) -> Any:
        """This process's share of the rows, assembled into one array sharded over "data"."""
        return jax.make_array_from_process_local_data(by_row, rows[me * local : (me + 1) * local])

    whole = images[: len(images) // args.batch * args.batch]
    initial_loss = float(evaluate(model, global_batch(whole)))
    for i in range(1, args.steps + 1):
        rows = images[rng.choice(len(images), args.batch, replace=False)]
        state, model, loss = train_step(state, model, global_batch(rows))
        if me == 0 and (i == 1 or i % max(1, args.steps // 4) == 0):
            print(f"step {i:4d}  batch loss {float(loss):.5f}", flush=True)

    drift = float(jnp.max(jnp.abs(model["enc"]["w"] - model["dec"]["w"].parent)))
    model = ost.retie(state, model)
    local_w = np.asarray(model["enc"]["w"].addressable_data(0))  # this process's copy
    figures = {
        "process": me,
        "processes": n_proc,
        "global_devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "initial_loss": initial_loss,
        "final_loss": float(evaluate(model, global_batch(whole))),
        "tie_drift": drift,
        "tied_after_retie": model["dec"]["w"].parent is model["enc"]["w"],
        "moment_specs": [str(s.mu.sharding.spec) for s in state.states],
        "checksum": float(np.sum(local_w.astype(np.float64) ** 2)),
    }
    print(RESULT + json.dumps(figures), flush=True)
    jax.distributed.shutdown()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Launch the workers and return their checked figures (in a worker: run it, return {})."""
    args = parse_args(argv)
    if args.worker is not None:
        work(args)
        return {}
    if args.batch % args.processes:
        raise SystemExit(f"--batch {args.batch} must be a multiple of {args.processes} processes")
    figures = launch(args)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
