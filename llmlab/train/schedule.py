"""Linear warmup, then cosine decay to a floor (SGDR, Loshchilov & Hutter 2016,
https://arxiv.org/abs/1608.03983, without restarts; the nanoGPT schedule):

    lr(t) = lr_max · (t + 1) / (W + 1)                                   t < W
    lr(t) = lr_min + ½ (1 + cos(π (t − W) / (T − W))) (lr_max − lr_min)   W ≤ t < T

with W warmup steps, T total steps and lr_min = min_lr_ratio · lr_max. Steps count from 0:
`lr(0)` is the rate of the first optimizer step.
"""

import math


def lr_at(step: int, lr: float, max_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> float:
    """The learning rate of optimizer step `step` (0-based) in a run of `max_steps` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    min_lr = lr * min_lr_ratio
    if step >= max_steps or max_steps <= warmup_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
