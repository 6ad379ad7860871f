"""What every on-policy method shares (PPO, GRPO, rejection sampling): rollouts, per-token log-probs, KL
estimators, advantages and the clipped objectives. Each function is one formula; the methods in
llmlab/align/ put them together.

A rollout batch is R sequences laid out as [left-padded prompt | right-padded completion], so every
completion starts in the same column P and the completion's tokens are columns P … P+N−1:

    ids          (R, P+N)  the prompt (left pads) and the sampled reply, EOS included, then pads
    mask         (R, P+N)  1 on real tokens
    reply_mask   (R, N)    1 on the reply's tokens (what the policy chose and is scored on)
"""

import dataclasses

import torch
import torch.nn.functional as F

from llmlab.generation.generate import SamplingConfig, decode, eos_ids, pad_id


@dataclasses.dataclass
class Rollout:
    ids: torch.Tensor
    mask: torch.Tensor
    prompt_len: int
    reply_mask: torch.Tensor
    replies: list[list[int]]  # the sampled ids of each reply, EOS included when the reply ended with one

    @property
    def lengths(self) -> torch.Tensor:
        return self.reply_mask.sum(-1)


@torch.no_grad()
def rollout(model, tokenizer, prompts: list[list[int]], cfg: SamplingConfig, step: int = 0) -> Rollout:
    """Sample one reply per prompt with llmlab's decoding loop (repeat a prompt for several replies); the
    sampling seed moves on with `step`, so successive rollouts draw fresh samples."""
    pad = pad_id(model, tokenizer)
    was_training = model.training
    model.eval()
    cfg = dataclasses.replace(cfg, seed=cfg.seed + step)
    replies = decode(model, prompts, cfg, eos_ids(model, tokenizer), pad, keep_eos=True)
    model.train(was_training)
    P, N = max(map(len, prompts)), max(1, max(map(len, replies)))
    ids = torch.full((len(prompts), P + N), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (prompt, reply) in enumerate(zip(prompts, replies)):
        ids[i, P - len(prompt):P], mask[i, P - len(prompt):P] = torch.tensor(prompt), 1
        if reply:
            ids[i, P:P + len(reply)], mask[i, P:P + len(reply)] = torch.tensor(reply), 1
    device = model.device
    return Rollout(ids.to(device), mask.to(device), P, mask[:, P:].float().to(device), replies)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count real tokens only, so a left-padded prompt sees what it would see alone."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def reply_logps(model, ro: Rollout, hidden: bool = False):
    """log π(a_t | s_t) of each reply token (R, N), float32; with `hidden`, also the last hidden states at the
    positions that predict them (R, N, H), for a value head."""
    out = model(input_ids=ro.ids, attention_mask=ro.mask, position_ids=positions(ro.mask), use_cache=False,
                output_hidden_states=hidden)
    logits = out.logits[:, ro.prompt_len - 1:-1].float()  # the logits at t predict token t+1
    logps = torch.gather(F.log_softmax(logits, -1), 2, ro.ids[:, ro.prompt_len:, None]).squeeze(-1)
    if not hidden:
        return logps
    return logps, out.hidden_states[-1][:, ro.prompt_len - 1:-1]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1) if dim is None else (x * mask).sum(dim) / mask.sum(dim).clamp(
        min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x − mean) / std over the masked entries (the mean kept with shift_mean=False, as for rewards)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


# ---- KL to the reference, per token ----

def kl_k1(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """log π − log π_ref: unbiased for KL(π‖π_ref) under samples of π, but of high variance and sign."""
    return logps - ref_logps


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 = r − log r − 1 with r = π_ref/π: unbiased, never negative, low variance (GRPO's choice)."""
    log_ratio = ref_logps - logps
    return log_ratio.exp() - log_ratio - 1


# ---- PPO (Schulman et al. 2017) as used for RLHF (Ziegler et al. 2019, Ouyang et al. 2022) ----

def token_rewards(scores: torch.Tensor, logps, ref_logps, reply_mask, beta: float) -> torch.Tensor:
    """r_t = −β (log π − log π_ref) at every reply token, plus the sequence's score at its last token."""
    rewards = -beta * kl_k1(logps, ref_logps) * reply_mask
    last = (reply_mask.sum(-1).long() - 1).clamp(min=0)
    return rewards.index_put((torch.arange(len(last), device=last.device), last), scores.to(rewards), accumulate=True)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016) along each reply, right-padded by `mask`:

        δ_t = r_t + γ V_{t+1} − V_t,    A_t = δ_t + γλ A_{t+1},    returns R_t = A_t + V_t

    with V and A zero past the reply's end. Returns (advantages, returns), both (R, N)."""
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, advantages + values


def clipped_policy_loss(logps, old_logps, advantages, mask, clip: float) -> torch.Tensor:
    """PPO's surrogate: mean over tokens of max(−A ρ, −A clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    ratio = (logps - old_logps).exp()
    losses = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return masked_mean(losses, mask)


def clipped_value_loss(values, old_values, returns, mask, clip: float) -> torch.Tensor:
    """½ max((V − R)², (V_clipped − R)²), V_clipped = V_old + clip(V − V_old, ±ε), mean over tokens."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """Ziegler et al. 2019's controller: β grows when the KL overshoots its target and shrinks when it falls
    short, by at most 20% of the gap per horizon: β ← β (1 + clip(KL/target − 1, ±0.2) · n/horizon)."""

    def __init__(self, beta: float, target: float | None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.beta *= 1 + error * n / self.horizon
        return self.beta


# ---- GRPO (Shao et al. 2024, DeepSeekMath) ----

def group_advantages(scores: torch.Tensor, k: int, scale: bool = True) -> torch.Tensor:
    """Â_i = (r_i − mean(group)) / std(group) for each group of k replies to one prompt (rows grouped
    consecutively); a group whose replies all score the same gets 0, as it teaches nothing."""
    groups = scores.view(-1, k).float()
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + 1e-4)
    return centred.view(-1)


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, clip: float, beta: float) -> torch.Tensor:
    """Per reply (R,): the mean over its tokens of −min(ρÂ, clip(ρ)Â) + β·k3(π, π_ref)."""
    ratio = (logps - old_logps).exp()
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    per_token = -surrogate + (beta * kl_k3(logps, ref_logps) if beta else 0.0)
    return masked_mean(per_token, mask, dim=-1)
