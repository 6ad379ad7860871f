"""Generalized knowledge distillation (GKD): JSD(β) on a mix of data and the student's own samples.

Agarwal et al. 2023, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", https://arxiv.org/abs/2306.13649. A student trained only on fixed sequences never sees
the prefixes it produces itself at inference (exposure bias). GKD trains on a mixture: with
probability λ a batch's completions are replaced by samples y ~ q_θ(· | x) from the current student
(on-policy), otherwise the data's own outputs are used; either way the token-level loss is the
generalised JSD of the module `losses` between teacher p and student q_θ at every output position,

    L(θ) = E_{x} E_{y ~ λ q_θ + (1 − λ) data} [ Σ_t JSD(β)(p(· | y_<t, x) ‖ q_θ(· | y_<t, x)) ]

No gradient flows through the sampling (the paper's Algorithm 1 treats samples as data). β = 0 is
forward KL (= supervised KD on the sampled sequences), β = 1 reverse KL; λ = 0 is supervised KD,
λ = 1 fully on-policy. The paper's default here: β = 0.5, λ = 0.5, τ = 1. Not included: the
paper's variant that also mixes in teacher-generated sequences (trl's `seq_kd`); use `seqkd` data.
"""

import dataclasses
import random

import torch

from llmlab.config import field
from llmlab.data.packing import collate, model_inputs, to_device
from llmlab.distill.seqkd import Rollout, complete, prompts_of
from llmlab.errors import LlmlabError
from llmlab.generation.generate import pad_id
from llmlab.train.losses import generalized_jsd, shifted


@dataclasses.dataclass
class GKDConfig(Rollout):
    beta: float = field(0.5, help="β of JSD(β): 0 = forward KL, 1 = reverse KL")
    lmbda: float = field(0.5, help="λ: fraction of batches whose completions the student samples itself")
    jsd_temperature: float = field(1.0, help="softmax temperature of both distributions in the divergence")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta <= 1:
            raise LlmlabError(f"--options.beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.lmbda <= 1:
            raise LlmlabError(f"--options.lmbda must be in [0, 1], got {self.lmbda}")
        if self.jsd_temperature <= 0:
            raise LlmlabError(f"--options.jsd_temperature must be positive, got {self.jsd_temperature}")


def on_policy_batch(model, tokenizer, batch: dict, rollout: Rollout, seed: int) -> dict:
    """The batch's prompts completed by `model` itself, collated on the batch's device."""
    examples = complete(model, tokenizer, prompts_of(batch, rollout.prompt_len), rollout.sampling(seed))
    return to_device(collate(examples, pad_id(model, tokenizer)), batch["input_ids"].device)


class GKDLoss:
    """`loss_fn(student, batch)`: with probability λ the batch is first re-sampled from the student."""

    def __init__(self, teacher, tokenizer, cfg: GKDConfig):
        self.teacher, self.tokenizer, self.cfg = teacher, tokenizer, cfg
        self.coin, self.calls = random.Random(cfg.seed), 0  # one coin per batch: the same run, the same mix

    def __call__(self, model, batch: dict):
        self.calls += 1
        if model.training and self.coin.random() < self.cfg.lmbda:
            batch = on_policy_batch(model, self.tokenizer, batch, self.cfg, self.cfg.seed + self.calls)
        student, _, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
        with torch.no_grad():
            teacher = self.teacher(**model_inputs(self.teacher, batch)).logits[:, :-1]
        loss = generalized_jsd(student[mask], teacher[mask], self.cfg.beta, self.cfg.jsd_temperature)
        return loss.sum(), int(mask.sum())


def gkd_loss(teacher, tokenizer, cfg: GKDConfig) -> GKDLoss:
    return GKDLoss(teacher, tokenizer, cfg)
