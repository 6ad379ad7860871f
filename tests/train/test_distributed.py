"""`accumulate` under DistributedDataParallel: two CPU ranks (gloo) with half the examples each give the
gradient one process gets from all of them, and the ranks all-reduce on the last micro-step only."""

import subprocess
import sys

import torch

from llmlab.train.loop import accumulate
from tests.conftest import ROOT
from tests.train.helpers import batches, examples, loss_fn, tiny


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_ddp_ranks_sync_on_the_last_micro_step_and_give_the_full_batch_gradient(tmp_path):
    world = 2
    logs = [open(tmp_path / f"rank{rank}.log", "w") for rank in range(world)]  # files: a full pipe would block
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.train.ddp_worker", str(rank), str(world),
                               str(tmp_path / "store"), str(tmp_path / "out")], cwd=ROOT, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    for rank, process in enumerate(ranks):
        try:
            process.wait(timeout=240)
        finally:
            logs[rank].close()
        assert process.returncode == 0, (tmp_path / f"rank{rank}.log").read_text()[-2000:]
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
