"""DTensors (FSDP2's ``fully_shard``, tensor parallelism): refused by the PyTorch bridge, which
finds ties from tensors' memory."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["check_not_dtensor", "dtensor_type"]


def dtensor_type() -> type | None:
    """``DTensor`` if torch's DTensor module has been imported (no DTensor can exist before it
    is), else ``None``: the common case costs a dictionary lookup, not a check per tensor."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else getattr(module, "DTensor", None)


def check_not_dtensor(x: Any, where: str) -> None:
    """Refuse a ``DTensor`` (a parameter sharded by FSDP2's ``fully_shard`` or by tensor
    parallelism): it is a wrapper without memory of its own, which optstate's tie detection reads
    (see docs/pytorch.md, "Several processes")."""
    kind = dtensor_type()
    if kind is not None and isinstance(x, kind):
        placements = tuple(getattr(x, "placements", ()))
        raise TypeError(
            f"{where} is a DTensor (placements {placements}), as FSDP2's fully_shard "
            "or tensor parallelism makes parameters; optstate does not train DTensors: it finds "
            "ties from tensors' memory, which a DTensor does not have. Train the module "
            "under DistributedDataParallel (replicated parameters), or see docs/pytorch.md"
        )
