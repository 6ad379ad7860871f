"""LLM.int8(): 8-bit matrix multiplication for transformers at scale.

Dettmers, Lewis, Belkada, Zettlemoyer 2022, https://arxiv.org/abs/2208.07339 (reference code:
bitsandbytes' `MatMul8bitLt`).

Vector-wise quantization (§3.1): every row t of the activations X (N, in) and every row i of the
weight W (out, in) get their own absmax scale, c_x[t] = max|X_t,:| / 127 and c_w[i] = max|W_i,:| / 127,
and the int32 product is rescaled by their outer product:

    X Wᵀ ≈ (c_x ⊗ c_w) ∘ (X_q W_qᵀ),      X_q = round(X / c_x),  W_q = round(W / c_w)  ∈ [−127, 127]

Mixed-precision decomposition (§3.2): a handful of feature dimensions carry systematic outliers
that would stretch every token's scale, so the dimensions O = {j : max_t |X_t,j| ≥ α} (α = threshold,
6.0) are multiplied in float and only the rest in int8:

    Y = X_:,O · Ŵ_:,Oᵀ  +  (c_x ⊗ c_w) ∘ (X_q,:,Ō · W_q,:,Ōᵀ)

with c_x computed on X with the outlier dimensions zeroed. As in bitsandbytes, the layer stores
only the int8 weights: the outlier columns Ŵ_:,O = c_w ∘ W_q,:,O are dequantized on the fly. O is
found anew for every input. The layer is the per-token, per-channel W8A8 layer of smoothquant.py
plus the decomposition; threshold = inf turns the decomposition off (plain vector-wise int8).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from llmlab.compress.calibrate import check_skip, set_module
from llmlab.compress.qlinear import register
from llmlab.compress.quant import QuantSpec
from llmlab.compress.smoothquant import W8A8Linear, absmax_int8, decoder_linears, float_gradient, int8_matmul
from llmlab.config import field
from llmlab.errors import LlmlabError


@dataclass
class LLMInt8Config:
    threshold: float = field(6.0, help="outlier threshold α: input features with any |x| >= α are multiplied in "
                                       "float (inf: no decomposition)")
    skip: list[str] = field([], help="regexes of full module names to leave in float")

    def __post_init__(self):
        check_threshold(self.threshold)
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:  # the weights' grid: int8, one symmetric scale per output row
        return QuantSpec(8, 0, symmetric=True)


def check_threshold(threshold: float) -> None:
    if not threshold > 0:
        raise LlmlabError(f"llm_int8 threshold must be > 0, got {threshold}; 6.0 is the paper's value")


@register("llm_int8")
class LLMInt8Linear(W8A8Linear):
    """Int8 weights per output row (qweight, scales (out, 1)) × int8 activations per token, with the
    outlier feature dimensions of each input multiplied in float."""

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


def quantize_llm_int8(model, calib: Tensor | None = None, cfg: LLMInt8Config | None = None):
    """Turn every decoder-layer linear into an LLMInt8Linear, in place (no calibration: O is found per input)."""
    cfg = cfg or LLMInt8Config()
    for name, linear in decoder_linears(model, cfg).items():  # checked before anything changes
        set_module(model, name, LLMInt8Linear.from_float(linear, cfg.threshold))
    model.llmlab_quant_method = "llm_int8"
    return model
