"""Training losses: each `loss_fn(model, batch) -> (summed loss, number of targets)` for `fit`,
and the divergences they are built from.

SFT is cross-entropy on the target tokens (labels are −100 everywhere else, as in InstructGPT's
SFT stage):   L = − Σ_{t ∈ targets} log q_θ(x_t | x_<t).  The loop divides by the number of
targets over all micro-batches, so a step's loss is the mean over its tokens.

Divergences between a teacher's and a student's next-token distributions, one value per position.

With p the teacher's and q_θ the student's distribution over the vocabulary at one position
(both softened by a temperature τ: softmax(z / τ)):

    forward KL   KL(p ‖ q_θ) = Σ_v p(v) (log p(v) − log q_θ(v))       mean-seeking: q_θ covers all of p
    reverse KL   KL(q_θ ‖ p) = Σ_v q_θ(v) (log q_θ(v) − log p(v))     mode-seeking: q_θ sits on p's modes

and the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2023, "On-Policy Distillation
of Language Models: Learning from Self-Generated Mistakes", https://arxiv.org/abs/2306.13649, eq. 1):

    JSD(β)(p ‖ q_θ) = β KL(p ‖ m) + (1 − β) KL(q_θ ‖ m),    m = β p + (1 − β) q_θ

JSD(β) tends to 0 at both ends of β, so β = 0 and β = 1 are taken to mean forward and reverse KL,
as GKD's own code (and trl's `GKDTrainer.generalized_jsd_loss`, the oracle in the tests) does.
Everything is computed in float32 from logits of shape (..., V) and returns shape (...).
"""

import inspect
import math

import torch
import torch.nn.functional as F

from llmlab.data.packing import IGNORE, model_inputs


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / τ) in float32 at least (bf16 logits would round the small probabilities away)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) from log-probabilities (..., V) -> (...); 0·log 0 counts as 0."""
    return F.kl_div(log_b, log_a, reduction="none", log_target=True).sum(-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher ‖ q_student) per position: Hinton et al.'s KD term (without the τ² factor)."""
    return _kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(q_student ‖ p_teacher) per position: MiniLLM's objective."""
    return _kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def generalized_jsd(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """JSD(β)(p_teacher ‖ q_student) per position; β = 0 is forward KL and β = 1 reverse KL."""
    if beta == 0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1:
        return reverse_kl(student_logits, teacher_logits, temperature)
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))  # log(β p + (1 − β) q)
    return beta * _kl(log_p, log_m) + (1 - beta) * _kl(log_q, log_m)


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (B, T−1, V), targets (B, T−1), mask (B, T−1)): position t predicts token t + 1."""
    targets = labels[:, 1:]
    return logits[:, :-1], targets, targets != IGNORE


def soft_cross_entropy(student_logits, teacher_logits) -> torch.Tensor:
    """−Σ_v p_teacher(v) log q_student(v) per position: forward KL plus the teacher's entropy (a constant
    for the student, so the same gradient), the loss LLM-QAT distils with."""
    return -(teacher_logits.float().softmax(-1) * log_probs(student_logits)).sum(-1)


# ---- loss functions for the training loop ----

def summed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ cross-entropy over the targets that are not IGNORE, how many there are): what fit()'s losses return."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def sft_loss(model, batch: dict):
    """Summed cross-entropy of the target tokens, and how many there are."""
    logits, targets, _ = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
    return summed_cross_entropy(logits, targets)


class KDLoss:
    """Hinton et al.'s knowledge distillation on the target tokens (Hinton, Vinyals & Dean 2015,
    https://arxiv.org/abs/1503.02531):  L = α τ² KL(p_T^τ ‖ q_θ^τ) + (1 − α) CE(y, q_θ).

    The teacher is held here, outside the optimizer's reach."""

    def __init__(self, teacher, temperature: float = 1.0, alpha: float = 1.0):
        self.teacher, self.temperature, self.alpha = teacher, temperature, alpha

    def __call__(self, model, batch: dict):
        tau, alpha = self.temperature, self.alpha
        student, targets, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
        with torch.no_grad():
            teacher = self.teacher(**model_inputs(self.teacher, batch)).logits[:, :-1]
        soft = forward_kl(student[mask], teacher[mask], tau) * tau ** 2  # (N,)
        hard = F.cross_entropy(student[mask].float(), targets[mask], reduction="none") if alpha < 1 else 0.0
        return (alpha * soft + (1 - alpha) * hard).sum(), int(mask.sum())


class SoftTargetLoss:
    """The teacher's full distribution as the target at every position of unlabelled token windows
    (LLM-QAT's data-free distillation: the text is the teacher's own, so there are no labels)."""

    def __init__(self, teacher):
        self.teacher = teacher  # not a submodule of the student: the optimizer never sees it

    def __call__(self, model, batch: dict):
        ids = batch["input_ids"]  # (B, T)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits
        return soft_cross_entropy(model(input_ids=ids, use_cache=False).logits, teacher_logits).sum(), ids.numel()


# ---- preference losses (DPO and its family) ----

PREFERENCE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo")


def sequence_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ log p of each row's target tokens, how many there are): two (rows,) tensors, the sum in float32.

    The LM head runs only at the positions that predict a target in some row (transformers'
    `logits_to_keep` with indices): a preference batch's prompts need no logits, and (rows × positions ×
    vocabulary) logits are most of such a step's memory."""
    labels = batch["labels"]
    keep = (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(-1)  # positions t whose logits predict t + 1
    if _takes_logits_to_keep(model) and len(keep):
        logits = model(**model_inputs(model, batch), logits_to_keep=keep).logits  # (R, K, V)
        targets = labels[:, keep + 1]
        mask = targets != IGNORE
    else:
        logits, targets, mask = shifted(model(**model_inputs(model, batch)).logits, labels)  # (R, T-1, V)
    nll = F.cross_entropy(logits.transpose(1, 2).float(), targets.clamp(min=0), reduction="none")
    return -(nll * mask).sum(-1), mask.sum(-1)


def _takes_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(type(model).forward).parameters


def preference_loss(kind: str, chosen, rejected, ref_chosen=None, ref_rejected=None, n_chosen=None, n_rejected=None,
                    *, beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.0):
    """Per-pair loss (B,) from sequence log-probs (B,) of the policy (and the reference), with Δ the difference of
    the chosen and rejected log-ratios, Δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):

        sigmoid  −(1−ε) log σ(βΔ) − ε log σ(−βΔ)     DPO (Rafailov et al. 2023); ε > 0: conservative DPO
        hinge    max(0, 1 − βΔ)                      SLiC (Zhao et al. 2023)
        ipo      (Δ̄ − 1/(2β))²                       IPO (Azar et al. 2023), Δ̄ from per-token mean log-probs
        robust   [(1−ε)(−log σ(βΔ)) − ε(−log σ(−βΔ))] / (1−2ε)    robust DPO (Chowdhury et al. 2024)
        simpo    −log σ(β(ā_w − ā_l) − γ)            SimPO (Meng et al. 2024): mean log-probs ā, no reference
        orpo     −ā_w − β log σ(log odds(ā_w) − log odds(ā_l)),  odds(a) = e^a / (1 − e^a)
                                                     ORPO (Hong et al. 2024): SFT plus an odds ratio, no reference
    """
    if kind in ("simpo", "orpo", "ipo"):
        chosen, rejected = chosen / n_chosen, rejected / n_rejected
        if kind == "ipo":
            ref_chosen, ref_rejected = ref_chosen / n_chosen, ref_rejected / n_rejected
    if kind == "simpo":
        return -F.logsigmoid(beta * (chosen - rejected) - gamma)
    if kind == "orpo":
        log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
        return -chosen - beta * F.logsigmoid(log_odds)
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if kind == "hinge":
        return torch.relu(1 - beta * delta)
    if kind == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    if kind == "robust":
        return ((1 - label_smoothing) * -F.logsigmoid(beta * delta)
                - label_smoothing * -F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown preference loss {kind!r}; one of {', '.join(PREFERENCE_LOSSES)}")


class PreferenceLoss:
    """`loss_fn(model, batch)` for `fit` on batches of `data.preference.collate_pairs` (B chosen rows, then B
    rejected): the summed preference loss and B. The reference log-probs come from the batch (precomputed),
    from `reference(model, batch)` (e.g. the policy with its adapters disabled), or are not needed."""

    def __init__(self, kind: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.0, reference=None):
        self.kind, self.beta, self.label_smoothing, self.gamma, self.reference = (kind, beta, label_smoothing,
                                                                                  gamma, reference)

    @property
    def needs_reference(self) -> bool:
        return self.kind not in ("simpo", "orpo")

    def __call__(self, model, batch: dict):
        logps, counts = sequence_logps(model, batch)
        half = len(logps) // 2
        ref = None
        if self.needs_reference:
            ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else self.reference(model, batch)
        losses = preference_loss(self.kind, logps[:half], logps[half:],
                                 *((ref[:half], ref[half:]) if ref is not None else (None, None)),
                                 counts[:half], counts[half:], beta=self.beta, label_smoothing=self.label_smoothing,
                                 gamma=self.gamma)
        return losses.sum(), half


def kto_loss(logps, ref_logps, kl_logps, ref_kl_logps, desirable, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-completion KTO loss (B,) (Ethayarajh et al. 2024, eq. 7), from unpaired completions labelled desirable
    or not. With r = log π(y|x) − log π_ref(y|x) and the reference point z = max(0, KL̂(π‖π_ref)), estimated on
    mismatched (x, y') pairs of the batch and not differentiated through:

        desirable    λ_D (1 − σ(β (r − z)))
        undesirable  λ_U (1 − σ(β (z − r)))
    """
    z = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    r = logps - ref_logps
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))


class KTOLoss:
    """`loss_fn(model, batch)` on batches of `data.preference.collate_unpaired` (B completions, then the B
    mismatched ones for the KL estimate): the summed KTO loss and B."""

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, reference=None):
        self.beta, self.weights, self.reference = beta, (desirable_weight, undesirable_weight), reference

    needs_reference = True

    def __call__(self, model, batch: dict):
        logps, _ = sequence_logps(model, batch)  # one forward for both halves; kto_loss detaches the KL half
        half = len(logps) // 2
        ref = batch["ref_logps"].to(logps) if "ref_logps" in batch else self.reference(model, batch)
        losses = kto_loss(logps[:half], ref[:half], logps[half:], ref[half:], batch["desirable"], beta=self.beta,
                          desirable_weight=self.weights[0], undesirable_weight=self.weights[1])
        return losses.sum(), half
