"""DTensors (FSDP2's ``fully_shard``, tensor parallelism): refused by the PyTorch bridge, which
finds ties from tensors' memory."""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["check_not_dtensor"]


@functools.cache
def _dtensor_type() -> type | tuple[()]:
    """``DTensor``, or ``()`` (what ``isinstance`` never matches) where torch has no
    distributed package."""
    if not torch.distributed.is_available():
        return ()
    from torch.distributed.tensor import DTensor

    return DTensor


def check_not_dtensor(x: Any, where: str) -> None:
    """Refuse a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard`` or by tensor
    parallelism): it is a wrapper without memory of its own, which optstate's tie detection reads
    (see docs/pytorch.md, "Several processes")."""
    if isinstance(x, _dtensor_type()):
        placements = tuple(getattr(x, "placements", ()))
        raise TypeError(
            f"{where} is a DTensor (placements {placements}), as FSDP2's fully_shard "
            "or tensor parallelism makes parameters; optstate does not train DTensors: it finds "
            "ties from tensors' memory, which a DTensor does not have. Train the module "
            "under DistributedDataParallel (replicated parameters), or see docs/pytorch.md"
        )
