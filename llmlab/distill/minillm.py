"""MiniLLM: distillation by reverse KL, optimised with policy gradient on the student's own samples.

Gu et al. 2023, "MiniLLM: Knowledge Distillation of Large Language Models",
https://arxiv.org/abs/2306.08543. The objective is the sequence-level reverse KL, which makes the
student seek the teacher's modes instead of spreading mass over everything the teacher allows:

    θ* = argmin KL(q_θ ‖ p) = argmax J(θ),   J(θ) = E_{y ~ q_θ(·|x)} [ Σ_t r_t ],   r_t = log p(y_t|y_<t,x) / q_θ(y_t|y_<t,x)

Its policy gradient ∇J = E[Σ_t (R_t − 1) ∇ log q_θ(y_t | …)] with R_t = Σ_{t'≥t} r_t' is split as in
the paper (§2.2, eq. 5–7), with all three of its tricks:

- single-step decomposition: the t-th reward's expectation over y_t is computed exactly, over the
  whole vocabulary, E_{y_t~q_θ}[r_t] = −KL(q_θ(·|y_<t) ‖ p(·|y_<t)); only the future R_{t+1} goes
  through the sampled-token score function, which cuts the variance of the short-term part.
- teacher-mixed sampling: y is drawn from p̃ = α p + (1 − α) q_θ (α = 0.2), which keeps the student
  from reward-hacking on degenerate samples; each step is re-weighted by the per-token importance
  ratio w_t = q_θ(y_t|…) / p̃(y_t|…) (the paper's approximation of the product over steps), clipped.
- length normalisation: R_{t+1} is the *mean* of the future rewards, R^Norm_{t+1} = 1/(T−t) Σ_{t'>t} r_t',
  so short samples are not favoured merely for having fewer negative terms.

The surrogate whose gradient is −(∇J)_Single − (∇J)_Long^Norm, summed over sampled positions t:

    L = Σ_t w_t · KL_t(q_θ ‖ p) − Σ_t w_t · sg(R^Norm_{t+1}) · log q_θ(y_t|…)

plus `lm_weight` × the cross-entropy of the original batch (the paper's L_PT on pretraining text,
which keeps the student's language-modelling ability). Not included: PPO's ratio clipping over
several inner epochs per sample batch (here every sample batch gets exactly one gradient step, so
the policy ratio is 1) and the reward baseline of the official code.
"""

import dataclasses
import inspect
import math
from types import SimpleNamespace

import torch

from llmlab.config import field
from llmlab.data.packing import model_inputs
from llmlab.distill.gkd import on_policy_batch
from llmlab.distill.kd import ce_loss
from llmlab.distill.seqkd import Rollout
from llmlab.errors import LlmlabError
from llmlab.generation.forward import cache_kwargs
from llmlab.train.losses import log_probs, reverse_kl, shifted


@dataclasses.dataclass
class MiniLLMConfig(Rollout):
    mix_alpha: float = field(0.2, help="teacher-mixed sampling: y ~ α p + (1 − α) q_θ (0 = pure student samples)")
    max_weight: float = field(3.0, help="clip the importance weight q_θ/p̃ at this")
    length_norm: bool = field(True, help="future reward as the mean (true) or the sum (false) of r_t'")
    single_step: bool = field(True, help="exact per-step reverse KL term; false = score function for it too")
    lm_weight: float = field(0.0, help="weight of cross-entropy on the data batch (the paper's L_PT)")

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.mix_alpha < 1:
            raise LlmlabError(f"--options.mix_alpha must be in [0, 1), got {self.mix_alpha}")
        if self.max_weight <= 0 or self.lm_weight < 0:
            raise LlmlabError("--options.max_weight must be positive and --options.lm_weight 0 or more")


class MixedPolicy:
    """p̃ = α p_teacher + (1 − α) q_student, as a causal LM that llmlab.generation's decoder can sample from."""

    def __init__(self, student, teacher, alpha: float):
        self.student, self.teacher, self.alpha = student, teacher, alpha
        self.config, self.generation_config = student.config, student.generation_config
        self.device = student.device

    @property
    def training(self) -> bool:
        return self.student.training

    def eval(self):
        self.student.eval()

    def train(self, mode: bool = True):
        self.student.train(mode)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                 logits_to_keep=0):
        caches = cache or (None, None)
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
        out_q = self.student(**kwargs, **cache_kwargs(self.student, caches[0]), **_keep(self.student, logits_to_keep))
        out_p = self.teacher(**kwargs, **cache_kwargs(self.teacher, caches[1]), **_keep(self.teacher, logits_to_keep))
        log_q, log_p = log_probs(out_q.logits[:, -1:]), log_probs(out_p.logits[:, -1:])  # (B, 1, V)
        mixed = torch.logaddexp(log_p + math.log(self.alpha), log_q + math.log1p(-self.alpha))
        return SimpleNamespace(logits=mixed, past_key_values=(out_q.past_key_values, out_p.past_key_values))

    forward = __call__  # the decoder inspects forward's signature for logits_to_keep


def _keep(model, n: int) -> dict:
    return {"logits_to_keep": n} if n and "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def future_rewards(r: torch.Tensor, mask: torch.Tensor, normalise: bool = True, inclusive: bool = False):
    """R_{t+1} (or R_t with `inclusive`): the sum, or mean, of r_t' over the sampled t' > t (t' ≥ t) of
    each row; r, mask (B, T) -> (B, T)."""
    m = mask.float()
    total = (r * m).flip(-1).cumsum(-1).flip(-1)  # Σ_{t' ≥ t}
    count = m.flip(-1).cumsum(-1).flip(-1)
    if not inclusive:
        total, count = total - r * m, count - m
    return total / count.clamp(min=1) if normalise else total


class MiniLLMLoss:
    """`loss_fn(student, batch)`: sample from p̃, then the surrogate of the module docstring."""

    def __init__(self, teacher, tokenizer, cfg: MiniLLMConfig):
        self.teacher, self.tokenizer, self.cfg, self.calls = teacher, tokenizer, cfg, 0

    def __call__(self, model, batch: dict):
        cfg = self.cfg
        self.calls += 1
        policy = MixedPolicy(model, self.teacher, cfg.mix_alpha) if cfg.mix_alpha > 0 else model
        data = batch
        if model.training:  # evaluation scores the data as it is
            batch = on_policy_batch(policy, self.tokenizer, batch, cfg, cfg.seed + self.calls)
        student, targets, mask = shifted(model(**model_inputs(model, batch)).logits, batch["labels"])  # (B, T-1, V)
        with torch.no_grad():
            teacher = self.teacher(**model_inputs(self.teacher, batch)).logits[:, :-1]
        log_q = log_probs(student).gather(-1, targets.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
        log_p = log_probs(teacher).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        r = (log_p - log_q).detach()  # per-token reward log p/q_θ of the sampled token
        w = torch.ones_like(r)
        if cfg.mix_alpha > 0:  # importance weight q_θ/p̃ of the token actually drawn from p̃
            log_mix = torch.logaddexp(log_p + math.log(cfg.mix_alpha), log_q.detach() + math.log1p(-cfg.mix_alpha))
            w = (log_q.detach() - log_mix).exp().clamp(max=cfg.max_weight)
        if cfg.single_step:  # exact E_{y_t ~ q_θ}[−r_t], plus the score term of the future only
            step = reverse_kl(student, teacher) - future_rewards(r, mask, cfg.length_norm) * log_q
        else:  # plain REINFORCE on the whole return R_t
            step = -future_rewards(r, mask, cfg.length_norm, inclusive=True) * log_q
        n = int(mask.sum())
        loss = (w * step)[mask].sum()
        if cfg.lm_weight > 0:
            ce_sum, n_ce = ce_loss(model, data)
            loss = loss + cfg.lm_weight * ce_sum * n / max(n_ce, 1)  # both as per-token means, weighted by n
        return loss, n


def minillm_loss(teacher, tokenizer, cfg: MiniLLMConfig) -> MiniLLMLoss:
    return MiniLLMLoss(teacher, tokenizer, cfg)
