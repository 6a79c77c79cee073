"""Small tied models of NumPy arrays and torch tensors, shared by the in-place tests."""

from typing import Any

import numpy as np
import torch
from torch import nn


def model_of(backend: str, dtype: str, seed: int) -> dict[str, Any]:
    """A tied model: ``w`` and its transpose (a view: one parameter), and a separate ``b``."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(3, 4)).astype(dtype), rng.normal(size=(4,)).astype(dtype)
    if backend == "torch":
        w, b = torch.from_numpy(w), torch.from_numpy(b)
    return {"w": w, "wt": w.T, "b": b}


def grads_of(model: dict[str, Any], step: int) -> dict[str, Any]:
    """Partial gradients; ``b`` gets none on odd steps, so its count falls behind."""
    rng = np.random.default_rng(100 + step)
    to = torch.from_numpy if isinstance(model["w"], torch.Tensor) else np.asarray
    dtype = str(model["w"].dtype).removeprefix("torch.")
    g = {name: to(rng.normal(size=tuple(x.shape)).astype(dtype)) for name, x in model.items()}
    if step % 2:
        g["b"] = None
    return g


class TiedLM(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(x))))
