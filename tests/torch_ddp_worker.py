"""One rank of ``test_torch_optimizer.test_ddp_two_processes``: the tied model under
``DistributedDataParallel`` (gloo, localhost), trained by ``optstate.interop.torch.Optimizer`` on
this rank's half of every batch. Run as ``python tests/torch_ddp_worker.py RANK PORT OUT``; it
saves the trained weights to ``OUT``."""

from __future__ import annotations

import os
import sys
from datetime import timedelta


def main(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch_optimizer_cases import DDP_STEPS, batch, ddp_rule, ddp_scheduler, make_model

    import optstate as ost
    from optstate.interop.torch import Optimizer

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    try:
        model = make_model()
        ddp = DistributedDataParallel(model)
        opt = Optimizer(ddp, ddp_rule())
        schedule = ddp_scheduler(opt)
        for i in range(DDP_STEPS):
            x, y = batch(i)
            half = slice(rank * len(x) // 2, (rank + 1) * len(x) // 2)
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x[half]), y[half]).backward()  # averaged over ranks
            opt.step()
            schedule.step()
        assert model.head.weight is model.emb.weight
        assert isinstance(opt.ost_state, ost.State)
        torch.save(dict(model.named_parameters(remove_duplicate=False)), out)
        # Both ranks done before either lets go of its process group: a gloo group torn down
        # while its peer is gone could hang in its destructor.
        dist.barrier()
        del ddp, opt, schedule
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
