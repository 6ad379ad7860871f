"""Data parallelism on torch.distributed: the engine users already run, set up in a few lines.

    torchrun --nproc-per-node 2 -m llmlab.cli pretrain …      (or `llmlab pretrain --nproc 2 …`)

`init()` joins the process group torchrun describes in the environment (gloo on CPU, nccl on
GPU); `wrap(model, "ddp")` replicates the model with DistributedDataParallel, `wrap(model, "fsdp")`
shards each decoder block and then the rest with FSDP2's `fully_shard` (parameters, gradients and
optimizer states split across ranks, gathered block by block for compute). `fit()` sees the
wrapper and synchronises gradients on the last micro-step only; checkpoints are consolidated, so
a run resumes on another number of processes (train/checkpoint.py).

Tensor and pipeline parallelism are not built here: a model too big for one GPU's memory even
sharded belongs in torchtitan or Megatron-LM (see docs/pretrain.md).
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist

from llmlab.errors import LlmlabError
from llmlab.models import decoder_layers

KINDS = ("ddp", "fsdp")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); joins the process group when launched by torchrun."""
    if world_size() == 1:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model, kind: str, find_unused: bool = False):
    """The model wrapped for data parallelism (`find_unused`: some parameters may get no gradient in a step,
    as with dropped layers or idle experts)."""
    if kind not in KINDS:
        raise LlmlabError(f"unknown --parallel '{kind}'; use ddp or fsdp")
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=find_unused)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model):
    """The model inside a DDP wrapper (FSDP2 wraps in place)."""
    return getattr(model, "module", model)


def full_state_dict(model) -> dict:
    """Every parameter and buffer whole, on the CPU (gathers FSDP2 shards: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not active():
        return unwrap(model).state_dict()
    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def active() -> bool:
    """Whether this process is in a process group (launched by torchrun and initialised)."""
    return dist.is_available() and dist.is_initialized()


def is_main() -> bool:
    """Rank 0, or the only process: the one that logs and writes."""
    return not active() or dist.get_rank() == 0


def broadcast(value):
    """Rank 0's `value` on every rank (a no-op outside a process group)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, argv: list[str]) -> int:
    """Run `llmlab <argv>` in `nproc` processes under torchrun; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "llmlab.cli", *argv]
    return subprocess.call(command)


def finish():
    if active():
        dist.barrier()
        dist.destroy_process_group()
