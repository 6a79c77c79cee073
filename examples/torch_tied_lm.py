"""A character-level language model in PyTorch whose output layer is its input embedding, trained
with optstate and checked against ``torch.optim.AdamW``.

The model reads the previous ``CONTEXT`` characters and predicts the next one. Its output layer
is tied to its input embedding, ``head.weight = emb.weight``, as in most language models: one
``nn.Parameter`` under two names. It trains on the text of this repository's own README and docs
(read at run time, so no download), in float32, with AdamW.

Three copies start from the same weights and see the same batches, with the same learning-rate
schedule (``torch.optim.lr_scheduler``: a linear warm-up, then cosine decay):

1. **optstate's Optimizer**, the usual PyTorch loop: ``opt.zero_grad()``, ``loss.backward()``,
   ``opt.step()``, ``scheduler.step()``, with ``optstate.interop.torch.Optimizer``, a
   ``torch.optim.Optimizer`` that steps with optstate (the tied Parameter counted once, kept
   tied). Half-way it is checkpointed (``torch.save`` of the model's, the optimiser's and the
   scheduler's ``state_dict()``) and the run continues from the file in a fresh model,
   optimiser and scheduler (``torch.load(..., weights_only=True)``), as after a restart.
2. **optstate, partial gradients**: ``torch.func.grad`` over ``functional_call(model, params,
   tie_weights=False)`` gives one partial gradient per name, the embedding's and the output
   layer's; ``ost.update_`` adds them up and writes the AdamW step into the module's
   Parameters, which stay one object. The scheduler's learning rate reaches it through
   ``ost.adjust``.
3. **torch.optim.AdamW**, the reference, on ``model.parameters()`` (which lists the tied
   Parameter once).

All three agree to float32 rounding. Run ``python examples/torch_tied_lm.py --help`` for the
options; ``main(argv)`` returns the key figures as a dict (the test suite runs it with few steps).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

import optstate as ost
from optstate.interop import torch as ost_torch

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 8  # characters the model reads
WIDTH = 32  # embedding width
BATCH = 64


# -- data and model --------------------------------------------------------------------------


def load_text() -> str:
    """The README and every page of docs/, joined: about 100 kB of English and Python."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return "\n\n".join(p.read_text(encoding="utf-8") for p in pages)


class CharLM(nn.Module):
    """Embed ``CONTEXT`` characters, mix them through one hidden layer, and score every character
    of the vocabulary against the result with the embedding itself (the tied output layer)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, WIDTH)
        self.hidden = nn.Linear(CONTEXT * WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, vocab)
        self.head.weight = self.emb.weight  # the tie: one Parameter under two names
        with torch.no_grad():
            self.emb.weight.mul_(WIDTH**-0.5)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.hidden(self.emb(context).flatten(1)))
        logits: torch.Tensor = self.head(h)
        return logits


def batches(data: torch.Tensor, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` random batches of (context, next character)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, len(data) - CONTEXT - 1, (BATCH,), generator=gen)
        window = start[:, None] + torch.arange(CONTEXT + 1)
        chunk = data[window]
        out.append((chunk[:, :CONTEXT], chunk[:, CONTEXT]))
    return out


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


# -- the three ways to train -----------------------------------------------------------------


def step_partials(state: ost.State, model: CharLM, x: torch.Tensor, y: torch.Tensor) -> ost.State:
    """``torch.func.grad``: one partial gradient per name, summed by optstate."""

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_fn(functional_call(model, params, (x,), tie_weights=False), y)

    grads = torch.func.grad(loss)(ost_torch.parameters(model))
    state, _ = ost.update_(state, model, grads)
    return state


def schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A linear warm-up over the first tenth of the steps, then cosine decay to a tenth."""
    warmup = max(1, steps // 10)
    lr = opt.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, steps - warmup), eta_min=lr / 10
            ),
        ],
        milestones=[warmup],
    )


def checkpoint_and_resume(
    model: CharLM, opt: ost_torch.Optimizer, sched: Any, rule: ost.Rule, steps: int
) -> tuple[CharLM, ost_torch.Optimizer, Any]:
    """Save the model, the optimiser and the scheduler with ``torch.save``, then build all three
    afresh and load them back, as a restarted job would."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        torch.save(
            {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()},
            path,
        )
        saved = torch.load(path, weights_only=True)  # tensors and plain values only
    model = CharLM(model.emb.num_embeddings)
    model.load_state_dict(saved["model"])
    opt = ost_torch.Optimizer(model, rule)
    sched = schedule(opt, steps)  # made before loading: making it writes its first lr
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    return model, opt, sched


def step_torch(opt: torch.optim.Optimizer, model: CharLM, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max(float((p - q).abs().max()) for p, q in pairs)


@torch.no_grad()
def sample(model: CharLM, prompt: str, chars: str, n: int) -> str:
    """Greedy continuation of ``prompt``."""
    index = {c: i for i, c in enumerate(chars)}
    ids = [index.get(c, 0) for c in prompt[-CONTEXT:].rjust(CONTEXT)]
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids[-CONTEXT:]])).argmax()))
    return prompt + "".join(chars[i] for i in ids[CONTEXT:])


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="AdamW steps (default 600)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train the three copies, print the comparison, and return the key figures."""
    args = parse_args(argv)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    text = load_text()
    chars = "".join(sorted(set(text)))
    data = torch.tensor([chars.index(c) for c in text])
    train = batches(data, args.steps, args.seed)
    evaluation = batches(data, 4, args.seed + 1)

    model = CharLM(len(chars))
    by_optimizer, reference = copy.deepcopy(model), copy.deepcopy(model)  # deepcopy keeps the tie
    tied = model.head.weight
    rule = ost.AdamW(args.lr, weight_decay=1e-2)
    opt = ost_torch.Optimizer(by_optimizer, rule)  # one AdamW state for the tied Parameter
    sched = schedule(opt, args.steps)
    state = ost.setup(rule, model)
    ref = torch.optim.AdamW(reference.parameters(), lr=args.lr, weight_decay=1e-2)
    ref_sched = schedule(ref, args.steps)
    resume_at = args.steps // 2

    @torch.no_grad()
    def evaluate(m: CharLM) -> float:
        return sum(float(loss_fn(m(x), y)) for x, y in evaluation) / len(evaluation)

    initial = evaluate(by_optimizer)
    say(f"{opt.ost_state}; {len(text)} characters of README and docs, vocabulary {len(chars)}")
    say(f"step {0:>5}  loss {initial:.4f}")
    for i, (x, y) in enumerate(train, 1):
        # 1. the PyTorch loop
        opt.zero_grad()
        loss_fn(by_optimizer(x), y).backward()
        opt.step()
        # 2. partial gradients, at the scheduler's learning rate for this step
        state = ost.adjust(state, lr=opt.param_groups[0]["lr"])
        state = step_partials(state, model, x, y)
        # 3. the reference
        step_torch(ref, reference, x, y)
        sched.step()
        ref_sched.step()
        if i == resume_at:
            by_optimizer, opt, sched = checkpoint_and_resume(
                by_optimizer, opt, sched, rule, args.steps
            )
            say(f"step {i:>5}  checkpointed, and resumed from the file")
        if i % max(1, args.steps // 6) == 0 or i == args.steps:
            lr = opt.param_groups[0]["lr"]
            say(f"step {i:>5}  loss {evaluate(by_optimizer):.4f}  lr {lr:.2e}")

    figures = {
        "steps": args.steps,
        "lr": args.lr,
        "resumed_at": resume_at,
        "initial_loss": initial,
        "final_loss": evaluate(by_optimizer),
        "tie_kept": model.head.weight is model.emb.weight is tied
        and by_optimizer.head.weight is by_optimizer.emb.weight,
        "max_diff_vs_torch_optim": max_diff(by_optimizer, reference),
        "max_diff_partials_vs_optimizer": max_diff(model, by_optimizer),
        "max_abs_weight": max(float(p.detach().abs().max()) for p in by_optimizer.parameters()),
        "final_lr": opt.param_groups[0]["lr"],
        "reference_final_lr": ref.param_groups[0]["lr"],
        "seconds": time.perf_counter() - start,
    }
    say(
        f"\nloss {figures['initial_loss']:.4f} -> {figures['final_loss']:.4f}; tie kept: "
        f"{figures['tie_kept']}\nlargest difference from torch.optim.AdamW: "
        f"{figures['max_diff_vs_torch_optim']:.1e} (largest weight "
        f"{figures['max_abs_weight']:.2f}); between partials (torch.func.grad, update_) and "
        f"the Optimizer (.grad): {figures['max_diff_partials_vs_optimizer']:.1e}"
    )
    say(f"sample: {sample(by_optimizer, 'optstate keeps ', chars, 60)!r}")
    say(f"{figures['seconds']:.1f} s")
    return figures


if __name__ == "__main__":
    main()
