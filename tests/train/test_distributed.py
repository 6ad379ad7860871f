"""`accumulate` under DistributedDataParallel: two CPU ranks (gloo) with half the examples each give the
gradient one process gets from all of them, and the ranks all-reduce on the last micro-step only."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from llmlab.train.loop import accumulate
from tests.train.helpers import batches, examples, loss_fn, tiny


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank(rank: int, world: int, store: str, out: str):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
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
    torch.save({"grads": _grads(model), "syncs": syncs}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_sync_on_the_last_micro_step_and_give_the_full_batch_gradient(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=world)
    model, tok = tiny()
    every = examples(tok)
    accumulate(model, loss_fn, [batches(tok)(every)])
    expected = _grads(model)
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert got["syncs"] == [False, False, True]  # 5 examples in micro-batches of 2: sync on the third only
        assert got["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
