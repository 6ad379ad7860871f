"""The uniform affine quantization grid: the round-to-nearest building block of every weight quantizer.

A b-bit grid has 2^b levels q ∈ {0, …, 2^b − 1}, a step S (scale) and an offset Z (zero point)
per group of weights; a weight is stored as the integer q and stands for S·(q − Z):

    q = clamp(round(w / S) + Z, 0, 2^b − 1)        ŵ = S·(q − Z)

asymmetric:  S = (max − min) / (2^b − 1),  Z = round(−min / S)   (min ≤ 0 ≤ max: zero stays exact)
symmetric:   S = max|w| / (2^(b−1) − 1),    Z = 2^(b−1)          (signed value q − Z)

A group is `group_size` consecutive input columns of one output row; group_size 0 is one group per
row (per-channel) and −1 one group for the whole tensor. Storage is unsigned always: symmetric
8-bit keeps q ∈ [0, 255] with Z = 128. All the arithmetic is float32 whatever the weight dtype.
See Nagel et al. 2021, "A White Paper on Neural Network Quantization", https://arxiv.org/abs/2106.08295.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from llmlab.errors import LlmlabError

EPS = torch.finfo(torch.float32).eps  # the smallest scale: an all-zero group still divides safely


@dataclass
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LlmlabError(f"bits must be an integer from 2 to 8, got {self.bits}")
        if not isinstance(self.group_size, int) or self.group_size < -1:
            raise LlmlabError(f"group_size must be > 0 (columns per group), 0 (per output channel) "
                              f"or -1 (per tensor), got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    def n_groups(self, in_features: int, name: str = "") -> int:
        """Groups per output row of `in_features` columns (see `group_for`)."""
        if self.group_size <= 0:
            return 1
        return in_features // self.group_for(in_features)

    def group_for(self, in_features: int) -> int:
        """Columns per group in a row of `in_features`: `group_size` where it divides the row, else the
        largest divisor of the row below it, a multiple of 32 where there is one (the CPU int4 kernel's
        groups). Widths that 128 does not divide are common (SmolLM2's 576, 2,880, 5,120 …); like AutoGPTQ
        choosing a valid size, the layer then gets the nearest smaller group rather than an error. The
        choice depends on the width alone, so a saved layer's (bits, group_size) rebuild it exactly."""
        if self.group_size <= 0 or in_features % self.group_size == 0:
            return self.group_size
        divisors = [d for d in range(min(self.group_size, in_features), 0, -1) if in_features % d == 0]
        return next((d for d in divisors if d % 32 == 0), divisors[0])


def _grouped(w: Tensor, spec: QuantSpec) -> Tensor:
    """(out, in) -> (rows, n_groups, group) float32, so one scale per [row, group] broadcasts as [..., None]."""
    w = w.float()
    if spec.group_size == -1:
        return w.reshape(1, 1, -1)
    out, n_in = w.shape
    return w.reshape(out, spec.n_groups(n_in), -1)


def fit_grid(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """scale, zero of w (out, in): float32 (out, n_groups), or (1, 1) per tensor; zero holds integers."""
    g = _grouped(w, spec)  # (rows, G, gs)
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        scale = (g.abs().amax(-1) / (half - 1)).clamp(min=EPS)
        zero = torch.full_like(scale, half)
    else:
        # Including 0 in the range keeps a zero weight (padding, pruned) exactly representable.
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / spec.qmax).clamp(min=EPS)
        zero = torch.round(-lo / scale).clamp(0, spec.qmax)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """q = clamp(round(w / S) + Z, 0, qmax) as uint8, the shape of w."""
    g = _grouped(w, spec)
    q = _round_clamp(g, scale[..., None].float(), zero[..., None].float(), spec.qmax)
    return q.to(torch.uint8).reshape(w.shape)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """ŵ = S·(q − Z), float32, the shape of q."""
    g = _grouped(q, spec)
    return (scale[..., None].float() * (g - zero[..., None].float())).reshape(q.shape)


def fake_quantize(w: Tensor, spec: QuantSpec) -> Tensor:
    """Round w onto its own RTN grid and back: float32, the shape of w."""
    scale, zero = fit_grid(w, spec)
    return dequantize(quantize(w, scale, zero, spec), scale, zero, spec)


def quantize_column(w: Tensor, scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    """Fake-quantize w with an already fitted grid (all (out,) or (out, k)): the GPTQ/SparseGPT inner step."""
    scale, zero = scale.float(), zero.float()
    return scale * (_round_clamp(w.float(), scale, zero, qmax) - zero)


def _round_clamp(w: Tensor, scale: Tensor, zero: Tensor, qmax: int) -> Tensor:
    # w * (1/S) rather than w / S: the same float as torchao's quantize_affine, so ties round alike.
    return torch.clamp(torch.round(w * (1.0 / scale)) + zero, 0, qmax)
