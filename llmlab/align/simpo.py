"""SimPO: preferences without a reference model, on length-normalised log-probabilities.

Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
https://arxiv.org/abs/2405.14734. The implicit reward is the mean log-probability of the reply, scaled by β,
and the chosen reply must beat the rejected one by a target margin γ:

    L = −log σ(β/|y_w| · log π_θ(y_w|x) − β/|y_l| · log π_θ(y_l|x) − γ)
"""

from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.losses import PreferenceLoss


@dataclass
class SimPOConfig:
    beta: float = field(2.0, help="β: the scale of the length-normalised reward (the paper: 2.0–2.5)")
    gamma: float = field(1.0, help="γ: the target reward margin (the paper: γ/β of 0.5 for most models)")

    def __post_init__(self):
        if not self.beta > 0:
            raise LlmlabError(f"--options.beta must be positive, got {self.beta}")
        if self.gamma < 0:
            raise LlmlabError(f"--options.gamma must be 0 or more, got {self.gamma}")


def simpo_loss(cfg: SimPOConfig, reference=None, method: str = "simpo") -> PreferenceLoss:
    return PreferenceLoss("simpo", cfg.beta, gamma=cfg.gamma)
