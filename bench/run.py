"""optstate against optax on this machine: one command, one run, ratios with targets.

``python bench/run.py`` measures, in one process and one run:

a. an Adam step under ``jax.jit`` on a large untied model (3 x 8M float32), optstate / optax;
b. a model with half its parameters tied at two positions: step time and state bytes,
   optstate / optax on the same tree;
c. eager ``update`` (no user ``jit``) on 500 small leaves, against optax jitted and optax eager;
d. ``setup`` on 10,000 leaves against ``optax.adam(...).init``;
e. the step's effective memory bandwidth (the bytes Adam must read and write, over its time)
   as a fraction of a streaming copy measured in the same run;
f. a whole train step (loss, ``jax.grad``, Adam) of a model whose embedding is tied to its output
   layer, transposed: optstate under ``optstate.jit`` with state and model donated against optax
   under ``jax.jit`` with its state donated, in time per step and in live bytes after 5 steps;
   also optstate under a plain ``jax.jit`` (state donated: a tied model cannot be).

Every time is the median of repeated single steps, each ended by ``jax.block_until_ready``, after
warm-up steps that also compile. optstate's and optax's steps alternate, so a slow phase of the
machine hits both; the ``spread`` column gives the quartiles of the round-by-round ratios. The
targets are checked here, never by timed assertions in the tests.

``--quick`` uses small sizes (a smoke test: its ratios say little). What a run writes besides the
printed table:

* ``--json PATH``: every figure, with the date, the machine, the versions and the leaf shapes;
* ``--markdown PATH``: the table as markdown, headed by the date, machine and versions, with each
  row's leaf shapes. If PATH holds the markers ``<!-- bench:begin -->`` and
  ``<!-- bench:end -->``, only the text between them is replaced (docs/performance.md includes the
  table that way); otherwise PATH is written whole;
* ``--figure PATH``: a bar chart (PNG) of the ratios against their targets.

``--from-json PATH`` measures nothing: it reads the figures a run stored with ``--json`` and writes
the markdown and the figure from them. docs/performance.md shows the table and the chart of the
run stored in docs/bench.json, and explains each ratio; a test checks that its table is what
``markdown`` makes of that JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optstate as ost

LR = 1e-3
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"  # the table's place in a markdown page
# The bytes per float32 element an Adam step cannot avoid: read p, g, mu, nu; write p, mu, nu.
ADAM_BYTES = 7 * 4
# What XLA's CPU code moves: mu and nu are two kernels whose results the parameter's kernel
# reads back (mu: g, mu -> mu; nu: g, nu -> nu; p: p, mu, nu -> p), 7 reads and 3 writes.
XLA_ADAM_BYTES = 10 * 4

Step = Callable[[Any], Any]  # carry -> next carry


@dataclass(frozen=True)
class Sizes:
    """The problem sizes of one run."""

    large_leaves: int = 3  # a, e: leaves of the large untied model
    large_leaf: int = 8 * 2**20  # a, e: float32 elements per leaf (8M: 32 MB)
    tied_side: int = 2048  # b: each of the 4 unique parameters is tied_side x tied_side
    small_leaves: int = 500  # c: leaves of the small model
    small_shape: tuple[int, ...] = (32, 32)  # c
    tiny_shape: tuple[int, ...] = (4, 4)  # c'': the same count of leaves, all overhead
    setup_leaves: int = 10_000  # d
    setup_shape: tuple[int, ...] = (16,)  # d
    step_repeats: int = 21  # a, b, e: timed rounds
    small_repeats: int = 41  # c
    setup_repeats: int = 7  # d
    vocab: int = 8192  # f: the tied embedding is vocab x embed_dim float32
    embed_dim: int = 256  # f
    tokens: int = 16  # f: tokens per batch (few: a step of the optimiser, more than of matmuls)
    memory_steps: int = 5  # f: steps before live bytes are counted


QUICK = Sizes(
    large_leaf=2**16,
    tied_side=128,
    small_leaves=50,
    setup_leaves=300,
    step_repeats=3,
    small_repeats=3,
    setup_repeats=1,
    vocab=512,
    embed_dim=32,
)


@dataclass
class Row:
    """One line of the table: optstate's figure, the reference's, their ratio and the target."""

    key: str
    what: str
    optstate: float
    reference: float
    unit: str
    shapes: str  # the leaf shapes measured, as "3 x (8388608,) float32"
    target: float | None = None  # the ratio passes at or below it; None: reported, not judged
    spread: tuple[float, float] | None = None  # quartiles of the round-by-round ratios
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.optstate / self.reference

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.ratio <= self.target else "MISS"


# -- timing ----------------------------------------------------------------------------------


def alternate(
    steps: dict[str, tuple[Step, Any]], repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """The seconds of every timed call for each named ``(step, carry)``, the steps run in turn.

    Each step takes its carry and returns the next (so a donated buffer is never used again);
    each timed call ends with ``jax.block_until_ready`` on its result.
    """
    carries = {name: carry for name, (_, carry) in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, (step, _) in steps.items():
            start = time.perf_counter()
            carries[name] = jax.block_until_ready(step(carries[name]))
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) * 1e3


def spread(mine: Sequence[float], theirs: Sequence[float]) -> tuple[float, float]:
    """The quartiles of the round-by-round ratios: how far the ratio moves between rounds."""
    ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    if len(ratios) < 4:
        return ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def compare(
    key: str,
    what: str,
    shapes: str,
    times: dict[str, list[float]],
    reference: str,
    target: float | None,
    **notes: Any,
) -> Row:
    """A row of step times: ``times["optstate"]`` against ``times[reference]``."""
    mine, theirs = times["optstate"], times[reference]
    return Row(
        key,
        what,
        median_ms(mine),
        median_ms(theirs),
        "ms",
        shapes,
        target,
        spread(mine, theirs),
        notes,
    )


def leaves(count: int, shape: tuple[int, ...], dtype: str = "float32") -> str:
    """``count`` leaves of ``shape``, as the table shows them: ``"500 x (32, 32) float32"``."""
    return f"{count:,} x {shape} {dtype}"


# -- models ----------------------------------------------------------------------------------


def nbytes(tree: Any) -> int:
    """The bytes of every array in ``tree``."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


def optax_step(opt: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``(opt_state, params, grads) -> (opt_state, params)``: optax's update, applied."""

    def step(opt_state: Any, params: Any, grads: Any) -> tuple[Any, Any]:
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    return step


def copies(tree: Any) -> Any:
    """Every leaf copied: a tied array becomes separate equal arrays (optax's view of a tie)."""
    return jax.tree.map(jnp.copy, tree)


def normal_tree(key: jax.Array, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    """Standard normal float32 arrays of the given shapes."""
    keys = jax.random.split(key, len(shapes))
    return {
        name: jax.random.normal(k, shape, jnp.float32)
        for k, (name, shape) in zip(keys, shapes.items(), strict=True)
    }


# -- a, e: the large untied model -------------------------------------------------------------


def bench_large(sizes: Sizes) -> list[Row]:
    """a: a jitted Adam step on the large untied model, donated (the target) and not."""
    shapes = {f"w{i}": (sizes.large_leaf,) for i in range(sizes.large_leaves)}
    model = normal_tree(jax.random.key(0), shapes)
    grads = jax.tree.map(lambda p: 1e-3 * p, model)
    opt = optax.adam(LR)
    rows = []
    for donate in (True, False):
        argnums = (0, 1) if donate else ()
        ost_jit = jax.jit(ost.update, donate_argnums=argnums)
        optax_jit = jax.jit(optax_step(opt), donate_argnums=argnums)
        ost_model, optax_model = copies(model), copies(model)
        steps = {
            "optstate": (
                lambda c, f=ost_jit: f(*c, grads),
                (ost.setup(ost.Adam(LR), ost_model), ost_model),
            ),
            "optax": (lambda c, f=optax_jit: f(*c, grads), (opt.init(optax_model), optax_model)),
        }
        del ost_model, optax_model  # the carries hold them; donation must not meet a reference
        times = alternate(steps, sizes.step_repeats)
        del steps
        gc.collect()
        size = f"{sizes.large_leaves} x {_count(sizes.large_leaf)} float32"
        rows.append(
            compare(
                "a" if donate else "a'",
                f"Adam step, jax.jit, {size}, "
                + ("state and params donated" if donate else "no donation"),
                leaves(sizes.large_leaves, (sizes.large_leaf,)),
                times,
                "optax",
                1.0 if donate else None,
            )
        )
    return rows


def bench_bandwidth(sizes: Sizes, adam: Row) -> Row:
    """e: Adam's bytes over its step time, against the best streaming copy of as many bytes."""
    n = sizes.large_leaves * sizes.large_leaf
    # A streaming copy reads every byte once and writes it once: XLA in place (donated) and, on
    # a CPU, NumPy's copyto between two preallocated buffers. The faster one is the limit.
    x = jnp.zeros((n,), jnp.float32)
    bump = jax.jit(lambda a: a + 1.0, donate_argnums=0)
    copy_seconds = {"xla_in_place": alternate({"copy": (bump, x)}, sizes.step_repeats)["copy"]}
    del x
    if jax.default_backend() == "cpu":
        src, dst = np.ones(n, np.float32), np.empty(n, np.float32)

        def host_copy(carry: Any) -> Any:
            np.copyto(dst, src)
            return carry

        copy_seconds["numpy_copyto"] = alternate({"copy": (host_copy, None)}, sizes.step_repeats)[
            "copy"
        ]
        del src, dst
    limits = {f"{k}_GBps": 2 * 4 * n / statistics.median(t) / 1e9 for k, t in copy_seconds.items()}
    limit = max(limits.values())
    step_seconds = adam.optstate / 1e3
    return Row(
        "e",
        f"Adam step's bandwidth ({ADAM_BYTES} B/element) / streaming copy, from row a",
        ADAM_BYTES * n / step_seconds / 1e9,
        limit,
        "GB/s",
        adam.shapes,
        notes={
            **limits,
            "optax_GBps": ADAM_BYTES * n / (adam.reference / 1e3) / 1e9,
            "xla_traffic_GBps": XLA_ADAM_BYTES * n / step_seconds / 1e9,
            "xla_traffic_fraction": XLA_ADAM_BYTES * n / step_seconds / 1e9 / limit,
        },
    )


# -- b: half the parameters tied --------------------------------------------------------------


def tied_model(sizes: Sizes) -> tuple[dict[str, Any], dict[str, Any]]:
    """Four unique square parameters, two of them also at a second position (one as the same
    array, one as a ``Transpose``): half the parameters tied, six positions; and a gradient."""
    side = (sizes.tied_side, sizes.tied_side)
    p = normal_tree(jax.random.key(1), {k: side for k in ("t1", "t2", "u1", "u2")})
    model = {
        "embed": p["t1"],
        "unembed": p["t1"],
        "enc": p["t2"],
        "dec": ost.Transpose(p["t2"]),
        "u1": p["u1"],
        "u2": p["u2"],
    }
    g = normal_tree(jax.random.key(2), {k: side for k in model})
    grads = {**g, "dec": ost.Transpose(g["dec"])}  # what jax.grad gives at a Transpose
    return model, grads


def retied_copy(model: dict[str, Any]) -> dict[str, Any]:
    """A fresh copy of the tied model with its ties: one new array per unique parameter."""
    t1, t2, u1, u2 = (jnp.copy(model[k]) for k in ("embed", "enc", "u1", "u2"))
    return {"embed": t1, "unembed": t1, "enc": t2, "dec": ost.Transpose(t2), "u1": u1, "u2": u2}


def bench_tied(sizes: Sizes) -> list[Row]:
    """b: the half-tied model, optstate's donated ``update`` against optax jitted and donated."""
    model, grads = tied_model(sizes)
    opt = optax.adam(LR)
    state_bytes = nbytes(ost.setup(ost.Adam(LR), model)), nbytes(opt.init(model))
    # XLA refuses to donate one buffer twice, and optax's first step unties the weight anyway:
    # optax starts from separate copies. update(..., donate=True) donates each tied weight's one
    # buffer once and returns the tie as one object.
    optax_jit = jax.jit(optax_step(opt), donate_argnums=(0, 1))
    ost_model = retied_copy(model)
    steps = {
        "optstate": (
            lambda c: ost.update(*c, grads, donate=True),
            (ost.setup(ost.Adam(LR), ost_model), ost_model),
        ),
        "optax": (lambda c: optax_jit(*c, grads), (opt.init(model), copies(model))),
    }
    del ost_model
    times = alternate(steps, sizes.step_repeats)
    unique = f"4 x {_count(sizes.tied_side**2)}"
    shapes = f"{leaves(4, (sizes.tied_side, sizes.tied_side))} at 6 positions"
    return [
        compare(
            "b",
            f"half tied ({unique} unique, 6 positions): Adam step, donated",
            shapes,
            times,
            "optax",
            0.8,
        ),
        Row(
            "b'",
            "half tied: optimiser state bytes (every array of the state)",
            state_bytes[0] / 2**20,
            state_bytes[1] / 2**20,
            "MiB",
            shapes,
            0.67,
            notes={"optstate_bytes": state_bytes[0], "optax_bytes": state_bytes[1]},
        ),
    ]


# -- c: eager update on small leaves ----------------------------------------------------------


def bench_eager(sizes: Sizes) -> list[Row]:
    """c: ``ost.update`` called eagerly against optax jitted and optax eager."""
    rows = []
    opt = optax.adam(LR)
    eager = optax_step(opt)
    jitted = jax.jit(eager)
    user_jit = jax.jit(ost.update)
    for key, shape in (("c", sizes.small_shape), ("c''", sizes.tiny_shape)):
        shapes = {f"layer{i:03d}": shape for i in range(sizes.small_leaves)}
        model = normal_tree(jax.random.key(3), shapes)
        grads = jax.tree.map(lambda p: 1e-3 * p, model)
        state = ost.setup(ost.Adam(LR), model)
        steps = {
            "optstate": (lambda c, g=grads: ost.update(*c, g), (state, model)),
            "optax_jit": (lambda c, g=grads: jitted(*c, g), (opt.init(model), model)),
            "optstate_user_jit": (lambda c, g=grads: user_jit(*c, g), (state, model)),
        }
        times = alternate(steps, sizes.small_repeats)
        what = f"eager update, {sizes.small_leaves} leaves of {'x'.join(map(str, shape))}"
        notes = {"optstate_under_user_jit_ms": median_ms(times["optstate_user_jit"])}
        target = 1.5 if key == "c" else None
        shapes = leaves(sizes.small_leaves, shape)
        rows.append(
            compare(key, f"{what} / optax jitted", shapes, times, "optax_jit", target, **notes)
        )
        if key == "c":
            slow = alternate(
                {"optax_eager": (lambda c, g=grads: eager(*c, g), (opt.init(model), model))},
                max(3, sizes.small_repeats // 8),
                warmup=1,
            )
            rows.append(
                Row(
                    "c'",
                    f"{what} / optax eager",
                    median_ms(times["optstate"]),
                    median_ms(slow["optax_eager"]),
                    "ms",
                    shapes,
                )
            )
    return rows


# -- d: setup on many leaves ------------------------------------------------------------------


def bench_setup(sizes: Sizes) -> list[Row]:
    """d: ``ost.setup`` against ``optax.adam(...).init`` on one many-leaf model; d': the first
    call in the process, where optstate also compiles the ``init`` it creates states with."""
    model = {
        f"p{i:05d}": jnp.full(sizes.setup_shape, i, jnp.float32) for i in range(sizes.setup_leaves)
    }
    rule, opt = ost.Adam(LR), optax.adam(LR)
    steps = {
        "optstate": (lambda m: (ost.setup(rule, m), m)[1], model),
        "optax": (lambda m: (opt.init(m), m)[1], model),
    }
    first = alternate(steps, repeats=1, warmup=0)
    times = alternate(steps, sizes.setup_repeats, warmup=0)
    many = f"{_count(sizes.setup_leaves)} leaves of {'x'.join(map(str, sizes.setup_shape))}"
    shapes = leaves(sizes.setup_leaves, sizes.setup_shape)
    return [
        compare("d", f"setup, {many} / optax.adam init", shapes, times, "optax", 0.25),
        compare(
            "d'",
            "setup, the first call in the process (compiles init)",
            shapes,
            first,
            "optax",
            None,
        ),
    ]


# -- f: a whole train step of a tied-embedding model -------------------------------------------


def lm_loss(model: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Next-token cross entropy of a one-layer model whose output layer is its embedding read
    transposed (``model["unembed"]``: a ``Transpose`` for optstate, a copy for optax)."""
    tokens, targets = batch
    h = jnp.tanh(model["embed"][tokens] @ model["dense"]["w"] + model["dense"]["b"])
    logits = h @ model["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def live_bytes() -> int:
    """The bytes of every live JAX array of the process."""
    return sum(int(x.nbytes) for x in jax.live_arrays())


def bench_train_step(sizes: Sizes) -> list[Row]:
    """f: the tied-embedding train step; optstate.jit (state and model donated), plain jax.jit
    with optstate (the state donated: a tied model cannot be), optax under jax.jit (its state
    donated)."""
    v, d = sizes.vocab, sizes.embed_dim
    p = normal_tree(jax.random.key(5), {"embed": (v, d), "w": (d, d)})
    keys = jax.random.split(jax.random.key(6), 2)
    batch = (
        jax.random.randint(keys[0], (sizes.tokens,), 0, v),
        jax.random.randint(keys[1], (sizes.tokens,), 0, v),
    )
    opt = optax.adam(LR)

    def ost_step(state: Any, model: Any, batch: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(lm_loss)(model, batch)
        state, model = ost.update(state, model, grads)
        return state, model, loss

    def optax_step_(opt_state: Any, params: Any, batch: Any) -> tuple[Any, Any, Any]:
        loss, grads = jax.value_and_grad(lm_loss)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates), loss

    def dense() -> dict[str, Any]:
        return {"w": jnp.copy(p["w"]), "b": jnp.zeros((d,), jnp.float32)}

    def tied() -> tuple[Any, Any]:
        e = jnp.copy(p["embed"])
        model = {"embed": e, "dense": dense(), "unembed": ost.Transpose(e)}
        return ost.setup(ost.Adam(LR), model), model

    def untied() -> tuple[Any, Any]:  # optax's view of the tie: a separate, transposed copy
        params = {"embed": jnp.copy(p["embed"]), "dense": dense(), "unembed": p["embed"].T}
        return opt.init(params), params

    sides: dict[str, tuple[Callable[..., Any], Callable[[], tuple[Any, Any]]]] = {
        "optstate": (ost.jit(ost_step, donate_argnums=(0, 1)), tied),
        "plain_jit": (jax.jit(ost_step, donate_argnums=0), tied),
        "optax": (jax.jit(optax_step_, donate_argnums=0), untied),
    }

    # Live bytes: each side alone, after its steps, less what was live before it started.
    gc.collect()
    memory = {}
    for name, (step, start) in sides.items():
        before = live_bytes()
        carry = start()
        for _ in range(sizes.memory_steps):
            carry = jax.block_until_ready(step(*carry, batch)[:2])
        gc.collect()
        memory[name] = live_bytes() - before
        del carry
        gc.collect()

    # Time per step: the three in turn, round after round.
    steps = {
        name: (lambda c, f=step: f(*c[:2], batch), start()) for name, (step, start) in sides.items()
    }
    times = alternate(steps, sizes.step_repeats)
    del steps
    gc.collect()
    size = f"tied {_count(v)} x {d} embedding"
    shapes = f"({v}, {d}), ({d}, {d}), ({d},) float32; {sizes.tokens} tokens"
    notes = {f"{name}_live_bytes": b for name, b in memory.items()}
    plain = {"optstate": times["plain_jit"], "optax": times["optax"]}
    return [
        compare(
            "f",
            f"{size}: train step, ost.jit donated / optax jax.jit",
            shapes,
            times,
            "optax",
            0.9,
        ),
        Row(
            "f'",
            f"{size}: live bytes after {sizes.memory_steps} steps, ost.jit / optax",
            memory["optstate"] / 2**20,
            memory["optax"] / 2**20,
            "MiB",
            shapes,
            0.55,
            notes=notes,
        ),
        compare("f''", f"{size}: train step, plain jax.jit / optax", shapes, plain, "optax", None),
        Row(
            "f'''",
            f"{size}: live bytes, plain jax.jit / optax",
            memory["plain_jit"] / 2**20,
            memory["optax"] / 2**20,
            "MiB",
            shapes,
            notes=notes,
        ),
    ]


# -- the report -------------------------------------------------------------------------------


def version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"-"`` (torch is not needed here)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine() -> dict[str, Any]:
    """What the figures were measured on: the CPU as /proc/cpuinfo names it, the cores, the
    backend and the versions."""
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": version("jaxlib"),
        "numpy": np.__version__,
        "optax": optax.__version__,
        "torch": version("torch"),
    }


def table(rows: Sequence[Row]) -> str:
    """The rows as a fixed-width text table."""
    head = (
        f"{'':3} {'measure':68} {'optstate':>9} {'reference':>9} {'unit':>4} {'ratio':>6} "
        f"{'spread':>11} {'target':>7}  result"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        target = "-" if r.target is None else f"<= {r.target:g}"
        quartiles = "-" if r.spread is None else f"{r.spread[0]:.2f}-{r.spread[1]:.2f}"
        lines.append(
            f"{r.key:3} {r.what:68} {r.optstate:9.4g} {r.reference:9.4g} {r.unit:>4} "
            f"{r.ratio:6.3f} {quartiles:>11} {target:>7}  {r.verdict}"
        )
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(figures: dict[str, Any]) -> str:
    """The table of a run as markdown, from the figures ``main`` returns (and ``--json`` stores):
    a paragraph with the date, the machine and the versions, then one row per measure with its
    leaf shapes. A function of the stored figures alone, so that a page's table can be checked
    against them."""
    m = figures["machine"]
    quick = " --quick" if figures["quick"] else ""
    only = "" if figures["only"] == "abcdef" else f" --only {figures['only']}"
    head = (
        f"Measured {figures['date']} by `python bench/run.py{quick}{only}` in "
        f"{figures['seconds']:.0f} s, on {m['nproc']} cores of {m['cpu']} (as `/proc/cpuinfo` "
        f"names it; jax's {m['backend']} backend, {m['devices']} device(s)), with Python "
        f"{m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, numpy {m['numpy']}, optax "
        f"{m['optax']} and torch {m['torch']}. Times are medians; `ratio` is optstate's figure "
        "over the reference's; `spread` gives the quartiles of the round-by-round ratios."
    )
    if figures["quick"]:
        head += " Quick sizes: too small for the targets; a smoke test, not a measurement."
    lines = [
        head,
        "",
        "| row | measure | leaf shapes | optstate | reference | unit | ratio | spread | target "
        "| result |",
        "|---|---|---|---:|---:|---|---:|---|---|---|",
    ]
    for r in figures["rows"]:
        target = "-" if r["target"] is None else f"<= {r['target']:g}"
        quartiles = "-" if r["spread"] is None else f"{r['spread'][0]:.2f}-{r['spread'][1]:.2f}"
        cells = [
            r["key"],
            _cell(r["what"]),
            _cell(r["shapes"]),
            f"{r['optstate']:.4g}",
            f"{r['reference']:.4g}",
            r["unit"],
            f"{r['ratio']:.3f}",
            quartiles,
            target,
            r["result"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, table: str) -> None:
    """Write ``table`` to ``path``: between its markers if it has them, else as the whole file."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text or END in text:
        start, end = text.find(BEGIN), text.find(END)
        if text.count(BEGIN) != 1 or text.count(END) != 1 or end < start:
            raise ValueError(
                f"{path} must hold one {BEGIN} and, after it, one {END}; it holds "
                f"{text.count(BEGIN)} and {text.count(END)}"
                + (", the end marker first" if 0 <= end < start else "")
            )
        text = text[: start + len(BEGIN)] + "\n" + table + text[end:]
    else:
        text = table
    path.write_text(text)


def between_markers(text: str) -> str:
    """The text ``write_markdown`` put between the markers of a page."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {BEGIN} ... {END} in the text")
    return text[start + len(BEGIN) + 1 : end]


def bar_chart(figures: dict[str, Any], path: Path) -> None:
    """A PNG of a run's ratios (from the figures ``main`` returns), one bar per row, each with its
    target: green where the ratio meets it, red where it misses, grey where there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = figures["rows"]
    colours = {"PASS": "tab:green", "MISS": "tab:red", "info": "tab:gray"}
    fig, ax = plt.subplots(figsize=(10, 0.4 * len(rows) + 1.5), dpi=100)
    y = np.arange(len(rows))[::-1]
    ratios = [r["ratio"] for r in rows]
    ax.barh(y, ratios, color=[colours[r["result"]] for r in rows], height=0.6)
    for yi, r in zip(y, rows, strict=True):
        right_of = max(r["ratio"], r["target"] or 0.0)  # beside the bar and its target's tick
        ax.text(right_of, yi, f"  {r['ratio']:.3f}", va="center", fontsize=8)
        if r["target"] is not None:
            ax.plot([r["target"]] * 2, [yi - 0.42, yi + 0.42], color="black", linewidth=2.5)
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    ax.set_yticks(y, [f"{r['key']:4} {r['what']}" for r in rows], fontsize=7)
    right = max(ratios + [r["target"] for r in rows if r["target"] is not None])
    ax.set_xlim(0, 1.15 * right)
    ax.set_xlabel("optstate / reference: time or bytes (lower is better); e: bandwidth / a copy's")
    m = figures["machine"]
    fig.suptitle(
        f"bench/run.py{' --quick' if figures['quick'] else ''}, {figures['date']}: "
        f"{m['nproc']} x {m['cpu']}, jax {m['jax']}, optax {m['optax']}\n"
        "green: meets its target (black tick), red: misses it, grey: no target; dotted: parity",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _count(n: int) -> str:
    for size, suffix in ((2**20, "M"), (2**10, "K")):
        if n >= size and n % size == 0:
            return f"{n // size}{suffix}"
    return f"{n:,}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures here")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="PATH",
        help=f"also write the table as markdown (between {BEGIN} and {END} if PATH has them)",
    )
    parser.add_argument(
        "--figure", type=Path, metavar="PATH", help="also draw the ratios as a bar chart (PNG)"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        metavar="PATH",
        help="measure nothing: write --markdown and --figure from the figures --json stored",
    )
    parser.add_argument(
        "--only",
        metavar="GROUPS",
        default="abcdef",
        help="the groups of rows to measure, as letters (default abcdef; e comes with a)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure (or read ``--from-json``), write what the options ask for, return the figures."""
    args = parse_args(argv)
    if args.from_json is not None:
        figures: dict[str, Any] = json.loads(args.from_json.read_text())
    else:
        figures = measure(args)
    if args.json is not None and args.json != args.from_json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    if args.markdown is not None:
        write_markdown(args.markdown, markdown(figures))
    if args.figure is not None:
        bar_chart(figures, args.figure)
    return figures


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurements the arguments ask for, print the table, and return the figures."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sizes = QUICK if args.quick else Sizes()
    info = machine()
    print(
        f"optstate bench{' --quick (sizes too small for the targets)' if args.quick else ''}: "
        f"{info['nproc']} x {info['cpu']}, {info['backend']} ({info['devices']} device(s)), "
        f"jax {info['jax']}, optax {info['optax']}",
        flush=True,
    )
    start = time.perf_counter()
    rows: list[Row] = []
    if "a" in args.only or "e" in args.only:
        rows += bench_large(sizes)
        rows.append(bench_bandwidth(sizes, rows[0]))
    groups: list[tuple[str, Callable[[Sizes], list[Row]]]] = [
        ("b", bench_tied),
        ("c", bench_eager),
        ("d", bench_setup),
        ("f", bench_train_step),
    ]
    for letter, bench in groups:
        if letter in args.only:
            gc.collect()
            rows += bench(sizes)
    rows.sort(key=lambda r: r.key)
    print(table(rows))
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s; ratio = optstate / reference, medians; spread = quartiles of the ")
    print(" round-by-round ratios; e is a fraction of the machine's streaming limit, no target)")
    return {
        "date": date,
        "machine": info,
        "quick": args.quick,
        "only": args.only,
        "sizes": asdict(sizes),
        "seconds": seconds,
        "rows": [{**asdict(r), "ratio": r.ratio, "result": r.verdict} for r in rows],
    }


if __name__ == "__main__":
    main(sys.argv[1:])
