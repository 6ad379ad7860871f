"""Divergences between a teacher's and a student's next-token distributions, one value per position.

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

import math

import torch
import torch.nn.functional as F

IGNORE = -100  # label of positions that are not targets (prompt, padding), as in llmlab.finetune.data


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
