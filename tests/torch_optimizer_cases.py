"""The tied model, batches and training step shared by ``test_torch_optimizer`` and the ranks of
its DistributedDataParallel test (``torch_ddp_worker``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as sched

import optstate as ost


class TiedLM(nn.Module):
    """Embedding, a hidden layer and an output layer that is the embedding: one Parameter under
    two names (``head.weight`` is ``emb.weight``)."""

    def __init__(self, vocab: int = 11, width: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(torch.tanh(self.mix(self.emb(idx))))
        return out


def make_model(dtype: torch.dtype = torch.float64, seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM().to(dtype)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randint(0, 11, (16,), generator=gen), torch.randint(0, 11, (16,), generator=gen)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, i: int) -> torch.Tensor:
    x, y = batch(i)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


# -- the DistributedDataParallel test: what both ranks and the single-process reference share ----

DDP_STEPS = 4


def ddp_rule() -> ost.Rule:
    return ost.AdamW(0.02, weight_decay=0.1)


def ddp_scheduler(opt: torch.optim.Optimizer) -> Any:
    return sched.StepLR(opt, 2, gamma=0.5)
