"""GRPO: PPO without a value model, the baseline being the other replies to the same prompt.

Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
https://arxiv.org/abs/2402.03300, §4.1. For each prompt q, G replies o_1 … o_G are sampled from the current
policy and scored r_1 … r_G; each reply's advantage is its reward standardised within its group,
Â_i = (r_i − mean(r)) / std(r), given to all its tokens, and the policy maximises

    1/G Σ_i 1/|o_i| Σ_t [ min(ρ_t Â_i, clip(ρ_t, 1−ε, 1+ε) Â_i) − β D_KL[π_θ ‖ π_ref] ]

with ρ_t = π_θ(o_t)/π_old(o_t) and the KL per token by the k3 estimator (train/rl.py). One optimizer step per
rollout (as DeepSeekMath's and TRL's default), so π_old = π_θ and ρ = 1, yet its gradient is the policy
gradient ∇ log π · Â. Groups whose replies all score the same give no signal; their share is logged
(`zero_std`), as DAPO points out. The reward is verifiable (`--reward exact`) or a reward model.
"""

import dataclasses

from llmlab.align.online import Online, fit_online
from llmlab.config import field
from llmlab.errors import LlmlabError
from llmlab.train.rl import group_advantages, grpo_loss, kl_k3, masked_mean, reply_logps, rollout


@dataclasses.dataclass
class GRPOConfig:
    group: int = field(8, help="G: replies sampled per prompt")
    beta: float = field(0.04, help="β: weight of the k3 KL to the reference (DeepSeekMath: 0.04; 0 = no reference)")
    clip: float = field(0.2, help="ε: PPO's clip range of the probability ratio")
    scale_rewards: bool = field(True, help="divide by the group's std (Dr. GRPO argues for false)")

    def __post_init__(self):
        if self.group < 2:
            raise LlmlabError(f"--options.group must be at least 2 (advantages compare replies), got {self.group}")
        if self.beta < 0 or not 0 < self.clip < 1:
            raise LlmlabError(f"--options.beta must be >= 0 and --options.clip in (0, 1), got {self.beta}, {self.clip}")


class GRPOLoss:
    def __init__(self, cfg: GRPOConfig, ctx: Online):
        self.cfg, self.ctx, self.rollouts = cfg, ctx, 0

    def __call__(self, model, batch: dict):
        cfg, ctx = self.cfg, self.ctx
        items = [item for item in batch["prompts"] for _ in range(cfg.group)]  # each group's rows side by side
        self.rollouts += 1
        ro = rollout(model, ctx.tokenizer, [item["ids"] for item in items], ctx.sampling, self.rollouts)
        batch["num_tokens"] = int(ro.mask.sum())  # what the loop's throughput counts
        texts = [ctx.tokenizer.decode(reply, skip_special_tokens=True) for reply in ro.replies]
        scores = ctx.reward(items, texts).float().to(ro.ids.device)
        advantages = group_advantages(scores, cfg.group, cfg.scale_rewards)
        logps = reply_logps(model, ro)
        ref = ctx.reference(model, ro) if cfg.beta else logps.detach()
        losses = grpo_loss(logps, logps.detach(), ref, advantages, ro.reply_mask, cfg.clip, cfg.beta)
        groups = scores.view(-1, cfg.group)
        ctx.log(rollout=self.rollouts, reward=round(float(scores.mean()), 4),
                kl=round(float(masked_mean(kl_k3(logps.detach(), ref), ro.reply_mask)), 5),
                length=float(ro.lengths.mean()), zero_std=float((groups.std(-1) == 0).float().mean()))
        return losses.sum(), len(losses)


def train_grpo(cfg: GRPOConfig, ctx: Online) -> dict:
    return fit_online(ctx, GRPOLoss(cfg, ctx))
