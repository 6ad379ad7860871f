"""Layers with int8 activations: W8A8 (SmoothQuant, ZeroQuant) and LLM.int8()'s outlier decomposition.

    W8A8      Y = (X_q · W_qᵀ) ⊙ (Δ_x Δ_wᵀ),  X_q = round(X / Δ_x), Δ_x = max|X| / 127 per token (or tensor)
    LLM.int8  Y = X_O · W_Oᵀ (float, the outlier columns O: any |x| ≥ threshold) + W8A8 on the rest
              (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339)

The methods that fill them (llmlab.compress.smoothquant, zeroquant, llm_int8) hold only the math of
choosing scales; this file is the stored format and its forward pass.
"""

from typing import ClassVar

import torch
from torch import Tensor, nn

from llmlab.errors import LlmlabError
from llmlab.models.packed.bitpack import pack, packed_width, unpack
from llmlab.models.packed.qlinear import QuantizedLinear
from llmlab.models.packed.quant import EPS, QuantSpec, dequantize, fit_grid, quantize

ACT_SCALES = ("per_token", "per_tensor")


def check_w8a8(bits: int, group_size: int, act_scale: str = "per_token") -> None:
    """Config validation shared with ZeroQuant: the weight grids the W8A8 layer supports."""
    if bits not in (4, 8):
        raise LlmlabError(f"W8A8 weights take bits 8 or 4, got {bits}")
    if not isinstance(group_size, int) or group_size < 0:
        raise LlmlabError(f"group_size must be 0 (per output channel) or a positive group size, got {group_size}")
    if act_scale not in ACT_SCALES:
        raise LlmlabError(f"act_scale must be one of {', '.join(ACT_SCALES)}, got '{act_scale}'")


def absmax_int8(x: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x (N, in) float -> X_q int8 (N, in) and Δ_x float32 (N, 1) = max|x_t| / 127 per row, or the given scale."""
    if scale is None:
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp(min=EPS)
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale.float()


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a (N, K) int8 · b (M, K) int8ᵀ -> (N, M) int32, accumulated exactly."""
    try:
        return torch._int_mm(a, b.T)
    except RuntimeError:  # shapes the kernel refuses (on CUDA: N > 16, K and M multiples of 8)
        return (a.double() @ b.double().T).to(torch.int32)  # exact: every partial sum is an integer < 2^53


def float_gradient(y: Tensor, x: Tensor, w_hat: Tensor) -> Tensor:
    """y (the integer path's output) in the forward pass, differentiated as x · Ŵᵀ (straight through, as
    bitsandbytes' backward): adapters trained on a W8A8 base need the gradient with respect to x."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return y
    y_float = x @ w_hat.T
    return y_float + (y - y_float).detach()


class W8A8Linear(QuantizedLinear):
    """Int weights (symmetric, per channel or grouped) × int8 activations (per token or per tensor).

    Buffers: qweight uint8 (out, ceil(in·bits/8)) holding q = w/Δ_w + 2^(bits−1) packed as in quant.py,
    scales float32 (out, G), and input_scale float32 () for static activations. One weight group per row
    multiplies as int8 × int8 → int32 (`use_int_mm`); with groups the int products of each group would need
    their own rescale, so the layer dequantizes the weight once per forward and multiplies the
    dequantized int8 activations in float (the same numbers up to float summation order; faster here
    than one _int_mm per group). No float copy of the weight is kept between calls.
    """
    kind = "w8a8"  # its name in the packed folder's list of swapped modules
    use_int_mm: ClassVar[bool] = True

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8, group_size: int = 0,
                 act_scale: str = "per_token"):
        super().__init__(in_features, out_features, bias)
        check_w8a8(bits, group_size, act_scale)
        self.spec = QuantSpec(bits, group_size, symmetric=True)
        self.act_scale = act_scale
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, self.spec.n_groups(in_features)))
        if act_scale == "per_tensor":
            self.register_buffer("input_scale", torch.ones(()))

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8, group_size: int = 0, act_scale: str = "per_token",
                   input_absmax: Tensor | None = None) -> "W8A8Linear":
        """Round linear.weight to its grid; `input_absmax` (in,) from calibration sets a static activation scale."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, act_scale)
        return layer.set_float(linear, input_absmax)

    @torch.no_grad()
    def set_float(self, linear: nn.Linear, input_absmax: Tensor | None = None) -> "W8A8Linear":
        """Fill this layer's buffers from a float linear of the same shape; returns self."""
        weight = linear.weight.detach().float()  # (out, in)
        scale, zero = fit_grid(weight, self.spec)  # (out, G); zero = 2^(bits-1)
        device = weight.device
        self.qweight = pack(quantize(weight, scale, zero, self.spec).cpu(), self.spec.bits).to(device)
        self.scales = scale.to(device)
        if self.act_scale == "per_tensor":
            if input_absmax is None:
                raise ValueError("a static (per_tensor) activation scale needs the calibrated input_absmax")
            self.input_scale = (input_absmax.float().max() / 127).clamp(min=EPS).to(device)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return self

    def config(self) -> dict:
        return {"bits": self.spec.bits, "group_size": self.spec.group_size, "act_scale": self.act_scale}

    def int_weight(self) -> Tensor:
        """W_q int8 (out, in): the signed grid values q − 2^(bits−1)."""
        q = unpack(self.qweight, self.spec.bits, self.in_features)
        if self.spec.bits == 8:
            return (q ^ 0x80).view(torch.int8)  # flipping the top bit of q is q − 128 in two's complement
        return q.to(torch.int8) - 2 ** (self.spec.bits - 1)

    def dequantized_weight(self) -> Tensor:
        q = unpack(self.qweight, self.spec.bits, self.in_features)
        zero = torch.full_like(self.scales, 2 ** (self.spec.bits - 1))
        return dequantize(q, self.scales.float(), zero, self.spec)

    def quantize_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, in) -> X_q int8 (N, in), Δ_x (N, 1) per token or () per tensor."""
        return absmax_int8(x, self.input_scale.float() if self.act_scale == "per_tensor" else None)

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        xq, sx = self.quantize_input(x2)
        if self.use_int_mm and self.scales.shape[1] == 1:
            y = int8_matmul(xq, self.int_weight()).float() * sx * self.scales.float()[:, 0]  # (N, out)
            w_hat = self.dequantized_weight() if torch.is_grad_enabled() and x2.requires_grad else None
        else:
            w_hat = self.dequantized_weight()  # (out, in), once per call
            y = (xq.float() * sx) @ w_hat.T
        y = float_gradient(y, x2, w_hat)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise LlmlabError(f"llm_int8 threshold must be > 0, got {threshold}; 6.0 is the paper's value")


class LLMInt8Linear(W8A8Linear):
    """Int8 weights per output row (qweight, scales (out, 1)) × int8 activations per token, with the
    outlier feature dimensions of each input multiplied in float."""
    kind = "llm_int8"  # its name in the packed folder's list of swapped modules

    def __init__(self, in_features: int, out_features: int, bias: bool, threshold: float = 6.0):
        super().__init__(in_features, out_features, bias, bits=8, group_size=0, act_scale="per_token")
        check_threshold(threshold)
        self.threshold = float(threshold)

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = 6.0) -> "LLMInt8Linear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, threshold).set_float(linear)

    def config(self) -> dict:
        return {"threshold": self.threshold}

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out), in x's dtype
        x2 = x.reshape(-1, self.in_features).float()  # (N, in)
        outliers = (x2.abs() >= self.threshold).any(0).nonzero()[:, 0]  # O: (k,) feature dimensions
        xq, cx = absmax_int8(x2.index_fill(1, outliers, 0.0))  # (N, in), (N, 1): scales without the outliers
        wq, cw = self.int_weight(), self.scales.float()  # (out, in) int8, (out, 1)
        y = int8_matmul(xq, wq).float() * cx * cw[:, 0]  # (N, out): (c_x ⊗ c_w) ∘ X_q W_qᵀ
        if len(outliers):
            y = y + x2[:, outliers] @ (wq[:, outliers].float() * cw).T  # X_:,O Ŵ_:,Oᵀ in float
        w_hat = self.dequantized_weight() if torch.is_grad_enabled() and x2.requires_grad else None
        y = float_gradient(y, x2, w_hat)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
