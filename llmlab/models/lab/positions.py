"""Position information, one function per scheme, written as the papers give it.

    sinusoidal   PE(p, 2i) = sin(p / 10000^(2i/d)),  PE(p, 2i+1) = cos(p / 10000^(2i/d))
                 (Vaswani et al. 2017), added to the token embeddings scaled by √d as the paper does
    learned      a trained table of positions, added to the token embeddings (GPT-2)
    RoPE         rotate each (x_j, x_{j+d/2}) pair of queries and keys by p·θ_j, θ_j = base^(−2j/d)
                 (Su et al. 2021; the rotate-half layout LLaMA's checkpoints use)
    ALiBi        no embedding; head h adds −m_h·(i − j) to the attention score of query i, key j
                 (Press et al. 2022), with the paper's slopes m_h
    none         causal attention alone (NoPE: the mask itself leaks order)
"""

import math

import torch

KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")


def sinusoidal(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(..., dim) sinusoidal embeddings of integer `positions` (...): sines in even, cosines in odd channels."""
    i = torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device)
    angle = positions.float()[..., None] / base ** (i / dim)  # (..., dim/2)
    out = torch.empty(*positions.shape, dim, device=positions.device)
    out[..., 0::2] = torch.sin(angle)
    out[..., 1::2] = torch.cos(angle[..., : dim // 2])
    return out


def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """θ_j = base^(−2j/d) for j < d/2: the inverse frequencies of RoPE."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p·θ_j for each position (B, T), laid out (B, T, d) with the d/2 angles twice."""
    angle = positions.float()[..., None] * inv_freq.to(positions.device)  # (B, T, d/2)
    angle = torch.cat([angle, angle], dim=-1)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, d): pair j is (x_j, x_{j+d/2}), turned by angle p·θ_j."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None].to(x.dtype) + rotated * sin[:, None].to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes: for n a power of two, the geometric sequence 2^(−8/n), 2^(−16/n), …, 2^(−8);
    otherwise those of the largest power of two below n, then every other slope of twice that power."""
    def power_of_two(n):
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    below = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(power_of_two(below) + power_of_two(2 * below)[0::2][: n_heads - below])


def alibi_bias(slopes: torch.Tensor, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """(H, Tq, Tk) bias −m_h·(i − j) for query indices i (Tq) and key indices j (Tk).

    Keys after the query get a positive distance's bias too, but the causal mask removes them; a
    prefix LM's bidirectional prefix sees −m_h·|i − j|, as the symmetric ALiBi variants do.
    """
    distance = (q_index[:, None] - k_index[None, :]).abs().float()
    return -slopes[:, None, None].to(distance.device) * distance
