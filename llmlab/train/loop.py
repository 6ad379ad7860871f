"""One training loop for every stage: `fit(model, loss_fn, data, cfg)`.

A stage (SFT, DPO, distillation, …) supplies only `loss_fn(model, batch) -> (loss_sum, n)`: the
*sum* of its per-item losses over the batch and the number of items summed (target tokens for
SFT, pairs for DPO). The loop adds up the micro-batches' sums, backpropagates each, and divides
the gradients by the step's total count, so that `grad_accum` micro-batches of `batch_size` give
the gradient of one batch of `batch_size × grad_accum`, however the items fall between them.

Each step reads top to bottom, as in nanoGPT's train.py: learning rate → eval/checkpoint →
micro-steps forward/backward → clip → optimizer step → zero grads → log. AdamW updates only the
parameters that require grad, so full fine-tuning and adapters differ only in the model given.
"""

import contextlib
import dataclasses
import json
import logging
import math
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from llmlab.atomic import atomic_write_jsonl
from llmlab.config import field
from llmlab.data.packing import to_device
from llmlab.data.text import lines
from llmlab.errors import LlmlabError
from llmlab.train import distributed
from llmlab.train.checkpoint import (checkpoint_name, latest_checkpoint, load_checkpoint, prune_checkpoints,
                                     restore_rng, save_checkpoint)
from llmlab.train.schedule import lr_at

log = logging.getLogger("llmlab")


@dataclasses.dataclass
class TrainConfig:
    lr: float = field(2e-4, help="peak learning rate")
    max_steps: int | None = field(None, help="optimizer steps (default: --train.epochs passes over the data)")
    epochs: float = field(1.0, help="passes over the training data when --train.max-steps is not given")
    batch_size: int = field(8, help="examples per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step; effective batch = batch_size x grad_accum")
    batch_warmup_steps: int = field(0, help="dynamic batch size: grow the micro-batches per step linearly from 1 to "
                                            "grad_accum over this many steps (0: off)")
    warmup_steps: int | None = field(None, help="linear warmup steps (default: warmup_ratio x max_steps)")
    warmup_ratio: float = field(0.03, help="warmup as a fraction of max_steps, when warmup_steps is not given")
    min_lr_ratio: float = field(0.1, help="cosine decay ends at lr x this")
    weight_decay: float = field(0.0, help="AdamW decoupled weight decay (matrices only, not biases or norms)")
    betas: list[float] = field([0.9, 0.999], help="AdamW betas")
    max_grad_norm: float | None = field(1.0, help="clip the gradient norm to this (none: no clipping)")
    bf16: bool = field(False, help="autocast forward passes to bfloat16; master weights stay in their dtype")
    gradient_checkpointing: bool = field(False, help="recompute activations in backward to save memory")
    eval_every: int = field(100, help="evaluate every N steps (0: only at the end)")
    save_every: int = field(100, help="checkpoint every N steps (0: never)")
    log_every: int = field(1, help="log the mean loss of every N steps")
    keep_checkpoints: int = field(2, help="keep only the newest N checkpoints (0: keep all)")
    seed: int = field(0, help="seed for data order, dropout and initialisation")
    tensorboard: bool = field(False, help="also write TensorBoard events to <run>/tensorboard")

    def __post_init__(self):
        for key in ("batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise LlmlabError(f"--train.{key.replace('_', '-')} must be at least 1, got {getattr(self, key)}")
        for key in ("eval_every", "save_every", "keep_checkpoints", "batch_warmup_steps"):
            if getattr(self, key) < 0:
                raise LlmlabError(f"--train.{key.replace('_', '-')} must be 0 or more, got {getattr(self, key)}")
        if self.lr <= 0:
            raise LlmlabError(f"--train.lr must be positive, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LlmlabError(f"--train.max-steps must be at least 1, got {self.max_steps}")
        if self.max_steps is None and self.epochs <= 0:
            raise LlmlabError(f"--train.epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise LlmlabError("--train.warmup-ratio must be in [0, 1) and --train.warmup-steps 0 or more")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LlmlabError(f"--train.min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise LlmlabError(f"--train.betas must be two numbers in [0, 1), e.g. 0.9,0.999; got {self.betas}")


class Batches:
    """Micro-batches of `data` in a shuffled order, epoch after epoch.

    Epoch e's order is a permutation drawn from its own generator seeded with `seed + e`, so the
    loader's whole state is (epoch, index) and a resumed run sees the same batches.
    """

    def __init__(self, data, batch_size: int, seed: int, collate, rank: int = 0, world: int = 1):
        if len(data) == 0:
            raise LlmlabError("no training examples to train on")
        self.data, self.batch_size, self.seed, self.collate = data, batch_size * world, seed, collate
        self.rank, self.world = rank, world  # data parallel: each rank takes every world-th item of the global batch
        self.epoch, self.index, self._order = 0, 0, (None, [])

    def __len__(self) -> int:  # micro-batches per epoch; the last one may be smaller
        return math.ceil(len(self.data) / self.batch_size)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict):
        self.epoch, self.index = position["epoch"], position["index"]

    def __next__(self):
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        if self._order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.data), generator=generator).tolist())
        ids = self._order[1][self.index * self.batch_size:(self.index + 1) * self.batch_size][self.rank::self.world]
        self.index += 1
        return self.collate([self.data[i] for i in ids])


class Throughput:
    """Times the training sections it wraps and counts the tokens they process."""

    def __init__(self):
        self.seconds, self.tokens, self._mark = 0.0, 0, (0.0, 0)

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start

    def since_last(self) -> float:
        """Tokens per second since the previous call."""
        seconds, tokens = self.seconds - self._mark[0], self.tokens - self._mark[1]
        self._mark = (self.seconds, self.tokens)
        return tokens / seconds if seconds > 0 else 0.0


@contextlib.contextmanager
def memory_stats(device: torch.device):
    """Yield a dict that holds, on exit, the peak resident memory and (on a GPU) peak allocated memory."""
    stats = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        yield stats
    finally:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        stats["peak_rss_mb"] = round(kib / (1024 ** 2 if sys.platform == "darwin" else 1024), 1)
        if device.type == "cuda":
            stats["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)


class MetricsLog:
    """Sends each metrics line to the run's metrics.jsonl, TensorBoard and the callbacks."""

    def __init__(self, run, tensorboard: bool, callbacks):
        self.run, self.callbacks, self.writer = run, list(callbacks), None
        if tensorboard:
            self.writer = _tensorboard_writer(run)

    def __call__(self, step: int, **metrics):
        if self.run is not None:
            self.run.log_metrics(step=step, **metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        for callback in self.callbacks:
            callback(step, metrics)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(run):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("--train.tensorboard: the tensorboard package is not installed (pip install 'llmlab[monitor]'); "
                    "metrics go to metrics.jsonl only")
        return None
    return SummaryWriter(str(Path(run.path if run is not None else "runs") / "tensorboard"))


def count_tokens(batch) -> int:
    """Tokens a batch feeds the model: its `num_tokens`, else its attention mask's ones, else its ids."""
    if isinstance(batch, dict):
        if "num_tokens" in batch:
            return int(batch["num_tokens"])
        if "attention_mask" in batch:
            return int(batch["attention_mask"].sum())
        if "input_ids" in batch:
            return batch["input_ids"].numel()
    return 0


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices only, as nanoGPT does."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LlmlabError("nothing to train: no parameter of the model requires grad")
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def evaluate(model, loss_fn, data, batch_size: int, collate, autocast) -> float:
    """Mean loss over `data` (sum of losses / sum of counts), with dropout off."""
    device = next(model.parameters()).device
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            batch = to_device(collate(list(data[i:i + batch_size])), device)
            with autocast():
                loss_sum, count = loss_fn(model, batch)
            total, n = total + float(loss_sum), n + int(count)
    model.train()
    return total / max(n, 1)


def frozen_linears_to_bf16(model) -> int:
    """Store frozen linear weights in bf16 for bf16-autocast training; returns how many were cast.

    Autocast casts each fp32 weight to bf16 before its matmul, at every step, and keeps the copy
    for backward. A frozen weight needs no fp32 master copy, so storing it in bf16 gives the same
    numbers with half the memory and none of the casts. Trainable weights stay fp32 for the
    optimizer; embeddings (and a head tied to them) and norms stay as they are, because autocast
    runs lookups and norms in their stored dtype and the residual stream should stay fp32.
    """
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else None
    cast = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(module, torch.nn.Linear) and weight is not embedding and not weight.requires_grad
                and weight.dtype == torch.float32):
            module.to(torch.bfloat16)
            cast += 1
    return cast


def fit(model, loss_fn, train_data, cfg: TrainConfig, *, collate, eval_data=None, run=None,
        checkpoint_dir: str | Path | None = None, resume: str | Path | None = None, callbacks=(),
        progress: bool = True, after_step=None) -> dict:
    """Train `model` in place on `train_data` (a sequence of examples that `collate` makes batches of).

    `resume` is a checkpoint folder, or a folder of them whose newest is taken. `callbacks` are
    called as `callback(step, metrics)` with every logged line. `after_step(step)` runs after each
    optimizer step (step counts from 1) and may return metrics to log with it (a stage's schedules
    and counters). A DDP- or FSDP2-wrapped model trains data-parallel: each rank takes its share of
    every micro-batch of batch_size × world items, and only rank 0 logs, saves and shows progress.
    Returns the run's summary numbers.
    """
    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    rank, world = rank_and_world(model)
    optimizer = make_optimizer(model, cfg)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    loader = Batches(train_data, cfg.batch_size, cfg.seed, collate, rank, world)
    max_steps = cfg.max_steps or math.ceil(cfg.epochs * len(loader) / cfg.grad_accum)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * max_steps)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)  # noqa: E731
    if cfg.bf16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning("--train.bf16 on a CPU without bf16 instructions (AVX512-BF16/AMX): bf16 matmuls are emulated "
                    "and can be 10-25x slower than float32 here; leave --train.bf16 off on this machine")
    step, tokens, eval_loss, losses, train_loss = 0, 0, None, [], None
    if resume is not None:
        step, tokens = _resume(resume, model, optimizer, loader, run, max_steps)
    start_step, meter, extra = step, Throughput(), {}
    with (training_mode(model, cfg), memory_stats(device) as memory,
          MetricsLog(run if rank == 0 else None, cfg.tensorboard and rank == 0,
                     callbacks if rank == 0 else ()) as metrics,
          tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not progress or rank > 0) as bar):
        while True:
            lr = lr_at(step, cfg.lr, max_steps, warmup, cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if step > start_step and eval_data and (step == max_steps or cfg.eval_every and step % cfg.eval_every == 0):
                eval_loss = evaluate(model, loss_fn, eval_data, cfg.batch_size, collate, autocast)
                metrics(step, eval_loss=eval_loss)
            if step > start_step and cfg.save_every and step % cfg.save_every == 0:
                _save(checkpoint_dir, model, optimizer, loader, cfg, step, tokens + meter.tokens * world, max_steps)
            if step >= max_steps:
                break
            micro = micro_batches(step, cfg)
            with meter:
                loss_sum, n = accumulate(model, loss_fn, (next(loader) for _ in range(micro)), autocast, meter)
                grad_norm = _clip(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if world > 1:
                loss_sum, n = _sum_over_ranks(loss_sum, n, device)
            losses.append(loss_sum / max(n, 1))
            if after_step is not None:
                extra = after_step(step) or {}
            if step % cfg.log_every == 0 or step == max_steps:
                train_loss, rate = sum(losses) / len(losses), meter.since_last() * world
                metrics(step, loss=train_loss, lr=lr, grad_norm=grad_norm, tokens_per_s=round(rate, 1),
                        **({"micro_batches": micro} if cfg.batch_warmup_steps else {}), **extra)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                losses = []
            bar.update(1)
    tokens += meter.tokens * world  # ranks see equal shares of each global batch
    return {"steps": step, "train_loss": train_loss, "eval_loss": eval_loss, "tokens": tokens,
            "seconds": round(meter.seconds, 3),
            "tokens_per_s": round(meter.tokens * world / max(meter.seconds, 1e-9), 1), **memory}


def micro_batches(step: int, cfg: TrainConfig) -> int:
    """Micro-batches of optimizer step `step` (0-based): grad_accum, or a linear ramp up to it (dynamic batch size,
    the batch-size warm-up of GPT-3, Brown et al. 2020, appendix B)."""
    if step >= cfg.batch_warmup_steps:
        return cfg.grad_accum
    return max(1, math.ceil(cfg.grad_accum * (step + 1) / cfg.batch_warmup_steps))


def rank_and_world(model) -> tuple[int, int]:
    """(this process's rank, number of processes) when the model is wrapped for data parallelism, else (0, 1)."""
    wrapped = hasattr(model, "require_backward_grad_sync") or hasattr(model, "set_requires_gradient_sync")  # DDP, FSDP2
    if not (wrapped and distributed.active()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _sum_over_ranks(loss_sum: float, n: int, device) -> tuple[float, int]:
    both = torch.tensor([loss_sum, float(n)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both)
    return float(both[0]), int(both[1])


def accumulate(model, loss_fn, batches, autocast=contextlib.nullcontext, meter: Throughput | None = None):
    """Forward and backward each batch, then scale `.grad` to the gradient of the mean loss over all.

    Returns (summed loss, count). Gradients of micro-batches add up in `.grad`, so dividing once by
    the total count makes any split of the same examples give the same gradient.

    Wrapped in DDP (or FSDP2), the ranks synchronise their gradients on the last micro-step only
    (nanoGPT's `require_backward_grad_sync`): the earlier backward passes just add up locally, and
    the one all-reduce carries the sum. The all-reduce averages over the W ranks, so the gradient is
    rescaled by W / (targets on all ranks), the mean over every target of the global batch.
    """
    device = next(model.parameters()).device
    batches = list(batches)
    loss_sum, n = 0.0, 0
    for i, batch in enumerate(batches):
        batch = to_device(batch, device)
        with gradient_sync(model, i == len(batches) - 1), autocast():
            loss, count = loss_fn(model, batch)
        loss.backward()
        loss_sum, n = loss_sum + float(loss.detach()), n + int(count)
        if meter is not None:
            meter.tokens += count_tokens(batch)
    world, total = _global_count(model, n, device)
    if total > 0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(total / world)
    return loss_sum, n


@contextlib.contextmanager
def gradient_sync(model, sync: bool):
    """Let a DDP or FSDP2 model all-reduce its gradients in this backward pass only if `sync`."""
    if hasattr(model, "require_backward_grad_sync"):  # DistributedDataParallel
        previous = model.require_backward_grad_sync
        model.require_backward_grad_sync = sync
        try:
            yield
        finally:
            model.require_backward_grad_sync = previous
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _global_count(model, n: int, device) -> tuple[int, int]:
    """(ranks whose gradients were averaged, targets summed over them); (1, n) outside data parallelism."""
    _, world = rank_and_world(model)
    if world == 1:
        return 1, n
    count = torch.tensor([n], dtype=torch.long, device=device)
    torch.distributed.all_reduce(count)
    return world, int(count.item())


@contextlib.contextmanager
def training_mode(model, cfg: TrainConfig):
    """Dropout on, no KV cache, optional activation checkpointing; all put back on exit."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if cfg.gradient_checkpointing and not getattr(model, "supports_gradient_checkpointing", False):
        raise LlmlabError("--train.gradient-checkpointing: this model does not support it; turn it off")
    model.train()
    if use_cache is not None:
        config.use_cache = False  # a KV cache only costs memory in training
    if cfg.gradient_checkpointing:
        _checkpointing(model, True)
    try:
        yield
    finally:
        model.eval()
        if use_cache is not None:
            config.use_cache = use_cache
        if cfg.gradient_checkpointing:
            _checkpointing(model, False)


def _checkpointing(model, on: bool):
    """Switch activation checkpointing (older transformers 5.x releases call it gradient checkpointing)."""
    # The non-reentrant variant also works when the inputs do not require grad (frozen embeddings).
    kwargs = {"use_reentrant": False}
    new_api = hasattr(model, "activation_checkpointing_enable")
    if on and new_api:
        model.activation_checkpointing_enable(kwargs)
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif new_api:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _clip(params, max_norm: float | None) -> float:
    grads = [p for p in params if p.grad is not None]
    if not max_norm:
        return float(torch.norm(torch.stack([p.grad.norm() for p in grads]))) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _save(root, model, optimizer, loader, cfg, step: int, tokens: int, max_steps: int):
    if root is None:
        return
    state = {"step": step, "tokens": tokens, "max_steps": max_steps, "loader": loader.position,
             "train": dataclasses.asdict(cfg)}
    save_checkpoint(Path(root) / checkpoint_name(step), model, optimizer, state)
    prune_checkpoints(root, cfg.keep_checkpoints)


def _resume(resume, model, optimizer, loader, run, max_steps: int) -> tuple[int, int]:
    """Restore a checkpoint; the RNG goes last, so that setup draws nothing after it."""
    folder = latest_checkpoint(resume)
    if folder is None:
        raise LlmlabError(f"no checkpoint to resume from in {resume}; a run writes them every --train.save-every steps")
    state = load_checkpoint(folder, model, optimizer)
    if state["max_steps"] != max_steps:
        log.warning("resuming a run planned for %d steps with %d: the learning-rate schedule changes",
                    state["max_steps"], max_steps)
    loader.seek(state["loader"])
    if run is not None:
        _trim_metrics(Path(run.path) / "metrics.jsonl", state["step"])
    restore_rng(state, folder)
    log.info("resumed from %s at step %d", folder, state["step"])
    return state["step"], state["tokens"]


def _trim_metrics(path: Path, step: int):
    """Drop the lines a killed run logged after its last checkpoint: the resumed run logs them again."""
    if path.is_file():
        rows = [json.loads(line) for line in lines(path.read_text(encoding="utf-8")) if line.strip()]
        atomic_write_jsonl(path, [r for r in rows if r.get("step", 0) <= step])
