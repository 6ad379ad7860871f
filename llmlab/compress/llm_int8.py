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

from torch import Tensor

from llmlab.compress.calibrate import check_skip
from llmlab.compress.smoothquant import decoder_linears
from llmlab.config import field
from llmlab.models.packed.quant import QuantSpec
from llmlab.models.packed.w8a8 import LLMInt8Linear, check_threshold
from llmlab.models.surgery import set_module


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


def quantize_llm_int8(model, calib: Tensor | None = None, cfg: LLMInt8Config | None = None):
    """Turn every decoder-layer linear into an LLMInt8Linear, in place (no calibration: O is found per input)."""
    cfg = cfg or LLMInt8Config()
    for name, linear in decoder_linears(model, cfg).items():  # checked before anything changes
        set_module(model, name, LLMInt8Linear.from_float(linear, cfg.threshold))
    model.llmlab_quant_method = "llm_int8"
    return model
