"""Progressive layer dropping (Zhang & He 2020, https://arxiv.org/abs/2010.13369).

Each step, layer l of L is kept with probability

    p_l(t) = 1 − (l / L)·(1 − θ(t)),     θ(t) = (1 − θ̄)·exp(−γ·t) + θ̄

so every layer runs at the start, and as training goes on deeper layers are skipped more often,
down to a keep rate of θ̄ for the last one. A skipped layer costs nothing, forward or backward.
A kept layer's residual branches are scaled by 1/p_l in training (stochastic depth's inverted
scaling), so the full model at inference sees the same expected residual stream.
"""

import math
from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError


@dataclass
class LayerDropConfig:
    theta: float = field(0.5, help="θ̄: the keep rate the schedule tends to (the paper's 0.5)")
    gamma: float | None = field(None, help="γ: how fast θ falls; default 10 / max_steps")

    def __post_init__(self):
        if not 0 < self.theta <= 1:
            raise LlmlabError(f"--pld.theta must be in (0, 1], got {self.theta}")
        if self.gamma is not None and self.gamma <= 0:
            raise LlmlabError(f"--pld.gamma must be positive, got {self.gamma}")


def keep_probabilities(step: int, n_layers: int, theta_bar: float, gamma: float) -> list[float]:
    theta = (1 - theta_bar) * math.exp(-gamma * step) + theta_bar
    return [1 - (layer / n_layers) * (1 - theta) for layer in range(1, n_layers + 1)]
