"""One rank of tests/train/test_distributed.py: `python -m tests.train.ddp_worker RANK WORLD STORE OUT`."""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from llmlab.train.loop import accumulate
from tests.train.helpers import batches, examples, loss_fn, tiny


def main(rank: int, world: int, store: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # a rank alone fails instead of waiting forever
    torch.set_num_threads(1)
    model, tok = tiny()
    ddp = DDP(model)
    syncs = []

    def spy(m, batch):
        syncs.append(m.require_backward_grad_sync)
        return loss_fn(m, batch)

    mine = examples(tok)[rank::world]  # rank 0 the even examples, rank 1 the odd ones (unequal token counts)
    collate = batches(tok)
    accumulate(ddp, spy, [collate(mine[i:i + 2]) for i in range(0, len(mine), 2)])
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.save({"grads": grads, "syncs": syncs}, f"{out}.{rank}")
    # Leave at once: tearing gloo down can wait on the other rank's exit (seen under pytest), and the
    # result is already on disk.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
