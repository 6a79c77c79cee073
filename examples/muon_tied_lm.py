"""A small transformer language model with a tied embedding, trained with Muon+AdamW and with
AdamW alone, and a figure of both loss curves.

The model (JAX, no framework) reads ``CONTEXT`` characters and predicts each next one: a character
embedding ``E`` and learned positions, two pre-norm transformer blocks (causal self-attention with
``HEADS`` heads, an MLP of width ``4 * WIDTH``), a final norm, and the output layer
``ost.Transpose(E)``: the embedding itself, one parameter at two positions. It trains on the text
of this repository's README and docs (read at run time, no download); a tenth of it, never
trained on, gives the validation loss.

Two runs start from the same weights and see the same batches:

1. **Muon+AdamW**, the one-liner of docs/rules.md: Muon for the blocks' matrices, AdamW for the
   tied embedding/head, the positions, the gains. The tied weight is one parameter, so it gets
   one rule, and its two gradients are summed before AdamW sees them.
2. **AdamW** for every parameter.

Each step is one ``jax.jit`` of ``jax.grad`` and ``ost.update``. At the end ``ost.retie`` puts the
tie back as one array (``jit`` returns an array per position). Run
``python examples/muon_tied_lm.py --help`` for the options; ``main(argv)`` returns the key figures
as a dict (the test suite runs it with few steps). The default run takes about 30 s on two CPU
cores.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optstate as ost

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 32  # characters the model reads
WIDTH = 64  # embedding width
HEADS = 4
BLOCKS = 2
BATCH = 32


# -- data and model --------------------------------------------------------------------------


def load_text() -> str:
    """The README and every page of docs/, joined: about 100 kB of English and Python."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(p.read_text(encoding="utf-8") for p in pages)


def init_model(vocab: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float) -> jax.Array:
        return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

    embed = normal(vocab, WIDTH, scale=WIDTH**-0.5)
    blocks = [
        {
            "norm1": jnp.ones(WIDTH),
            "wq": normal(WIDTH, WIDTH, scale=WIDTH**-0.5),
            "wk": normal(WIDTH, WIDTH, scale=WIDTH**-0.5),
            "wv": normal(WIDTH, WIDTH, scale=WIDTH**-0.5),
            "wo": normal(WIDTH, WIDTH, scale=(2 * BLOCKS * WIDTH) ** -0.5),
            "norm2": jnp.ones(WIDTH),
            "w1": normal(WIDTH, 4 * WIDTH, scale=WIDTH**-0.5),
            "w2": normal(4 * WIDTH, WIDTH, scale=(2 * BLOCKS * 4 * WIDTH) ** -0.5),
        }
        for _ in range(BLOCKS)
    ]
    return {
        "embed": embed,
        "pos": normal(CONTEXT, WIDTH, scale=0.02),
        "blocks": blocks,
        "norm": jnp.ones(WIDTH),
        "head": ost.Transpose(embed),  # the tie: the output layer is the embedding
    }


def rms_norm(x: jax.Array, gain: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * gain[None, None]


def attention(block: dict[str, Any], x: jax.Array) -> jax.Array:
    n, t, _ = x.shape
    split = (n, t, HEADS, WIDTH // HEADS)
    q, k, v = (jnp.reshape(x @ block[w], split) for w in ("wq", "wk", "wv"))
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(WIDTH // HEADS)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal[None, None], scores, -1e9), axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v)
    return jnp.reshape(out, (n, t, WIDTH)) @ block["wo"]


def logits(model: dict[str, Any], ids: jax.Array) -> jax.Array:
    x = model["embed"][ids] + model["pos"][None, : ids.shape[1]]
    for block in model["blocks"]:
        x = x + attention(block, rms_norm(x, block["norm1"]))
        h = jax.nn.gelu(rms_norm(x, block["norm2"]) @ block["w1"])
        x = x + h @ block["w2"]
    return rms_norm(x, model["norm"]) @ model["head"]


def loss_fn(model: dict[str, Any], ids: jax.Array) -> jax.Array:
    """The mean cross-entropy of each next character."""
    out = logits(model, ids[:, :-1])
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def batches(data: np.ndarray, steps: int, seed: int) -> np.ndarray:
    """``steps`` batches of windows of ``CONTEXT + 1`` characters."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(data) - CONTEXT - 1, size=(steps, BATCH))
    return data[starts[..., None] + np.arange(CONTEXT + 1)]


# -- the two ways to train -------------------------------------------------------------------


def muon_adamw(path: tuple[Any, ...], x: Any) -> ost.Rule:
    """Muon for the hidden matrices; AdamW for the tied embedding/head, positions and gains."""
    if x.ndim == 2 and path[0] == "blocks":
        return ost.Muon(0.02, weight_decay=0.01)
    return adamw(path, x)


def adamw(path: tuple[Any, ...], x: Any) -> ost.Rule:
    """AdamW, with weight decay on matrices only."""
    return ost.AdamW(3e-3, weight_decay=0.1 if x.ndim == 2 else 0.0)


def train(
    rule: Callable[..., ost.Rule],
    model: dict[str, Any],
    data: np.ndarray,
    validation: np.ndarray,
    every: int,
) -> dict[str, Any]:
    """Train ``model``; the training loss of every step, the validation loss every ``every``."""
    state = ost.setup(rule, model)

    @jax.jit
    def step(state: ost.State, model: Any, ids: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(model, ids)
        state, model = ost.update(state, model, grads)
        return state, model, loss

    evaluate = jax.jit(loss_fn)
    losses, checks = [], []
    for i, ids in enumerate(data):
        if i % every == 0:
            checks.append((i, float(evaluate(model, validation))))
        state, model, loss = step(state, model, jnp.asarray(ids))
        losses.append(float(loss))
    checks.append((len(data), float(evaluate(model, validation))))
    model = ost.retie(state, model)  # one array for the tied weight again
    return {"state": state, "model": model, "train": losses, "validation": checks}


def smooth(values: Sequence[float], width: int) -> np.ndarray:
    kernel = np.ones(width) / width
    return np.convolve(np.asarray(values), kernel, mode="valid")


def plot(runs: dict[str, dict[str, Any]], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = max(1, steps // 30)
    for (name, run), colour in zip(runs.items(), ("tab:blue", "tab:orange"), strict=True):
        curve = smooth(run["train"], width)
        ax.plot(np.arange(len(curve)) + width, curve, color=colour, label=f"{name} (train)")
        at, values = zip(*run["validation"], strict=True)
        ax.plot(at, values, "o--", color=colour, label=f"{name} (validation)", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy per character (nats)")
    ax.set_title("A tied-embedding transformer on optstate's docs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--plot", type=Path, default=Path("muon_tied_lm.png"), help="where to save the figure"
    )
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train both runs, save the figure, print the comparison, and return the key figures."""
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    text = load_text()
    chars = "".join(sorted(set(text)))
    data = np.asarray([chars.index(c) for c in text], np.int32)
    cut = len(data) * 9 // 10
    train_batches = batches(data[:cut], args.steps, args.seed)
    validation = jnp.asarray(batches(data[cut:], 4, args.seed + 1).reshape(-1, CONTEXT + 1))
    every = max(1, args.steps // 8)
    runs = {}
    for name, rule in (("Muon+AdamW", muon_adamw), ("AdamW", adamw)):
        began = time.perf_counter()
        runs[name] = train(
            rule, init_model(len(chars), args.seed), train_batches, validation, every
        )
        runs[name]["seconds"] = time.perf_counter() - began
        say(
            f"{name:<11} {runs[name]['state']}: validation loss "
            + " -> ".join(f"{v:.3f}" for _, v in runs[name]["validation"])
            + f"  ({runs[name]['seconds']:.1f} s)"
        )
    plot(runs, args.plot, args.steps)
    hybrid = runs["Muon+AdamW"]
    figures = {
        "steps": args.steps,
        "initial_loss": hybrid["validation"][0][1],
        "final_loss_muon_adamw": hybrid["validation"][-1][1],
        "final_loss_adamw": runs["AdamW"]["validation"][-1][1],
        "rules_muon_adamw": [r.name() for r in hybrid["state"].plan.rules],
        "tie_kept": all(
            run["model"]["head"].parent is run["model"]["embed"] for run in runs.values()
        ),
        "plot": str(args.plot),
        "seconds": time.perf_counter() - start,
    }
    say(
        f"\nfinal validation loss: Muon+AdamW {figures['final_loss_muon_adamw']:.3f}, "
        f"AdamW {figures['final_loss_adamw']:.3f} (from {figures['initial_loss']:.3f}); "
        f"tie kept: {figures['tie_kept']}; figure: {args.plot}; {figures['seconds']:.1f} s"
    )
    return figures


if __name__ == "__main__":
    main()
