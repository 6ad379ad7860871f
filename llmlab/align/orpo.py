"""ORPO: supervised fine-tuning and preference alignment in one loss, without a reference model.

Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
https://arxiv.org/abs/2403.07691. With P the per-token mean likelihood of a reply and odds(y) = P/(1 − P):

    L = L_SFT(y_w) − λ log σ(log odds(y_w|x) − log odds(y_l|x))

L_SFT is the chosen reply's mean negative log-likelihood; λ (`beta`, as TRL calls it) weighs the odds ratio.
"""

from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.losses import PreferenceLoss


@dataclass
class ORPOConfig:
    beta: float = field(0.1, help="λ: the weight of the odds-ratio term beside the SFT loss")

    def __post_init__(self):
        if not self.beta > 0:
            raise LlmlabError(f"--options.beta must be positive, got {self.beta}")


def orpo_loss(cfg: ORPOConfig, reference=None, method: str = "orpo") -> PreferenceLoss:
    return PreferenceLoss("orpo", cfg.beta)
