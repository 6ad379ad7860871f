"""KTO: alignment from unpaired thumbs-up / thumbs-down completions, with prospect theory's value function.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
https://arxiv.org/abs/2402.01306. Each completion is only labelled desirable or not; its implicit reward
r = log π(y|x) − log π_ref(y|x) is compared with a reference point z, the policy's KL to the reference
estimated on mismatched prompt/completion pairs of the batch:

    desirable    λ_D (1 − σ(β (r − z)))        undesirable    λ_U (1 − σ(β (z − r)))

λ_D and λ_U weigh the two kinds; the paper advises λ_D n_D / (λ_U n_U) in [1, 4/3] when the classes are
unbalanced. The formula is `llmlab.train.losses.kto_loss`; the data, `llmlab.data.preference.load_unpaired`.
"""

from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.losses import KTOLoss


@dataclass
class KTOConfig:
    beta: float = field(0.1, help="β: how far the policy may move from the reference")
    desirable_weight: float = field(1.0, help="λ_D: the weight of the desirable completions' loss")
    undesirable_weight: float = field(1.0, help="λ_U: the weight of the undesirable completions' loss")

    def __post_init__(self):
        if not self.beta > 0:
            raise LlmlabError(f"--options.beta must be positive, got {self.beta}")
        if not (self.desirable_weight > 0 and self.undesirable_weight > 0):
            raise LlmlabError("--options.desirable-weight and --options.undesirable-weight must be positive")


def kto_loss(cfg: KTOConfig, reference, method: str = "kto") -> KTOLoss:
    return KTOLoss(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight, reference=reference)
