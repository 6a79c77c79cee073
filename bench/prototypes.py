"""What keeping a rule's step counters in one array would buy, measured with a stand-in rule
(not part of optstate).

``python bench/prototypes.py`` measures an Adam that keeps the step counters of all its
parameters in one array instead of a 0-d array each (row c of ``run.py``), against ``Adam``
(eager ``update``) and optax (jitted): kernels in the compiled step, the time to compile it, the
step's time, and the largest difference of the results. docs/performance.md says what it found:
the step is faster, the compilation much slower, and the package keeps a counter per parameter.

``--quick`` uses 50 leaves and few rounds (a smoke test: its times say little); ``--leaves N``
sets the number of 32x32 leaves (default 500).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optstate as ost
from optstate.rules.adam import AdamState

LR = 1e-3


@dataclass(frozen=True)
class GroupAdam(ost.Adam):
    """``Adam`` (float32 parameters) with one array of step counters for all its parameters,
    held in the first parameter's state, instead of a 0-d counter per parameter. A stand-in for
    timing: it assumes every parameter has a gradient at every step."""

    def init(self, param: Any) -> AdamState:
        return AdamState(jnp.zeros_like(param), jnp.zeros_like(param), None)

    across = True  # it reads every parameter's counter from the first one's state

    def apply_all(
        self, hypers: Sequence[Any], states: list[Any], params: list[Any], grads: list[Any]
    ) -> tuple[list[Any], list[Any]]:
        del params
        hyper = hypers[0]  # the same hyper-parameters for every parameter of the group
        b1, b2 = (jnp.asarray(b, jnp.float32) for b in hyper["betas"])
        eps, lr = (jnp.asarray(hyper[k], jnp.float32) for k in ("eps", "lr"))
        counts = states[0].count
        counts = (jnp.zeros(len(states), jnp.int32) if counts is None else counts) + 1
        t = counts.astype(jnp.float32)
        scale_mu, scale_nu = lr / (1 - b1**t), 1 / (1 - b2**t)
        new_states, steps = [], []
        for i, (s, g) in enumerate(zip(states, grads, strict=True)):
            mu = b1 * s.mu + (1 - b1) * g
            nu = b2 * s.nu + (1 - b2) * g * g
            steps.append(scale_mu[i] * mu / (jnp.sqrt(nu * scale_nu[i]) + eps))
            new_states.append(AdamState(mu, nu, counts if i == 0 else None))
        return new_states, steps


def median_ms(call: Callable[[], Any], repeats: int, warmup: int) -> float:
    """The median milliseconds of ``call()``, each ended by ``jax.block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def group_counters(leaves: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    model = {
        f"l{i:03d}": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32) for i in range(leaves)
    }
    grads = jax.tree.map(lambda p: 1e-3 * p, model)
    opt = optax.adam(LR)

    @jax.jit
    def optax_step(opt_state: Any, params: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    optax_state = opt.init(model)
    grouped = ost.setup(GroupAdam(LR), model)
    grouped, _ = ost.update(grouped, model, grads)  # its counters' array exists from step 1 on
    states = {"Adam": ost.setup(ost.Adam(LR), model), "group Adam": grouped}
    # One step from the same start (the group Adam's second step is its first with counters).
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(ost.update(states["Adam"], model, grads)[1]),
            jax.tree.leaves(ost.update(ost.setup(GroupAdam(LR), model), model, grads)[1]),
            strict=True,
        )
    )
    programs, compile_s = {}, {}  # the compiled programs alone, without optstate's Python
    for name, state in states.items():
        start = time.perf_counter()
        programs[name] = jax.jit(ost.update).lower(state, model, grads).compile()
        compile_s[name] = time.perf_counter() - start
    optax_program = optax_step.lower(optax_state, model, grads).compile()
    calls: dict[str, Callable[[], Any]] = {}
    for name, state in states.items():
        calls[f"{name}, update"] = lambda s=state: ost.update(s, model, grads)
        calls[f"{name}, program"] = lambda s=state, f=programs[name]: f(s, model, grads)
    calls["optax, program"] = lambda: optax_program(optax_state, model, grads)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(3 + rounds):  # in turn, so that a slow phase of the machine hits all of them
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    kernels = {name: f.as_text().count(" fusion(") for name, f in programs.items()}
    kernels["optax"] = optax_program.as_text().count(" fusion(")
    print(f"update on {leaves} leaves of 32x32 (results differ by {diff:.1e} at most):")
    print(f"   {'':12} {'kernels':>7} {'compile':>9} {'program':>9} {'eager update':>13}")
    for name in (*states, "optax"):
        program = statistics.median(times[f"{name}, program"]) * 1e3
        eager = times.get(f"{name}, update")
        eager_ms = f"{statistics.median(eager) * 1e3:10.2f} ms" if eager else f"{'-':>13}"
        built = f"{compile_s[name]:7.2f} s" if name in compile_s else f"{'-':>9}"
        print(f"   {name:12} {kernels[name]:7d} {built} {program:6.2f} ms {eager_ms}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="50 leaves, 5 rounds: a smoke test, not a measurement"
    )
    parser.add_argument(
        "--leaves", type=int, metavar="N", help="leaves of 32x32 (default 500; 50 with --quick)"
    )
    args = parser.parse_args(argv)
    if args.leaves is not None and args.leaves < 1:
        parser.error(f"--leaves must be at least 1, got {args.leaves}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    """Measure the prototype against ``Adam`` and optax, and print the table."""
    args = parse_args(argv)
    default_leaves, rounds = (50, 5) if args.quick else (500, 41)
    group_counters(args.leaves or default_leaves, rounds)


if __name__ == "__main__":
    main(sys.argv[1:])
