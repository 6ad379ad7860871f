"""PPO-RLHF: the policy samples replies, a reward model scores them, and PPO improves the policy while a
per-token KL penalty keeps it near the reference.

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", https://arxiv.org/abs/1909.08593,
and Ouyang et al. 2022 (InstructGPT), https://arxiv.org/abs/2203.02155, on PPO (Schulman et al. 2017). Each
rollout of B prompts gives replies y with per-token rewards

    r_t = −β (log π(y_t) − log π_ref(y_t))   (+ the reward model's score at the last token)

A value head V (one linear layer on the policy's last hidden state, so the LoRA trunk is shared) gives
GAE advantages (γ, λ), whitened over the rollout; then `epochs` passes over it in `minibatches`, each one
optimizer step of the clipped policy loss plus vf_coef × the clipped value loss (train/rl.py). β follows
Ziegler's adaptive controller when --options.target-kl is set. Each optimizer step of the loop is one PPO
minibatch update; a new rollout is drawn when the last one is used up.
"""

import dataclasses

import torch

from llmlab.align.online import Online, fit_online
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.rl import (AdaptiveKL, Rollout, clipped_policy_loss, clipped_value_loss, gae, kl_k1, masked_mean,
                             reply_logps, rollout, token_rewards, whiten)

HEAD = "llmlab_value_head"


@dataclasses.dataclass
class PPOConfig:
    beta: float = field(0.05, help="β: the initial weight of the per-token KL penalty")
    target_kl: float | None = field(None, help="adapt β towards this KL per reply (Ziegler et al.: 6); none = fixed")
    gamma: float = field(1.0, help="γ: discount along the reply")
    lam: float = field(0.95, help="λ: GAE's bias-variance trade-off")
    clip: float = field(0.2, help="ε: the policy ratio's clip range")
    value_clip: float = field(0.2, help="the value prediction's clip range")
    vf_coef: float = field(0.1, help="weight of the value loss")
    epochs: int = field(4, help="PPO epochs over each rollout")
    minibatches: int = field(1, help="minibatches per epoch (each one optimizer step)")
    whiten_advantages: bool = field(True, help="standardise the advantages over the rollout")

    def __post_init__(self):
        if self.beta < 0 or not 0 < self.clip < 1 or self.epochs < 1 or self.minibatches < 1:
            raise LlmlabError("--options.beta must be >= 0, --options.clip in (0, 1), --options.epochs and "
                              "--options.minibatches at least 1")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LlmlabError(f"--options.gamma and --options.lam must be in [0, 1], got {self.gamma}, {self.lam}")


def value_head(model) -> torch.nn.Linear:
    """The value head, created on first use beside the policy's modules so the optimizer trains it."""
    if not hasattr(model, HEAD):
        param = next(model.parameters())
        head = torch.nn.Linear(model.config.hidden_size, 1).to(param.device)
        torch.nn.init.zeros_(head.weight)  # V starts at 0: early advantages are the rewards themselves
        torch.nn.init.zeros_(head.bias)
        model.add_module(HEAD, head)
    return getattr(model, HEAD)


class PPOLoss:
    def __init__(self, cfg: PPOConfig, ctx: Online):
        self.cfg, self.ctx, self.kl = cfg, ctx, AdaptiveKL(cfg.beta, cfg.target_kl)
        self.queue, self.rollouts = [], 0

    def __call__(self, model, batch: dict):
        if not self.queue:
            self._rollout(model, batch["prompts"])
        data, rows = self.queue.pop(0)
        batch["num_tokens"] = int(data["ro"].mask[rows].sum())  # what the loop's throughput counts
        ro = Rollout(data["ro"].ids[rows], data["ro"].mask[rows], data["ro"].prompt_len, data["ro"].reply_mask[rows],
                     [])
        logps, hidden = reply_logps(model, ro, hidden=True)
        values = value_head(model)(hidden.to(value_head(model).weight.dtype)).squeeze(-1).float()
        mask = ro.reply_mask
        policy = clipped_policy_loss(logps, data["logps"][rows], data["advantages"][rows], mask, self.cfg.clip)
        value = clipped_value_loss(values, data["values"][rows], data["returns"][rows], mask, self.cfg.value_clip)
        loss = policy + self.cfg.vf_coef * value
        return loss * len(rows), len(rows)  # the loop divides by the count: the mean over minibatch tokens

    @torch.no_grad()
    def _rollout(self, model, items: list[dict]):
        cfg, ctx = self.cfg, self.ctx
        self.rollouts += 1
        ro = rollout(model, ctx.tokenizer, [item["ids"] for item in items], ctx.sampling, self.rollouts)
        texts = [ctx.tokenizer.decode(reply, skip_special_tokens=True) for reply in ro.replies]
        scores = ctx.reward(items, texts).float().to(ro.ids.device)
        logps, hidden = reply_logps(model, ro, hidden=True)
        values = value_head(model)(hidden.to(value_head(model).weight.dtype)).squeeze(-1).float()
        ref = ctx.reference(model, ro)
        mask = ro.reply_mask
        rewards = token_rewards(scores, logps, ref, mask, self.kl.beta)
        advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = whiten(advantages, mask)
        kl = float((kl_k1(logps, ref) * mask).sum(-1).mean())  # per reply, summed over its tokens
        ctx.log(rollout=self.rollouts, reward=round(float(scores.mean()), 4), kl=round(kl, 5), beta=self.kl.beta,
                length=float(ro.lengths.mean()), value=round(float(masked_mean(values, mask)), 4))
        self.kl.update(kl, len(items))
        data = {"ro": ro, "logps": logps, "values": values, "advantages": advantages, "returns": returns}
        size = -(-len(items) // cfg.minibatches)
        for _ in range(cfg.epochs):
            order = torch.randperm(len(items))
            self.queue += [(data, order[i:i + size].to(ro.ids.device)) for i in range(0, len(items), size)]


def train_ppo(cfg: PPOConfig, ctx: Online) -> dict:
    loss = PPOLoss(cfg, ctx)
    value_head(ctx.model)
    try:
        result = fit_online(ctx, loss)
    finally:
        delattr(ctx.model, HEAD)  # the head only serves training; the saved policy is the causal LM alone
    return {**result, "final_beta": loss.kl.beta}
