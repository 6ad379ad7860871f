"""Direct Preference Optimization and the losses that share its reference-model form.

Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
https://arxiv.org/abs/2305.18290. The policy π_θ is pushed to prefer y_w over y_l relative to a frozen
reference π_ref (the SFT model), with β the strength of the implicit KL constraint:

    L = −log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])

Variants in the same file, chosen by the method name (`llmlab align --method …`):
    dpo     the loss above
    cdpo    conservative DPO: labels flipped with probability ε (label_smoothing)
    robust  robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409): unbiased under flip rate ε
    hinge   SLiC-HF's hinge on the same margin (Zhao et al. 2023, https://arxiv.org/abs/2305.10425)
    ipo     IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036): a squared loss towards margin 1/(2β)
The formulas are `llmlab.train.losses.preference_loss`; this file holds the options.
"""

from dataclasses import dataclass

from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.losses import PreferenceLoss


@dataclass
class DPOConfig:
    beta: float = field(0.1, help="β: how far the policy may move from the reference (the KL strength)")
    label_smoothing: float = field(0.0, help="ε: the assumed rate of flipped preference labels (cdpo, robust)")

    def __post_init__(self):
        if not self.beta > 0:
            raise LlmlabError(f"--options.beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LlmlabError(f"--options.label-smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class CDPOConfig(DPOConfig):
    label_smoothing: float = field(0.1, help="ε: the assumed rate of flipped preference labels")


LOSSES = {"dpo": "sigmoid", "cdpo": "sigmoid", "robust": "robust", "hinge": "hinge", "ipo": "ipo"}


def dpo_loss(cfg: DPOConfig, reference, method: str = "dpo") -> PreferenceLoss:
    """`loss_fn(model, batch)` for the method; `reference(model, batch)` gives the reference log-probs when the
    batch does not carry them."""
    return PreferenceLoss(LOSSES[method], cfg.beta, cfg.label_smoothing, reference=reference)
