"""Next-token logits processing as small pure functions, and the pick of the next token.

Each function takes `logits` of shape (B, V) and returns new logits; nothing is changed in
place. The definitions follow transformers' logits processors so that the two agree exactly:

- repetition penalty, CTRL (Keskar et al. 2019, https://arxiv.org/abs/1909.05858): for every
  token already in the sequence, l <- l / θ if l > 0 else l · θ.
- temperature: l <- l / T.
- top-k: keep the k largest logits (ties with the k-th are kept).
- top-p, nucleus sampling (Holtzman et al. 2019, https://arxiv.org/abs/1904.09751): keep the
  smallest set of most likely tokens whose probability mass reaches p, and at least one token.
"""

import torch

NEG_INF = float("-inf")


def repetition_penalty(logits: torch.Tensor, token_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Penalise every token id that occurs in `token_ids` (B, L), prompt included."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, token_ids)  # (B, L); a repeated id is gathered twice, scattered back the same
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, token_ids, seen)


def temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    return logits if t == 1.0 else logits / t


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    # Sorted ascending, the tokens to drop are a prefix: those whose cumulative mass is at most 1 - p.
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), NEG_INF)


def process(logits: torch.Tensor, cfg, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Apply `cfg`'s processors in transformers' order: penalty, then temperature, top-k, top-p."""
    logits = logits.float()  # bf16 logits would round the cumulative sums of top-p
    if token_ids is not None:
        logits = repetition_penalty(logits, token_ids, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits
    return top_p(top_k(temperature(logits, cfg.temperature), cfg.top_k), cfg.top_p)


def pick(logits: torch.Tensor, t: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax when t == 0, else a draw from the softmax."""
    if t == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A private RNG: sampling is reproducible per call and leaves torch's global RNG untouched."""
    return torch.Generator(device=device).manual_seed(seed)
