"""ZeroQuant: efficient and affordable post-training quantization for large-scale transformers.

Yao, Aminabadi, Zhang, Wu, Li, He 2022, https://arxiv.org/abs/2206.01861.

Two fine-grained grids, both symmetric and calibration-free (§4.1):
- group-wise weights: each output row of W (out, in) is cut into groups of `group_size` consecutive
  input columns, each with its own scale,  Ŵ_i,g = Δ_i,g · round(W_i,g / Δ_i,g),  Δ_i,g = max|W_i,g| / (2^(b−1) − 1);
- token-wise activations: every token t gets its own 8-bit scale at run time, Δ_t = max_j |X_t,j| / 127,

    Y = (X_q ∘ Δ_x) · Ŵᵀ

The paper's groups (from Q-BERT) split the matrix into a few blocks of output rows; groups of input
columns inside each row, as here (and in GPTQ/AWQ), are finer still; group_size 0 is one group per
row. The layer is smoothquant.py's W8A8Linear: with one group per row it multiplies int8 × int8 →
int32 (torch._int_mm); with groups it dequantizes the weight once per forward pass (no float copy
is kept) and multiplies the dequantized int8 activations in float — the same numbers. W4 weights
are stored two per byte.

Not implemented: the paper's layer-by-layer knowledge distillation (LKD, §4.3), which trains each
quantized layer to match the float one; the method here is ZeroQuant without LKD (the paper's
W8A8 and W4/8 rows without "LKD").
"""

from dataclasses import dataclass

from torch import Tensor

from llmlab.compress.calibrate import check_skip
from llmlab.compress.smoothquant import decoder_linears
from llmlab.config import field
from llmlab.models.packed.quant import QuantSpec
from llmlab.models.packed.w8a8 import W8A8Linear, check_w8a8
from llmlab.models.surgery import set_module


@dataclass
class ZeroQuantConfig:
    bits: int = field(8, help="weight bits: 8 or 4 (activations are always 8-bit, per token)")
    group_size: int = field(128, help="input columns per weight group; 0 one group per output channel")
    skip: list[str] = field([], help="regexes of full module names to leave in float")

    def __post_init__(self):
        check_w8a8(self.bits, self.group_size)
        check_skip(self.skip)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, symmetric=True)


def quantize_zeroquant(model, calib: Tensor | None = None, cfg: ZeroQuantConfig | None = None):
    """Turn every decoder-layer linear into group-wise W{bits} / token-wise A8, in place (no calibration)."""
    cfg = cfg or ZeroQuantConfig()
    for name, linear in decoder_linears(model, cfg).items():  # checked before anything changes
        set_module(model, name, W8A8Linear.from_float(linear, cfg.bits, cfg.group_size, "per_token"))
    model.llmlab_quant_method = "zeroquant"
    return model
