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

import torch
import torch.nn.functional as F

from llmlab.config import field
from llmlab.distill.losses import forward_kl, shifted
from llmlab.errors import LlmlabError
from llmlab.finetune.packing import model_inputs


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


def ce_loss(model, batch: dict):
    """Summed cross-entropy of the target tokens, and how many there are."""
    logits, targets, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int(mask.sum())


class KDLoss:
    """`loss_fn(student, batch)` for llmlab.train.fit; the teacher is held here, outside the optimizer's reach."""

    def __init__(self, teacher, cfg: KDConfig):
        self.teacher, self.cfg = teacher, cfg

    def __call__(self, model, batch: dict):
        tau, alpha = self.cfg.temperature, self.cfg.alpha
        student, targets, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
        with torch.no_grad():
            teacher = self.teacher(**model_inputs(self.teacher, batch)).logits[:, :-1]
        soft = forward_kl(student[mask], teacher[mask], tau) * tau ** 2  # (N,)
        hard = F.cross_entropy(student[mask].float(), targets[mask], reduction="none") if alpha < 1 else 0.0
        return (alpha * soft + (1 - alpha) * hard).sum(), int(mask.sum())


def kd_loss(teacher, cfg: KDConfig) -> KDLoss:
    return KDLoss(teacher, cfg)
