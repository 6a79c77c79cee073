"""optstate's ``update_`` with Adam against ``torch.optim.Adam`` on the CPU: one command, ratios.

``python bench/torch_adam.py`` builds a small transformer language model whose output layer is its
token embedding (52 unique float32 tensors, 5.3M parameters, 21 MB; the embedding is 8 MB),
gives every Parameter a fixed random ``.grad``, and times one optimiser step of:

* optstate: ``ost.update_(state, model, grad_totals(model))``, the ``.grad`` convention
  (collecting the totals is part of the timed step);
* ``torch.optim.Adam(foreach=True)``: the target is optstate <= 1.2 x its time;
* ``torch.optim.Adam(fused=True)``: the target is optstate <= 1.1 x its time (optstate's
  ``update_`` runs the same fused kernel here: float32 tensors of one device).

Two more rows say where optstate's time goes (reported, no target):

* *out-of-place floor*: Adam's arithmetic as the rule writes it (new arrays for the moments and
  the step, as a pure rule must), in plain torch with Python floats, with no optstate around it;
* *fewer temporaries*: the same pure contract (new moments every step), with in-place operators
  applied only to the arrays the step itself created: what a rewritten pure rule could reach;
* *overhead*: optstate's step on the same number of 2-element tensors: the time that does not
  grow with the model.

Each optimiser steps its own copy of the model. The steps alternate round by round, so a slow
phase of the machine hits all of them; times are medians, ``spread`` the quartiles of the
round-by-round ratios. ``--quick`` uses a small model (a smoke test: its ratios say little).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import optstate as ost
from optstate.interop import torch as ost_torch

LR = 1e-3
TARGET = 1.2  # optstate / torch.optim.Adam(foreach=True)
TARGET_FUSED = 1.1  # optstate / torch.optim.Adam(fused=True)


class TiedTransformerLM(nn.Module):
    """Token and position embeddings, pre-norm transformer layers, a final norm, and an output
    layer that is the token embedding."""

    def __init__(self, vocab: int, width: int, layers: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(context, width))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, nhead=4, dim_feedforward=4 * width, batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight


def timed(steps: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of every timed call of each step; the steps run in turn, round by round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def quartiles(mine: Sequence[float], theirs: Sequence[float]) -> tuple[float, float]:
    ratios = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    if len(ratios) < 4:
        return ratios[0], ratios[-1]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return q1, q3


def with_grads(model: nn.Module, grads: dict[str, torch.Tensor]) -> nn.Module:
    for name, p in model.named_parameters():  # each tied Parameter once
        p.grad = grads[name].clone()
    return model


def out_of_place_adam(params: list[torch.Tensor], grads: list[torch.Tensor]) -> Callable[[], None]:
    """Adam as a pure rule computes it: new moments, a new step, a new parameter written back."""
    mus = [torch.zeros_like(p) for p in params]
    nus = [torch.zeros_like(p) for p in params]
    count = [0]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def step() -> None:
        count[0] += 1
        c1, c2 = 1 - b1 ** count[0], 1 - b2 ** count[0]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            mu = b1 * mus[i] + (1 - b1) * g
            nu = b2 * nus[i] + (1 - b2) * (g * g)
            direction = (mu / c1) / (torch.sqrt(nu / c2) + eps)
            p.copy_(p - LR * direction)
            mus[i], nus[i] = mu, nu

    return step


def fewer_temporaries_adam(
    params: list[torch.Tensor], grads: list[torch.Tensor]
) -> Callable[[], None]:
    """Adam with new moments every step, but in-place operators on its own intermediates."""
    mus = [torch.zeros_like(p) for p in params]
    nus = [torch.zeros_like(p) for p in params]
    count = [0]
    b1, b2, eps = 0.9, 0.999, 1e-8

    def step() -> None:
        count[0] += 1
        c1, c2 = 1 - b1 ** count[0], 1 - b2 ** count[0]
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            mu = b1 * mus[i]
            mu += (1 - b1) * g
            nu = g * g
            nu *= 1 - b2
            nu += b2 * nus[i]
            denominator = torch.sqrt(nu)
            denominator *= c2**-0.5
            denominator += eps
            step = mu * (LR / c1)
            step /= denominator
            p -= step
            mus[i], nus[i] = mu, nu

    return step


def machine() -> str:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} x {cpu}, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), Python {platform.python_version()}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model: a smoke test")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Time the steps, print the table, and return the figures."""
    args = parse_args(argv)
    vocab, width, layers, rounds = (512, 64, 2, 5) if args.quick else (8192, 256, 4, 31)
    torch.manual_seed(0)
    model = TiedTransformerLM(vocab, width, layers, context=128)
    unique = dict(model.named_parameters())
    n_params = sum(p.numel() for p in unique.values())
    gen = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(p.shape, generator=gen) * 1e-2 for n, p in unique.items()}

    ours = with_grads(copy.deepcopy(model), grads)  # deepcopy keeps the tie
    state = ost.setup(ost.Adam(LR), ours)
    foreach_model = with_grads(copy.deepcopy(model), grads)
    foreach = torch.optim.Adam(foreach_model.parameters(), lr=LR, foreach=True)
    fused_model = with_grads(copy.deepcopy(model), grads)
    fused = torch.optim.Adam(fused_model.parameters(), lr=LR, fused=True)
    floor_model = copy.deepcopy(model)
    floor = out_of_place_adam(
        [p.detach() for p in floor_model.parameters()], [grads[n] for n in unique]
    )
    fewer_model = copy.deepcopy(model)
    fewer = fewer_temporaries_adam(
        [p.detach() for p in fewer_model.parameters()], [grads[n] for n in unique]
    )
    tiny = {n: torch.zeros(2) for n in unique}
    tiny_grads = {n: torch.ones(2) for n in unique}
    tiny_state = ost.setup(ost.Adam(LR), tiny)

    def optstate_step() -> None:
        nonlocal state
        state, _ = ost.update_(state, ours, ost_torch.grad_totals(ours))

    def tiny_step() -> None:
        nonlocal tiny_state
        tiny_state, _ = ost.update_(tiny_state, tiny, tiny_grads)

    print(
        f"torch Adam bench{' --quick (too small for the target)' if args.quick else ''}: "
        f"{machine()}\nmodel: {len(unique)} unique tensors, {n_params / 1e6:.2f}M parameters "
        f"({4 * n_params / 2**20:.1f} MiB float32), token embedding tied to the output layer; "
        f"{state}",
        flush=True,
    )
    with torch.no_grad():
        times = timed(
            {
                "optstate": optstate_step,
                "foreach": foreach.step,
                "fused": fused.step,
                "floor": floor,
                "fewer": fewer,
                "tiny": tiny_step,
            },
            rounds,
            warmup=3,
        )
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    rows = [
        ("optstate update_ / torch.optim.Adam(foreach=True)", "optstate", "foreach", TARGET),
        ("optstate update_ / torch.optim.Adam(fused=True)", "optstate", "fused", TARGET_FUSED),
        ("out-of-place floor / torch.optim.Adam(foreach=True)", "floor", "foreach", None),
        ("fewer temporaries, still pure / foreach", "fewer", "foreach", None),
        ("optstate on 2-element tensors (overhead) / foreach", "tiny", "foreach", None),
    ]
    head = (
        f"{'measure':54} {'ms':>8} {'ref ms':>8} {'ratio':>6} {'spread':>11} {'target':>7}  result"
    )
    print(head)
    print("-" * len(head))
    figures: dict[str, Any] = {"ms": ms, "params": n_params, "tensors": len(unique)}
    for what, mine, theirs, target in rows:
        ratio = ms[mine] / ms[theirs]
        q1, q3 = quartiles(times[mine], times[theirs])
        verdict = "info" if target is None else "PASS" if ratio <= target else "MISS"
        shown = "-" if target is None else f"<= {target:g}"
        print(
            f"{what:54} {ms[mine]:8.2f} {ms[theirs]:8.2f} {ratio:6.2f} {q1:5.2f}-{q3:5.2f} "
            f"{shown:>7}  {verdict}"
        )
        figures[f"{mine}/{theirs}"] = ratio
    met = ms["optstate"] / ms["foreach"] <= TARGET and ms["optstate"] / ms["fused"] <= TARGET_FUSED
    figures["result"] = "PASS" if met else "MISS"
    print(f"({rounds} rounds after 3 warm-up rounds; medians; spread = quartiles of the ratios)")
    return figures


if __name__ == "__main__":
    main()
