"""Standard knowledge distillation: the teacher's temperature-softened distribution as a soft target.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network",
https://arxiv.org/abs/1503.02531. At every target position the student matches the teacher's
next-token distribution softened by τ, mixed with the ordinary cross-entropy on the data:

    L = α τ² KL(p_T^τ ‖ q_θ^τ) + (1 − α) CE(y, q_θ),    p^τ = softmax(z / τ)

The τ² keeps the soft term's gradient on the scale of the hard one as τ changes (the gradient of
the KL w.r.t. the logits scales as 1/τ², §2 of the paper). α = 0 is plain fine-tuning on hard labels
(the "ce" method, which skips the teacher altogether), α = 1 pure distillation.
"""

import dataclasses

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.losses import KDLoss, sft_loss


@dataclasses.dataclass
class KDConfig:
    temperature: float = field(2.0, help="softmax temperature τ of both distributions in the KL term")
    alpha: float = field(0.5, help="weight of the KL term; 1 − alpha goes to cross-entropy on the data")

    def __post_init__(self):
        if self.temperature <= 0:
            raise LlmlabError(f"--options.temperature must be positive, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise LlmlabError(f"--options.alpha must be in [0, 1], got {self.alpha}")


@dataclasses.dataclass
class CEConfig:
    """Hard labels only: the baseline every distillation method is compared with."""


ce_loss = sft_loss  # summed cross-entropy of the target tokens, and how many there are


def kd_loss(teacher, cfg: KDConfig) -> KDLoss:
    return KDLoss(teacher, cfg.temperature, cfg.alpha)


def make_ce_loss(teacher, tokenizer, cfg: CEConfig):
    return sft_loss  # the teacher is not consulted


def make_kd_loss(teacher, tokenizer, cfg: KDConfig) -> KDLoss:
    return kd_loss(teacher, cfg)
