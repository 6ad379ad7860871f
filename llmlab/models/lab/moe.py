"""A Mixture-of-Experts FFN: a router sends each token to its top-k of N expert FFNs.

Sparsely-gated MoE (Shazeer et al. 2017, https://arxiv.org/abs/1701.06538) with Switch/GShard
routing (Fedus et al. 2021, https://arxiv.org/abs/2101.03961; Lepikhin et al. 2020):

    logits = x W_r                      (+ ε·softplus(x W_noise), ε ~ N(0, 1), when noisy and training)
    p      = softmax(logits)            over the N experts
    y      = Σ_{e ∈ topk(p)} g_e · FFN_e(x),   g = p over the top k, renormalised when k > 1

Capacity: with factor c each expert takes at most ⌈c·k·S/N⌉ of the S tokens' k·S assignments,
first choices before second choices, then in token order (GShard's priority); an assignment past
that is dropped and the token's residual carries it unchanged. Two auxiliary losses keep routing
healthy, both means over tokens, added to the LM loss by the model:

    balance = α · N · Σ_i f_i · P_i     f_i: share of the k·S assignments sent to expert i (before
                                        dropping), P_i: mean router probability of expert i
                                        (Switch's loss; with k = 1 exactly the paper's)
    z       = β · mean_x (log Σ_i e^{logits_i(x)})²      (the router z-loss of ST-MoE, Zoph et al. 2022)

`stats` keeps the last forward's per-expert token counts and dropped assignments, for the metrics.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class MoE(nn.Module):
    def __init__(self, config, make_expert):
        super().__init__()
        self.n, self.k = config.num_experts, config.num_experts_per_tok
        self.capacity_factor = config.moe_capacity_factor
        self.alpha, self.beta = config.moe_aux_loss_coef, config.moe_z_loss_coef
        self.router = nn.Linear(config.hidden_size, self.n, bias=False)
        self.noise = nn.Linear(config.hidden_size, self.n, bias=False) if config.moe_noisy_gating else None
        self.experts = nn.ModuleList(make_expert() for _ in range(self.n))
        self.reset()

    def reset(self):
        self.aux_loss, self.stats = None, {"tokens": [0] * self.n, "dropped": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # (S, D): every token of the batch
        logits = self.router(h).float()
        if self.noise is not None and self.training:
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(h).float())
        probs = logits.softmax(-1)
        gates, experts = probs.topk(self.k, dim=-1)  # (S, k)
        if self.k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        keep = self.within_capacity(experts)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((experts == e) & keep, as_tuple=True)
            if len(token):
                out.index_add_(0, token, (expert(h[token]) * gates[token, slot, None]).to(h.dtype))
        self.aux_loss = self.losses(logits, probs, experts)
        self.stats = {"tokens": torch.bincount(experts[keep], minlength=self.n).tolist(),
                      "dropped": int((~keep).sum())}
        return out.view(shape)

    def within_capacity(self, experts: torch.Tensor) -> torch.Tensor:
        """(S, k) bool: which assignments fit their expert's capacity (all of them without a capacity factor)."""
        if self.capacity_factor is None:
            return torch.ones_like(experts, dtype=torch.bool)
        capacity = math.ceil(self.capacity_factor * self.k * experts.shape[0] / self.n)
        order = experts.t().reshape(-1)  # slot-major: every first choice, then every second choice
        one_hot = F.one_hot(order, self.n)
        rank = ((one_hot.cumsum(0) - 1) * one_hot).sum(-1)  # how many earlier assignments the same expert took
        return (rank < capacity).view(self.k, -1).t()

    def losses(self, logits, probs, experts) -> torch.Tensor:
        f = torch.bincount(experts.reshape(-1), minlength=self.n).float() / experts.numel()
        balance = self.alpha * self.n * (f * probs.mean(0)).sum()
        z = self.beta * torch.logsumexp(logits, -1).square().mean()
        return balance + z
